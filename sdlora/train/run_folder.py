"""A run owns its output folder while it trains, and never mixes its files with another run's.

- A lock, `{dir}/.sdlora-run.lock` holding pid, host and start time, taken with an OS lock
  (fcntl.flock) that the kernel drops when the process dies, so a killed run leaves no stale
  lock; where fcntl is missing, an exclusively created file whose pid is checked instead.
- A folder that holds a finished or interrupted run (its adapter, or checkpoints) is only
  trained into again on request: `--overwrite` replaces that run, `--resume` continues it.
- Hidden temporaries of a killed run's atomic writes are removed once the lock is ours.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.train import checkpoints

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".sdlora-run.lock"
# What sdlora.files.atomic_write leaves when killed: ".{name}.{8 mkstemp characters}.tmp".
_ATOMIC_TEMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
# Folders of a run that atomic writes go to.
_WRITTEN_FOLDERS = ("", "checkpoints", "validation", "cache/latents")


class RunLock:
    """Held from `acquire` to `release`; a second holder is refused with a one-line error."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self._handle = None  # the locked file (fcntl)
        self._held = False

    def acquire(self) -> None:
        if fcntl is None:
            self._acquire_by_exclusive_create()
            return
        for _ in range(10):  # the holder may remove the file between our open and our lock
            handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - the lock lives as long as it is open
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read()
                handle.close()
                raise SdloraError(_in_use(self.path.parent, holder)) from None
            if _same_file(handle, self.path):
                handle.seek(0)
                handle.truncate()
                handle.write(_holder_line())
                handle.flush()
                self._handle, self._held = handle, True
                return
            handle.close()
        raise SdloraError(f"could not lock {self.path}: it keeps being replaced; try again")

    def _acquire_by_exclusive_create(self) -> None:
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self.path.read_text(encoding="utf-8", errors="replace")
                if not _holder_is_dead(holder):
                    raise SdloraError(_in_use(self.path.parent, holder)) from None
                self.path.unlink(missing_ok=True)  # the run that wrote it died: not a lock
                continue
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(_holder_line())
            self._held = True
            return
        raise SdloraError(f"could not lock {self.path}; remove it if no run is using the folder")

    def release(self) -> None:
        if not self._held:
            return
        # Removed while still locked, so a waiting run never locks a file that is going away
        # unnoticed (it checks that the path still is the file it locked).
        self.path.unlink(missing_ok=True)
        if self._handle is not None:
            self._handle.close()
        self._handle, self._held = None, False


def _holder_line() -> str:
    started = time.strftime("%Y-%m-%dT%H:%M:%S")  # no spaces: fields split on them
    return f"pid={os.getpid()} host={socket.gethostname()} started={started}\n"


def _holder_fields(holder: str) -> dict:
    return dict(part.split("=", 1) for part in holder.split() if "=" in part)


def _in_use(folder: Path, holder: str) -> str:
    fields = _holder_fields(holder)
    who = (f"pid {fields.get('pid', '?')} on {fields.get('host', '?')}, "
           f"started {fields.get('started', '?').replace('T', ' ')}")
    return (f"output.dir {folder} is in use by another training run ({who}); wait for it to "
            "finish, or choose another folder with --set output.dir=PATH")


def _holder_is_dead(holder: str) -> bool:
    fields = _holder_fields(holder)
    if fields.get("host") != socket.gethostname() or not fields.get("pid", "").isdigit():
        return False  # another machine's run cannot be checked: assume it is alive
    try:
        os.kill(int(fields["pid"]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _same_file(handle, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def previous_run(output_dir: Path, name: str) -> str | None:
    """What a finished or interrupted run left in `output_dir`, in words, or None."""
    found = []
    if (output_dir / f"{name}.safetensors").is_file():
        found.append(f"the adapter {name}.safetensors")
    saved = checkpoints.list_checkpoints(output_dir)
    if saved:
        found.append(f"{len(saved)} checkpoint(s) up to step {saved[-1][0]}")
    return " and ".join(found) or None


def refuse_previous_run(output_dir: Path, name: str) -> None:
    found = previous_run(output_dir, name)
    if found:
        raise SdloraError(f"output.dir {output_dir} holds another run ({found}); pass --overwrite "
                          "to replace it, or --resume latest to continue it")


def clear_previous_run(output_dir: Path) -> None:
    """What --overwrite removes when the new run starts: the old run's checkpoints, snapshots
    and grids, so that none outranks or is mistaken for the new run's. The old adapter stays
    until the new one replaces it (atomically), so a failed run loses nothing."""
    stale = [path for _, path in checkpoints.list_checkpoints(output_dir)]
    stale += [path for _, path in checkpoints.list_snapshots(output_dir)]
    stale += sorted((output_dir / "validation").glob("step-*.png"))
    for path in stale:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(output_dir: Path) -> list[Path]:
    """Remove what a killed run's atomic writes left behind; call only while holding the lock
    (another run's temporaries would be files in the making)."""
    removed = []
    for folder in (output_dir / sub for sub in _WRITTEN_FOLDERS):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if _ATOMIC_TEMP.fullmatch(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
