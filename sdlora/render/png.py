"""The PNG files of `sdlora render`: settings written into them, hashes, atomic writes.

Each image carries two tEXt chunks:
- `parameters`, in AUTOMATIC1111's infotext format, which A1111, Forge, ComfyUI loaders and
  civitai read back:
      a red house <lora:oil:0.8>
      Negative prompt: blurry
      Steps: 30, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 1a2b3c4d5e,
      Model: v1-5, Lora hashes: "oil: 0123456789ab", Version: sdlora 0.1.0
  (one line after the negative prompt; the prompt repeats the mix as <lora:> tags so A1111
  reproduces it). Model hash is the first 10 hex digits of the checkpoint's sha256, as A1111
  computes it; for a diffusers folder it is the sha256 of its weight files' hashes (see
  `model_hash`). Lora hashes are A1111's: sha256 of the safetensors data after the header.
- `sdlora`, our complete settings as JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from PIL import Image, PngImagePlugin

from sdlora.base.models import resolve_base_source
from sdlora.errors import SdloraError
from sdlora.files import atomic_write
from sdlora.mix.block_weights import format_block_spec
from sdlora.render.pipelines import MASK_BLUR

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def a1111_parameters(record: dict, sampler, model_name: str) -> str:
    """The infotext for one image; `record` is what goes into the `sdlora` chunk.

    Each adapter is an A1111 tag: `<lora:name:w>`, or `<lora:name:te:unet>` when its text
    encoder and UNet weights differ, `<lora:name:w@0.5-1>` with a weight schedule (which
    A1111 extensions read); the mix mode, when not `add`, goes into "Mix mode"; per-block weights, which A1111 keeps in no standard field,
    go into "Lora block weights" (sdlora.mix.block_weights' spec, read back by sdlora).
    """
    loras = record["loras"]
    tags = "".join(
        _lora_tag(name, weight, record["lora_components"].get(name, {}),
                  record.get("lora_schedules", {}).get(name, ""))
        for name, weight in loras.items()
    )
    blocks = "; ".join(
        f"{name}: {format_block_spec({}, parts)}" for name, parts in record["lora_blocks"].items()
    )
    fields = {
        "Steps": record["steps"],
        "Sampler": sampler.a1111_name,
        "Schedule type": "Karras" if sampler.karras else None,
        "CFG scale": f"{record['cfg']:g}",
        "Seed": record["seed"],
        "Size": f"{record['width']}x{record['height']}",
        "Model hash": record["model_hash"],
        "Model": model_name,
        "Denoising strength": _number(record["strength"] or record["hires_strength"]),
        "Mask blur": MASK_BLUR if record["mask"] else None,
        "Clip skip": record["clip_skip"] if record["clip_skip"] != 1 else None,
        "Hires upscale": _number(record["hires_scale"]),
        "Hires upscaler": "Lanczos" if record["hires_scale"] else None,
        "Lora block weights": blocks or None,
        "Mix mode": record["mix_mode"] if record.get("mix_mode", "add") != "add" else None,
        "Lora hashes": ", ".join(
            f"{_alias(name)}: {record['lora_files'][name]['hash']}" for name in loras
        )
        or None,
        "TI hashes": ", ".join(
            f"{name}: {entry['hash']}" for name, entry in record.get("embeddings", {}).items()
        )
        or None,
        "Version": f"sdlora {record['version']}",
    }
    line = ", ".join(
        f"{key}: {_quote(value)}" for key, value in fields.items() if value is not None
    )
    negative = f"\nNegative prompt: {record['negative']}" if record["negative"] else ""
    return f"{record['prompt']}{tags}{negative}\n{line}"


def _number(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


def _lora_tag(name: str, weight: float, components: dict[str, float], schedule: str) -> str:
    text_encoder = weight * components.get("text_encoder", 1.0)
    unet = weight * components.get("unet", 1.0)
    if text_encoder == unet:
        return f" <lora:{name}:{weight:g}{schedule}>"
    return f" <lora:{name}:{text_encoder:g}:{unet:g}>"


def parse_parameters(text: str) -> dict[str, str]:
    """Read an infotext back: {"prompt", "negative", "Steps", "Sampler", ...} (values as text)."""
    *prompt_lines, line = text.split("\n")
    prompt = "\n".join(prompt_lines)
    prompt, _, negative = prompt.partition("\nNegative prompt: ")
    fields = {"prompt": prompt, "negative": negative}
    decoder = json.JSONDecoder()
    rest = line
    while rest:
        key, _, rest = rest.partition(": ")
        if rest.startswith('"'):
            value, end = decoder.raw_decode(rest)
            rest = rest[end:]
        else:
            value, _, rest = rest.partition(",")
            rest = "," + rest if rest else ""
        fields[key.strip()] = value.strip()
        rest = rest.removeprefix(",").lstrip()
    return fields


def _quote(value) -> str:
    """A1111's rule: values holding a comma, colon or newline are written as JSON strings."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _alias(name: str) -> str:
    return name.replace(":", "").replace(",", "")


def write_png(image: Image.Image, path: Path, record: dict, infotext: str | None = None) -> None:
    """Write `image` with its `sdlora` record (and A1111 `parameters`) as tEXt chunks; a
    temporary file renamed into place, so readers (and a resumed run) never see half an image."""
    texts = {"sdlora": json.dumps(record, sort_keys=True)}
    if infotext is not None:
        texts = {"parameters": infotext, **texts}
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    atomic_write(path, lambda temporary: image.save(temporary, format="PNG", pnginfo=info))


def read_png_texts(path: str | Path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(image.text)


def read_record(path: str | Path) -> dict | None:
    """The `sdlora` record of a PNG, or None when the file has none or cannot be read."""
    try:
        return json.loads(read_png_texts(path)["sdlora"])
    except (OSError, KeyError, ValueError, SyntaxError):
        return None


def lora_hash(path: str | Path) -> str:
    """A1111's short LoRA hash: sha256 of a safetensors file's data after its header, 12 hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        header_size = int.from_bytes(stream.read(8), "little")
        stream.seek(8 + header_size)
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def model_hash(source: str) -> str | None:
    """First 10 hex of the base's sha256, or None when the base is not on this machine.

    A single file hashes as A1111 does. A diffusers folder hashes as the sha256 of the lines
    "relative/path sha256" of its weight files, sorted. Hub ids use the local hub cache.
    """
    path = Path(resolve_base_source(source))
    if not path.exists():
        path = _hub_snapshot(source)
        if path is None:
            return None
    if path.is_file():
        return file_sha256(path)[:10]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    lines = "".join(f"{p.relative_to(path).as_posix()} {file_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()[:10]


def _hub_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure only means "no hash to report"
        return None


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "sdlora" / "sha256.json"


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime): checkpoints are gigabytes."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = _cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 24), b""):
            digest.update(chunk)
    cache[key] = digest.hexdigest()
    # an unwritable cache only costs hashing again next time
    with contextlib.suppress(OSError, SdloraError):
        atomic_write(cache_file, lambda temporary: Path(temporary).write_text(json.dumps(cache)))
    return cache[key]
