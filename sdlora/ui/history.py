"""A user's outputs folder: generated images named as A1111 names them, and their inputs.

    outputs/[<user>/]2025-06-01/00012-1234.png   a picture: counter, then seed; the counter
                                                continues from the highest number on disk, so
                                                names keep counting up across restarts
    outputs/[<user>/]inputs/<sha256[:16]>.png    an uploaded init image or mask, named by
                                                content, so the picture's record keeps naming
                                                a file that holds what it was made from

`recent` lists the pictures newest first: the History gallery after a restart.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import re
import threading
from pathlib import Path

from PIL import Image

from sdlora.files import atomic_write

_NUMBERED = re.compile(r"(\d{5,})-.*\.png")
INPUTS = "inputs"


class ImageHistory:
    def __init__(self, root: Path):
        self.root = root
        self._lock = threading.Lock()
        self._next: int | None = None

    def new_paths(self, seeds: list[int]) -> list[Path]:
        """Fresh file names for pictures of these seeds, in today's folder."""
        folder = self.root / datetime.date.today().isoformat()
        with self._lock:
            if self._next is None:
                self._next = max((number for number, _ in self._numbered()), default=-1) + 1
            first, self._next = self._next, self._next + len(seeds)
        folder.mkdir(parents=True, exist_ok=True)
        return [folder / f"{first + offset:05d}-{seed}.png" for offset, seed in enumerate(seeds)]

    def recent(self, limit: int) -> list[Path]:
        """The newest `limit` pictures, newest first."""
        return [path for _, path in sorted(self._numbered(), reverse=True)[:limit]]

    def owns(self, path: Path) -> bool:
        root = self.root.resolve()
        return root in path.resolve().parents

    def save_input(self, image: Image.Image) -> Path:
        """Keep an uploaded picture (as PNG) under `inputs/`, named by its content."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        path = self.root / INPUTS / f"{hashlib.sha256(data).hexdigest()[:16]}.png"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda temp: Path(temp).write_bytes(data))
        return path

    def _numbered(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for folder in self.root.iterdir():
            if folder.is_dir() and folder.name != INPUTS:
                for path in folder.glob("*.png"):
                    match = _NUMBERED.fullmatch(path.name)
                    if match:
                        found.append((int(match.group(1)), path))
        return found
