"""What `sdlora render` is asked to draw: prompt rows, `<lora:name:w>` tags, `--lora` specs.

A prompt file becomes a list of `PromptRow`s, each remembering its line number so that every
complaint points at the line to fix:

    .txt    one prompt per line; blank lines and lines starting with # are skipped
    .jsonl  one JSON object per line: {"prompt": ..., "negative": ..., "seed": 3, "width": 512,
            "height": 512, "steps": 20, "cfg": 6.5, "loras": {"oil": 0.5}}; only prompt required
    .csv    a header row naming the same fields; loras as "oil:0.5;ink:1"

Fields a row leaves out take the command-line values. Prompts may carry AUTOMATIC1111 adapter
tags (`<lora:name:w>`, `<lora:name:te:unet>`, `<lora:name:w@0.5-1>`, `<lyco:...>`, see
`prompt_syntax`), which are removed from the text and become adapter weights (and weight
schedules) of that row; the rest of the prompt syntax is
checked here too, so a mistake is reported with its line before any model loads.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.mix.schedules import WEIGHT_TEXT, format_schedule
from sdlora.render.prompt_syntax import (
    EXTRA_NETWORK_TAG,
    LoraTag,
    check_prompt_syntax,
    parse_lora_tag,
    strip_extra_network_tags,
)

ROW_FIELDS = ("prompt", "negative", "seed", "width", "height", "steps", "cfg", "loras")


@dataclass
class PromptRow:
    line: int  # line in the prompt file (1 for --prompt)
    prompt: str  # tags removed
    negative: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg: float | None = None
    loras: dict[str, float] = field(default_factory=dict)  # adapter name -> weight
    # adapter name -> {component: weight} for tags that weight the text encoder and the UNet
    # differently (<lora:name:te:unet>); such an adapter's weight in `loras` is 1.0
    lora_components: dict[str, dict[str, float]] = field(default_factory=dict)
    # adapter name -> its weight schedule as recorded ("@0.5-1", sdlora.mix.schedules)
    lora_schedules: dict[str, str] = field(default_factory=dict)


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """ "style.safetensors:0.7" -> (path, 0.7); the weight defaults to 1.0.

    Only the last colon can separate a weight, and only when what follows is a number, so
    Windows paths such as C:\\loras\\style.safetensors stay whole.
    """
    head, colon, tail = spec.rpartition(":")
    if colon and head:
        try:
            weight = float(tail)
        except ValueError:
            pass
        else:
            if not math.isfinite(weight):
                raise SdloraError(f"weight {tail!r} in --lora {spec!r} is not a finite number")
            return Path(head), weight
    path = Path(spec)
    if not path.is_file() and colon and head and Path(head).is_file():
        if WEIGHT_TEXT.fullmatch(tail):  # a plain number was read above
            raise SdloraError(f"--lora {spec!r}: a weight schedule goes in the prompt, as "
                              f"<lora:{Path(head).stem}:{tail.strip()}>, with --lora {head}")
        raise SdloraError(f"weight {tail!r} in --lora {spec!r} is not a number")
    return path, 1.0


def parse_lora_tags(text: str, where: str) -> tuple[str, dict[str, LoraTag]]:
    """Take the adapter tags out of `text` and check its prompt syntax.

    Returns the text without tags (whitespace runs collapsed) and {adapter name: LoraTag} for
    `<lora:name>`, `<lora:name:w>`, `<lora:name:te:unet>`, `<lora:name:te=W:unet=W>` and the same
    with `lyco`; a name tagged twice takes its last tag. Any syntax sdlora would not draw as
    A1111 does is a SdloraError naming `where` (see `check_prompt_syntax`).
    """
    check_prompt_syntax(text, where)
    tags = dict(
        parse_lora_tag(match[0], match[1], match[2], where)
        for match in EXTRA_NETWORK_TAG.finditer(text)
    )
    return strip_extra_network_tags(text), tags


def prompt_row(
    text: str, negative: str | None = None, line: int = 1, where: str = "--prompt"
) -> PromptRow:
    row = PromptRow(line=line, prompt="", negative=negative)
    row.prompt, tags = parse_lora_tags(text, where)
    if negative:
        row.negative, negative_tags = parse_lora_tags(negative, where)
        tags.update(negative_tags)
    for name, tag in tags.items():
        row.loras[name] = tag.weight
        if tag.components is not None:
            row.lora_components[name] = tag.components
        if tag.schedule is not None:
            row.lora_schedules[name] = format_schedule(tag.schedule)
    return row


def read_prompts(path: str | Path) -> list[PromptRow]:
    """Read a .txt, .jsonl or .csv prompt file into rows; a bad row is an error naming its line."""
    path = Path(path)
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv}
    if path.suffix.lower() not in readers:
        raise SdloraError(f"prompt file {path} must end in .txt, .jsonl or .csv")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise SdloraError(f"cannot read prompt file {path}: {error}") from error
    rows = readers[path.suffix.lower()](text, path)
    if not rows:
        raise SdloraError(f"prompt file {path} has no prompts")
    return rows


def _read_txt(text: str, path: Path) -> list[PromptRow]:
    return [
        prompt_row(line.strip(), line=number, where=f"{path}:{number}")
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _read_jsonl(text: str, path: Path) -> list[PromptRow]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SdloraError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise SdloraError(f"{where}: expected a JSON object with a 'prompt' field")
        loras = record.get("loras")
        if loras is not None and not isinstance(loras, dict):
            raise SdloraError(f'{where}: loras must be an object like {{"name": 0.5}}')
        rows.append(_row_from_fields(record, loras or {}, number, where))
    return rows


def _read_csv(text: str, path: Path) -> list[PromptRow]:
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or "prompt" not in reader.fieldnames:
        raise SdloraError(f"{path}:1: the header row must name a 'prompt' column")
    rows = []
    for record in reader:
        number = reader.line_num
        where = f"{path}:{number}"
        if None in record:
            raise SdloraError(f"{where}: more cells than header columns")
        values = {key: value for key, value in record.items() if value not in (None, "")}
        loras = {}
        for item in filter(None, (part.strip() for part in values.get("loras", "").split(";"))):
            name, colon, weight = item.rpartition(":")
            if not colon or not name.strip():
                raise SdloraError(f"{where}: loras entry {item!r} is not name:weight")
            loras[name.strip()] = weight
        rows.append(_row_from_fields(values, loras, number, where))
    return rows


def _row_from_fields(record: dict, loras: dict, number: int, where: str) -> PromptRow:
    unknown = sorted(set(record) - set(ROW_FIELDS))
    if unknown:
        raise SdloraError(
            f"{where}: unknown field {unknown[0]!r}; fields are {', '.join(ROW_FIELDS)}"
        )
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise SdloraError(f"{where}: missing 'prompt'")
    negative = record.get("negative")
    row = prompt_row(prompt, str(negative) if negative is not None else None, number, where)
    for name in ("seed", "width", "height", "steps"):
        if record.get(name) is not None:
            setattr(row, name, _integer(record[name], name, where))
    if record.get("cfg") is not None:
        row.cfg = _number(record["cfg"], "cfg", where)
    for name, weight in loras.items():
        row.loras[str(name)] = _number(weight, f"weight of {name!r}", where)
    check_size(row.width, row.height, where)
    if row.steps is not None and row.steps < 1:
        raise SdloraError(f"{where}: steps must be at least 1")
    return row


MAX_SIDE = 8192  # 4x SDXL's side; larger asks for terabytes of activations, not a picture


def check_size(width: int | None, height: int | None, where: str) -> None:
    for name, value in (("width", width), ("height", height)):
        if value is not None and (value <= 0 or value % 8):
            raise SdloraError(f"{where}: {name} {value} is not a positive multiple of 8")
        if value is not None and value > MAX_SIDE:
            raise SdloraError(f"{where}: {name} {value} is larger than {MAX_SIDE}")


def _number(value, what: str, where: str) -> float:
    try:
        if isinstance(value, bool) or not math.isfinite(float(value)):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise SdloraError(f"{where}: {what} {value!r} is not a number") from None


def _integer(value, what: str, where: str) -> int:
    number = _number(value, what, where)
    if not number.is_integer():
        raise SdloraError(f"{where}: {what} {value!r} is not a whole number")
    return int(number)
