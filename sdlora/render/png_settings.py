"""A PNG's own settings, read back: `sdlora render --prompts image.png` re-draws it.

sdlora's PNGs carry their exact settings (the `sdlora` record); any other PNG with A1111's
`parameters` text (A1111, Forge, civitai downloads) is read from that: prompt and <lora:> tags,
negative prompt, steps, sampler and schedule type, CFG scale, seed, size, clip skip, and
sdlora's "Lora block weights" and "Mix mode" (weight schedules ride in the <lora:> tags). Either way the result is a dict of `PromptRow`/`ImageRequest`
fields plus the adapter files the record names (to find adapters no flag names).
"""

from __future__ import annotations

from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.mix.block_weights import parse_block_spec
from sdlora.render.png import parse_parameters, read_png_texts
from sdlora.render.schedulers import SAMPLERS

REQUEST_FIELDS = (
    "prompt", "negative", "seed", "steps", "cfg", "width", "height", "scheduler", "clip_skip",
    "loras", "lora_components", "lora_blocks", "strength", "hires_scale", "hires_strength",
    "lora_schedules", "mix_mode",
)


def settings_from_png(path: str | Path) -> tuple[dict, dict[str, Path]]:
    """(request fields, {adapter name: file recorded}) of the picture in `path`."""
    try:
        texts = read_png_texts(path)
    except (OSError, SyntaxError, ValueError) as error:
        raise SdloraError(f"cannot read PNG {path}: {error}") from None
    if "sdlora" in texts:
        import json

        try:
            record = json.loads(texts["sdlora"])
            fields = {key: record[key] for key in REQUEST_FIELDS if key in record}
            files = {name: Path(entry["path"]) for name, entry in record.get("lora_files", {}).items()}
            for key in ("init_image", "mask"):  # the input files, where they were
                if record.get(key):
                    fields[key] = record[key]["path"]
        except (ValueError, TypeError, KeyError, AttributeError):
            raise SdloraError(f"{path}: its sdlora settings are damaged") from None
        return fields, files
    if "parameters" in texts:
        return _from_infotext(texts["parameters"], str(path)), {}
    raise SdloraError(f"{path} holds no generation settings (no sdlora or A1111 parameters)")


def _from_infotext(text: str, where: str) -> dict:
    fields = parse_parameters(text)
    settings: dict = {"prompt": fields["prompt"], "negative": fields["negative"]}
    try:
        for key, name, kind in (("Steps", "steps", int), ("Seed", "seed", int),
                                ("CFG scale", "cfg", float), ("Clip skip", "clip_skip", int)):
            if key in fields:
                settings[name] = kind(fields[key])
        if "Hires upscale" in fields:
            settings["hires_scale"] = float(fields["Hires upscale"])
            settings["hires_strength"] = float(fields.get("Denoising strength", 0.7))
        if "Size" in fields:
            width, height = fields["Size"].split("x")
            settings["width"], settings["height"] = int(width), int(height)
    except ValueError:
        raise SdloraError(f"{where}: unreadable number in its parameters") from None
    if "Sampler" in fields:
        settings["scheduler"] = _scheduler(fields["Sampler"], fields.get("Schedule type"), where)
    blocks = {}
    for item in filter(None, fields.get("Lora block weights", "").split("; ")):
        name, _, spec = item.partition(": ")
        blocks[name] = parse_block_spec(spec, None, where)[1]
    settings["lora_blocks"] = blocks
    if "Mix mode" in fields:
        settings["mix_mode"] = fields["Mix mode"]
    return settings


def _scheduler(sampler: str, schedule: str | None, where: str) -> str:
    """A1111's "Sampler" (+ "Schedule type") -> the scheduler name sdlora uses."""
    karras = schedule == "Karras" or sampler.endswith(" Karras")
    a1111_name = sampler.removesuffix(" Karras")
    for name, candidate in SAMPLERS.items():
        if candidate.a1111_name == a1111_name and candidate.karras == karras:
            return name
    raise SdloraError(f"{where}: sampler {sampler!r} has no sdlora equivalent")
