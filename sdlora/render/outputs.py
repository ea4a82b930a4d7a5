"""Where a rendered picture goes: never over a file of other settings.

A job's file is `{name}.png`; when that file exists but records other settings (another
weight, prompt, seed, base or adapter file), the picture goes to `{name}-2.png`, `{name}-3.png`,
... (A1111 numbers its files the same way) — and a re-run finds its own earlier file among
those names and re-uses it instead of drawing it again.
"""

from __future__ import annotations

from pathlib import Path

from sdlora.render.png import read_record
from sdlora.render.session import same_picture


def find_or_free(out: Path, name: str, record: dict) -> tuple[Path, bool]:
    """(path, True) for the file already holding this picture, else (first free path, False)."""
    for number in range(1, 1_000_000):
        path = out / (f"{name}.png" if number == 1 else f"{name}-{number}.png")
        if not path.exists():
            return path, False
        if same_picture(read_record(path), record):
            return path, True
    raise RuntimeError(f"a million files named {name}-N.png in {out}")


def grid_record(cells: list[list[Path]], row_labels: list[str], column_labels: list[str]) -> dict:
    """A grid's `sdlora` record: which files form it and how it is labelled."""
    return {
        "grid": [[path.name for path in row] for row in cells],
        "row_labels": row_labels,
        "column_labels": column_labels,
    }
