"""The mixer on adapter files: same fused weights as diffusers' own LoRA fusing, and `sdlora mix`
(--out exact and SVD-reduced, --bake)."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from factories import random_adapter

from sdlora.adapters.keys import canonical_path
from sdlora.adapters.read import load_adapter
from sdlora.adapters.write import save_adapter
from sdlora.base.tiny import build_tiny_pipeline
from sdlora.cli import main
from sdlora.mix.command import load_into_mixer
from sdlora.mix.mixer import Mixer

WEIGHTS = {"first": 0.7, "second": -0.4}


@functools.cache
def tiny(family: str):
    return build_tiny_pipeline(family)


def write_pair(folder, family: str, layout: str) -> dict:
    """Two adapter files (LoRA on UNet attention and convs, and every text encoder)."""
    pipeline = tiny(family)
    files = {}
    for seed, name in enumerate(WEIGHTS):
        adapter = random_adapter(pipeline, name, rank=2 + seed, alpha=1.5, convs=True, seed=seed)
        files[name] = save_adapter(adapter, folder / f"{name}.safetensors", layout=layout)
    return files


def mixable_weights(pipeline) -> dict[str, torch.Tensor]:
    """Every weight of the UNet and text encoders, under its plain name even when peft wraps it."""
    weights = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipeline, component, None)
        if model is None:
            continue
        for key, tensor in model.state_dict().items():
            if "lora_" not in key:
                weights[f"{component}.{key.replace('.base_layer', '')}"] = tensor
    return weights


def max_difference(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys()
    return max((ours[key] - theirs[key]).abs().max().item() for key in ours)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_fused_weights_equal_diffusers_fuse_lora(family, layout, tiny_sd1, tiny_sdxl, tmp_path):
    from diffusers import DiffusionPipeline

    folder = {"sd1": tiny_sd1, "sdxl": tiny_sdxl}[family]
    files = write_pair(tmp_path, family, layout)
    ours = DiffusionPipeline.from_pretrained(folder)
    base = {key: tensor.clone() for key, tensor in mixable_weights(ours).items()}
    mixer = Mixer(ours)
    load_into_mixer(mixer, files, {"first": WEIGHTS["first"]})
    theirs = DiffusionPipeline.from_pretrained(folder)
    for name, path in files.items():
        theirs.load_lora_weights(str(path), adapter_name=name)

    theirs.set_adapters(["first"], [WEIGHTS["first"]])
    theirs.fuse_lora(adapter_names=["first"])
    assert max_difference(mixable_weights(ours), mixable_weights(theirs)) <= 1e-4

    mixer.set_weights(WEIGHTS)
    theirs.unfuse_lora()
    theirs.set_adapters(list(WEIGHTS), list(WEIGHTS.values()))
    theirs.fuse_lora(adapter_names=list(WEIGHTS))
    assert max_difference(mixable_weights(ours), mixable_weights(theirs)) <= 1e-4
    # and the comparison is not vacuous: every component moved, in many modules
    changed = [
        key for key, tensor in mixable_weights(ours).items() if not torch.equal(tensor, base[key])
    ]
    components = {"unet", "text_encoder"} | ({"text_encoder_2"} if family == "sdxl" else set())
    assert {key.split(".", 1)[0] for key in changed} == components and len(changed) > 40


@pytest.fixture(scope="module")
def sd1_files(tmp_path_factory) -> dict:
    return write_pair(tmp_path_factory.mktemp("adapters"), "sd1", "kohya")


def lora_options(files) -> list[str]:
    return [
        option for name, path in files.items() for option in ("--lora", f"{path}:{WEIGHTS[name]}")
    ]


def fused_reference(tiny_sd1, files) -> tuple[dict, dict]:
    """The base's mixable weights, and the same weights with the files fused at WEIGHTS, keyed
    by the paths adapter files use."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(tiny_sd1)

    def weights():
        return {canonical_path(key): t.clone() for key, t in mixable_weights(pipeline).items()}

    base = weights()
    load_into_mixer(Mixer(pipeline), files, WEIGHTS)
    return base, weights()


