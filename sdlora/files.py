"""Writing files so that a reader, a crash or a full disk never sees half of one."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from sdlora.errors import SdloraError

# Files that torch/pickle would execute code from when loaded; sdlora never opens them.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call write(temp_path) and rename the result onto `path`; on any failure remove the temp.

    The temporary file is hidden (leading dot) and lives beside `path`, so the rename is atomic
    and folder scans never pick it up. The file and then its folder are fsynced, so a power loss
    leaves the old file or the whole new one, never a renamed empty one. The result gets the
    permissions a plain `open` would give. A full disk, also when a library wrapped it in an
    exception of its own (safetensors does), arrives as OSError(ENOSPC) naming `path`; the
    previous file, if any, is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(handle)
    try:
        write(temp)
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes 0600
        _fsync(temp)
        os.replace(temp, path)
        _fsync_folder(path.parent)
    except BaseException as error:
        Path(temp).unlink(missing_ok=True)
        if is_disk_full(error) and not isinstance(error, OSError):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from error
        raise


def check_output_file(out: Path, flag: str, overwrite: bool = False) -> None:
    """Refuse an output path that cannot be a file, or that would replace one without being
    asked to, before any work is done (the cheap, common mistakes)."""
    if out.is_dir():
        raise SdloraError(
            f"{flag} {out} is a folder; give a file name such as {out / 'adapter.safetensors'}"
        )
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SdloraError(f"{flag} {out}: {parent} is a file, not a folder")
            break
    if out.exists() and not overwrite:
        raise SdloraError(f"{flag} {out} already exists; pass --overwrite to replace it")


def is_disk_full(error: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, also when a library wrapped it in its own exception's text."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error).lower()
    return "no space left on device" in text or "disk quota exceeded" in text


def _fsync(path: str) -> None:
    with open(path, "rb+") as stream:
        os.fsync(stream.fileno())


def _fsync_folder(folder: Path) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open a folder; the rename itself is still atomic
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
