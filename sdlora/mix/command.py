"""`sdlora mix`: a weighted mix of adapter files -> one adapter file, or a baked base model.

    --lora PATH[:WEIGHT] ... [--mix-mode add|orthogonal] -> Mixer on the base (weights fused,
        combined by the mode, sdlora.mix.modes) ->
        --out FILE [--rank R] [--save-precision fp32|fp16|bf16]
                               the mix as one kohya-layout adapter: ranks concatenated (exact:
                               base + its delta equals the fused mix to float32 rounding, when
                               saved in fp32, the default), or SVD-reduced to rank R per module
                               (relative error printed)
        --bake DIR             the base with the mix fused in, a diffusers folder

Outputs never replace a folder that holds files; a mistake in the arguments is reported before
the base is loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sdlora.errors import SdloraError
from sdlora.files import check_output_file
from sdlora.render.command import ensure_writable
from sdlora.render.plan import adapters_from_specs

SAVE_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def mix_command(args) -> None:
    from sdlora.base.models import load_base
    from sdlora.mix.mixer import Mixer
    from sdlora.mix.modes import check_mix_mode

    files, weights = adapters_from_specs(args.lora)
    mode = check_mix_mode(args.mix_mode)
    if args.rank is not None and (args.out is None or args.rank < 1):
        raise SdloraError("--rank takes a positive number and goes with --out")
    if args.save_precision is not None and args.out is None:
        raise SdloraError("--save-precision goes with --out")
    if args.out is not None:
        out = Path(args.out)
        if out.suffix != ".safetensors":
            raise SdloraError(f"--out {args.out!r} must end in .safetensors")
        check_output_file(out, "--out", args.overwrite)
        ensure_writable(out.parent)
    else:
        out = Path(args.bake)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise SdloraError(f"--bake folder {args.bake!r} already exists and is not empty")
        ensure_writable(out)

    base = load_base(args.base)
    mixer = Mixer(base.pipeline, mode=mode)
    load_into_mixer(mixer, files, weights)
    if args.bake is not None:
        mixer.bake(out)
        print(f"baked {_describe(weights)} ({mode}) into {out}", file=sys.stderr)
        return

    from sdlora.adapters.write import save_adapter

    adapter, error = mixer.merged_adapter(rank=args.rank, name=out.stem)
    save_adapter(adapter, out, dtype=SAVE_PRECISIONS[args.save_precision or "fp32"])
    ranks = sorted({layer.rank for layer in adapter.layers.values()})
    rank_text = f"rank {ranks[-1]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    print(
        f"wrote {out}: {_describe(weights)} ({mode}), {len(adapter.layers)} layers, {rank_text}",
        file=sys.stderr,
    )
    if args.rank is not None:
        print(f"SVD relative error: {error:.6f}")


def _describe(weights: dict[str, float]) -> str:
    return " + ".join(f"{weight:g} x {name}" for name, weight in weights.items())


def load_into_mixer(mixer, files: dict[str, Path], weights: dict[str, float] | None = None) -> None:
    """Read each adapter file and add it to `mixer` (which warns about layers the base lacks)."""
    from sdlora.adapters.read import load_adapter

    for name, path in files.items():
        mixer.add(load_adapter(path, name=name), (weights or {}).get(name, 0.0))