def largest_error(merged, base: dict, fused: dict) -> float:
    """Largest |base + merged delta - fused mix| over the merged adapter's modules."""
    return max(
        (base[f"{path}.weight"] + layer.delta().reshape(base[f"{path}.weight"].shape))
        .sub(fused[f"{path}.weight"])
        .abs()
        .max()
        .item()
        for path, layer in merged.layers.items()
    )


def test_mix_out_is_exact_in_fp32_by_default(tiny_sd1, sd1_files, tmp_path):
    from safetensors import safe_open

    base, fused = fused_reference(tiny_sd1, sd1_files)
    written = {}
    for precision in (None, "fp16", "bf16"):
        out = tmp_path / f"mixed-{precision}.safetensors"
        options = [] if precision is None else ["--save-precision", precision]
        args = ["mix", "--base", str(tiny_sd1), *lora_options(sd1_files), "--out", str(out)]
        assert main([*args, *options]) == 0
        with safe_open(out, "pt") as file:
            written[precision] = {file.get_slice(key).get_dtype() for key in file.keys()}
        merged = load_adapter(out)
        assert merged.family == "sd1"
        assert set(merged.layers) == set(load_adapter(sd1_files["first"]).layers)
        error = largest_error(merged, base, fused)
        if precision is None:
            assert error <= 1e-6
        else:  # rounded factors: measurably off, still close
            assert 1e-6 < error < 2e-2
    assert written == {None: {"F32"}, "fp16": {"F16", "F32"}, "bf16": {"BF16", "F32"}}


def test_mix_out_never_replaces_a_file_unasked(tiny_sd1, sd1_files, tmp_path, capsys):
    out = tmp_path / "mixed.safetensors"
    out.write_bytes(b"someone's adapter")
    args = ["mix", "--base", str(tiny_sd1), *lora_options(sd1_files), "--out", str(out)]
    assert main(args) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"someone's adapter"
    assert main([*args, "--overwrite"]) == 0
    assert load_adapter(out).family == "sd1"
    assert main(["mix", "--base", str(tiny_sd1), *lora_options(sd1_files),
                 "--out", str(tmp_path)]) == 2  # a folder: one line, not IsADirectoryError


def test_mix_out_with_rank_prints_the_svd_error(tiny_sd1, sd1_files, tmp_path, capsys):
    out = tmp_path / "reduced.safetensors"
    assert (
        main(
            [
                "mix",
                "--base",
                str(tiny_sd1),
                *lora_options(sd1_files),
                "--out",
                str(out),
                "--rank",
                "2",
            ]
        )
        == 0
    )
    printed = re.fullmatch(r"SVD relative error: (\d\.\d+)\n", capsys.readouterr().out)
    assert printed and 0 < float(printed.group(1)) < 1
    assert {layer.rank for layer in load_adapter(out).layers.values()} == {2}


def test_mix_bake_loads_with_the_fused_weights(tiny_sd1, sd1_files, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    baked = tmp_path / "baked"
    assert (
        main(["mix", "--base", str(tiny_sd1), *lora_options(sd1_files), "--bake", str(baked)]) == 0
    )
    loaded = DiffusionPipeline.from_pretrained(baked)
    reference = DiffusionPipeline.from_pretrained(tiny_sd1)
    load_into_mixer(Mixer(reference), sd1_files, WEIGHTS)
    expected = mixable_weights(reference)
    assert all(
        torch.equal(tensor, expected[key]) for key, tensor in mixable_weights(loaded).items()
    )

    assert (
        main(["mix", "--base", str(tiny_sd1), *lora_options(sd1_files), "--bake", str(baked)]) == 2
    )
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (
        main(
            [
                "mix",
                "--base",
                str(tiny_sd1),
                *lora_options(sd1_files),
                "--bake",
                str(tmp_path / "other"),
                "--rank",
                "4",
            ]
        )
        == 2
    )
    args = ["mix", "--base", str(tiny_sd1), *lora_options(sd1_files), "--bake", str(baked)]
    assert main([*args, "--save-precision", "fp16"]) == 2
    assert "--save-precision goes with --out" in capsys.readouterr().err
