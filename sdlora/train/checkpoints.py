"""Resumable training state, written atomically: a killed run never leaves a broken checkpoint.

A checkpoint is `{output.dir}/checkpoints/step-000500.pt` holding the step, the LoRA weights of
each trained component, the optimizer and the lr schedule. It holds tensors, ints and floats
only and is read back with `torch.load(weights_only=True)`, which never runs pickled code.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sdlora.errors import SdloraError
from sdlora.files import atomic_write

_NAME = re.compile(r"step-(\d{6,})\.pt")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))]
    return sorted(found)


def save_checkpoint(output_dir: str | Path, step: int, state: dict, keep: int) -> Path:
    """Write the state for `step`, then delete all but the newest `keep` checkpoints."""
    path = checkpoint_dir(output_dir) / f"step-{step:06d}.pt"
    try:
        atomic_write(path, lambda temp: torch.save({"step": step, **state}, temp))
    except OSError as error:
        previous = list_checkpoints(output_dir)
        kept = f"; the last good checkpoint is {previous[-1][1]}" if previous else ""
        raise SdloraError(f"could not write checkpoint {path} ({error.strerror or error}){kept}") from error
    for _, old in list_checkpoints(output_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def resolve_resume(output_dir: str | Path, resume: str) -> Path:
    """`latest` -> the newest checkpoint in output_dir; anything else is a checkpoint path."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise SdloraError(
                f"--resume latest: no checkpoint in {checkpoint_dir(output_dir)}; start without --resume"
            )
        return found[-1][1]
    path = Path(resume)
    if not path.is_file():
        raise SdloraError(f"--resume {resume}: no such checkpoint file")
    return path


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which one
        raise SdloraError(f"checkpoint {path} cannot be read ({type(error).__name__}); "
                          "pick an earlier one with --resume PATH") from error
