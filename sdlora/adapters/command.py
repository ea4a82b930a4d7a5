"""`sdlora convert` and `sdlora info`: adapter files in, a converted file or a description out.

Embedding targets write each textual-inversion embedding of the input (those bundled in a LoRA
file, or a standalone embedding file itself) into the folder --out:
    --to embedding            OUT/<name>.safetensors, A1111's and kohya's layout (emb_params;
                              SDXL clip_l, clip_g): drop it into A1111's embeddings folder or
                              `sdlora render --embeddings-dir`, the file name is the prompt word
    --to diffusers-embedding  OUT/<name>/learned_embeds.safetensors ({name: vectors}; SDXL
                              clip_l, clip_g): `pipeline.load_textual_inversion("OUT/<name>")`
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from sdlora.adapters.core import Adapter, Layer, LohaLayer, LokrLayer, LoraLayer
from sdlora.adapters.embeddings import (
    BUNDLE_PREFIX,
    Embedding,
    a1111_tensors,
    diffusers_tensors,
    read_embedding_file,
)
from sdlora.adapters.keys import split_key
from sdlora.adapters.metadata import (
    CONFIG_KEY,
    TRIGGER_WORDS_KEY,
    top_tags,
    training_settings,
    trigger_words,
    unreadable_keys,
)
from sdlora.adapters.read import open_safetensors, read_adapter_file
from sdlora.adapters.write import save_adapter
from sdlora.errors import SdloraError
from sdlora.files import atomic_write, check_output_file, is_disk_full

UNREADABLE = "(unreadable)"
EMBEDDING_TARGETS = ("embedding", "diffusers-embedding")


def convert_command(args: argparse.Namespace) -> None:
    """Read args.input in any layout, write args.out in layout args.to, keeping the metadata."""
    if args.to in EMBEDDING_TARGETS:
        _convert_embeddings(args)
        return
    out = Path(args.out)
    check_output_file(out, "--out", args.overwrite)
    source = read_adapter_file(args.input)
    adapter = source.adapter
    try:
        written = save_adapter(adapter, out, layout=args.to, dtype=_storage_dtype(adapter))
    except OSError as error:
        if is_disk_full(error):
            raise  # the CLI reports a full disk in its own words
        raise SdloraError(f"cannot write --out {out}: {error.strerror or error}") from None
    print(
        f"converted {args.input} ({source.layout}) -> {written} ({args.to}): "
        f"{len(adapter.layers)} layers, family {adapter.family or 'unknown'}"
    )
    if adapter.embeddings and args.to == "diffusers":
        print(
            f"left out {len(adapter.embeddings)} bundled embedding(s), which diffusers cannot read "
            "in a LoRA file; write them with --to diffusers-embedding"
        )


def file_embeddings(path: str | Path) -> tuple[dict[str, Embedding], bool]:
    """(the file's embeddings by name, whether it is a LoRA file): a LoRA's bundled ones (maybe
    none), or a standalone embedding file as its one embedding."""
    with open_safetensors(Path(path)) as handle:
        names = list(handle.keys())
    if any(name.startswith(BUNDLE_PREFIX) for name in names):
        return read_adapter_file(path).adapter.embeddings, True
    if any(split_key(name) for name in names):
        return {}, True
    embedding = read_embedding_file(path)
    return {embedding.name: embedding}, False


def _convert_embeddings(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    embeddings, _ = file_embeddings(args.input)
    if not embeddings:
        raise SdloraError(f"{args.input} is a LoRA file with no bundled embeddings")
    out = Path(args.out)
    if out.suffix == ".safetensors":
        raise SdloraError(f"--to {args.to} writes into a folder; --out {out} is a file name")
    for name, embedding in embeddings.items():
        if args.to == "embedding":
            path, tensors = out / f"{name}.safetensors", a1111_tensors(embedding, torch.float32)
        else:
            path = out / name / "learned_embeds.safetensors"
            tensors = diffusers_tensors(embedding, torch.float32)
        atomic_write(path, lambda temp, tensors=tensors: save_file(tensors, temp))
        print(f"wrote {path}: {embedding.describe()}")


def _storage_dtype(adapter: Adapter) -> torch.dtype:
    """Keep full precision when the source had it; half precision otherwise (the common case)."""
    floats = {
        tensor.dtype
        for layer in adapter.layers.values()
        for tensor in vars(layer).values()
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
    }
    return torch.float32 if torch.float32 in floats else torch.float16


def info_command(args: argparse.Namespace) -> None:
    """Print what an adapter file is: family, layout, ranks, targets, size, training settings."""
    path = Path(args.adapter)
    embeddings, is_lora = file_embeddings(path)
    if not is_lora:
        embedding = next(iter(embeddings.values()))
        print(f"{'embedding:':<22}{embedding.describe()}")
        return
    source = read_adapter_file(path)
    for label, value in describe(source.adapter, source.layout, path.stat().st_size):
        print(f"{label + ':':<22}{_printable(value)}")
    if source.ignored_keys:
        print(f"{'ignored keys:':<22}{len(source.ignored_keys)} (e.g. {source.ignored_keys[0]})")


def describe(adapter: Adapter, layout: str, file_size: int) -> list[tuple[str, str]]:
    """(label, value) lines describing an adapter, in the order `sdlora info` prints them."""
    layers = adapter.layers.values()
    lines = [
        ("name", adapter.name),
        ("family", adapter.family or "unknown (no metadata, and the widths match no family)"),
        ("layout", layout),
        ("layer types", _counts(_kind(layer) for layer in layers)),
        (
            "layers",
            f"{len(adapter.layers)} ({_counts(path.split('.', 1)[0] for path in adapter.layers)})",
        ),
        ("rank", _values(layer.rank for layer in layers if not isinstance(layer, LokrLayer))),
        ("alpha", _values(layer.alpha for layer in layers if not isinstance(layer, LokrLayer))),
        ("targets", _counts(_target(path) for path in adapter.layers)),
        ("parameters", f"{adapter.num_parameters:,}"),
        ("file size", _size(file_size)),
    ]
    if adapter.embeddings:
        lines.append(("embeddings", "; ".join(e.describe() for e in adapter.embeddings.values())))
    unreadable = unreadable_keys(adapter.metadata)
    words = ", ".join(trigger_words(adapter.metadata))
    if not words and TRIGGER_WORDS_KEY in unreadable:
        words = UNREADABLE
    lines.append(("trigger words", words))
    tags = ", ".join(f"{tag} ({count})" for tag, count in top_tags(adapter.metadata))
    if "ss_tag_frequency" in unreadable:
        tags = f"{tags} (some {UNREADABLE})" if tags else UNREADABLE
    lines.append(("top tags", tags))
    for label, value in training_settings(adapter.metadata):
        if label == "sdlora config" and CONFIG_KEY in unreadable:
            value = UNREADABLE
        lines.append((label, value))
    if unreadable:
        lines.append(("unreadable metadata", ", ".join(unreadable)))
    return [(label, value) for label, value in lines if value]


def _printable(value: str) -> str:
    """Metadata is free text from the file: escape newlines and terminal control characters."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in value)


def _kind(layer: Layer) -> str:
    if isinstance(layer, LohaLayer):
        return "LoHa"
    if isinstance(layer, LokrLayer):
        return "LoKr"
    assert isinstance(layer, LoraLayer)
    return "LoCon (conv)" if layer.down.dim() == 4 and layer.down.shape[2:] != (1, 1) else "LoRA"


_TARGET_PARENTS = ("attn1", "attn2", "ff", "self_attn", "mlp")


def _target(path: str) -> str:
    """The kind of module a path names: "attn2.to_k", "ff.net.0.proj", "conv1", "self_attn.q_proj"."""
    parts = path.split(".")
    parents = [index for index, part in enumerate(parts) if part in _TARGET_PARENTS]
    if parents:
        return ".".join(parts[parents[-1] :])
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def _counts(items) -> str:
    return ", ".join(f"{item} {count}" for item, count in sorted(Counter(items).items()))


def _values(numbers) -> str:
    distinct = sorted(set(numbers))
    text = ", ".join(f"{number:g}" for number in distinct)
    return (
        text
        if len(distinct) <= 6
        else f"{distinct[0]:g} to {distinct[-1]:g} ({len(distinct)} values)"
    )


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
