"""Resumable training state, written atomically: a killed run never leaves a broken checkpoint.

A checkpoint is `{output.dir}/checkpoints/step-000500.pt` holding the step, the LoRA weights of
each trained component, the optimizer, the lr schedule and the run it belongs to (a run id and
the config that decides the training), beside the adapter as it was then,
`{name}-step000500.safetensors`. It holds tensors, numbers and strings only and is read back
with `torch.load(weights_only=True)`, which never runs pickled code.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from pathlib import Path

import torch

from sdlora.errors import SdloraError
from sdlora.files import atomic_write, is_disk_full

_NAME = re.compile(r"step-(\d{6,})\.pt")
_SNAPSHOT = re.compile(r".+-step(\d{6,})\.safetensors")

# Keys that change how long or with how much memory a run trains, not what it computes:
# extending a run is resuming it, and so is turning on gradient checkpointing after an OOM.
NOT_DECIDING = {"train": ("steps", "gradient_checkpointing", "recompute_feed_forward"),
                "data": ("cache_latents",)}
DECIDING_SECTIONS = ("data", "lora", "train")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    return _by_step(output_dir, _NAME)


def list_snapshots(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the adapter snapshots saved beside the checkpoints, oldest first."""
    return _by_step(output_dir, _SNAPSHOT)


def _by_step(output_dir: str | Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.fullmatch(p.name)))


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def deciding_config(config) -> dict:
    """The config keys that decide what a step computes (output-only ones like validation and
    output.dtype, and the NOT_DECIDING ones, are left out)."""
    raw = config.to_dict()
    deciding = {"base": raw["base"]}
    for section in DECIDING_SECTIONS:
        deciding[section] = {key: value for key, value in raw[section].items()
                             if key not in NOT_DECIDING.get(section, ())}
    if raw["embeddings"]["tokens"]:  # only then: checkpoints of runs without them still resume
        deciding["embeddings"] = raw["embeddings"]
    return deciding


def run_identity(config, run_id: str) -> dict:
    """What a checkpoint records about the run it belongs to."""
    text = json.dumps(deciding_config(config), sort_keys=True)
    return {"id": run_id, "config_hash": hashlib.sha256(text.encode()).hexdigest()[:16],
            "config": text}


def save_checkpoint(output_dir: str | Path, step: int, state: dict) -> Path:
    """Write the state for `step`; a failed write keeps every earlier checkpoint."""
    path = checkpoint_dir(output_dir) / f"step-{step:06d}.pt"
    try:
        atomic_write(path, lambda temp: _torch_save({"step": step, **state}, temp))
    except OSError as error:
        raise SdloraError(write_failure(path, error, output_dir)) from error
    return path


def _torch_save(state: dict, temp: str) -> None:
    """torch.save turns a failed write (a full disk) into a RuntimeError about "unexpected pos"
    that hides the OS error: write through a file that remembers it and raise that instead."""
    with open(temp, "wb") as stream:
        recorder = _WriteRecorder(stream)
        try:
            torch.save(state, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None
            raise


class _WriteRecorder:
    def __init__(self, stream):
        self.stream = stream
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.stream.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.stream.flush()


def write_failure(path: Path, error: OSError, output_dir: str | Path, dtype=None) -> str:
    """One line: what could not be written, why, and which checkpoint is still good."""
    reason = "disk full" if is_disk_full(error) else (error.strerror or str(error))
    return (f"{reason} writing {path} (files written before are kept); "
            f"{last_good_description(output_dir, dtype)}")


def prune(output_dir: str | Path, written_step: int, keep: int) -> None:
    """Keep the checkpoint (and snapshot) just written and the `keep - 1` newest before it.
    Later steps are the abandoned future of a run resumed from an earlier checkpoint: they
    would outrank the new state for `--resume latest`, so they go too."""
    for found in (list_checkpoints(output_dir), list_snapshots(output_dir)):
        older = [path for step, path in found if step < written_step]
        later = [path for step, path in found if step > written_step]
        for path in later + older[:max(0, len(older) - (keep - 1))]:
            path.unlink(missing_ok=True)


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


def load_for_resume(config, resume: str) -> tuple[Path, dict]:
    """The checkpoint `--resume` names, refused unless this config made it."""
    path = resolve_resume(config.output.dir, resume)
    state = load_checkpoint(path)
    run = state.get("run")
    if not isinstance(run, dict) or "config" not in run:
        raise SdloraError(f"checkpoint {path} does not record the config that made it; "
                          "start over with --overwrite")
    ours = run_identity(config, run["id"])
    if run["config_hash"] != ours["config_hash"]:
        key, theirs, mine = _first_difference(json.loads(run["config"]), json.loads(ours["config"]))
        raise SdloraError(f"checkpoint {path} belongs to a run with another config ({key} is "
                          f"{theirs!r} there, {mine!r} here); resume with that config, "
                          "or start over with --overwrite")
    return path, state


def _first_difference(theirs: dict, mine: dict, prefix: str = "") -> tuple[str, object, object]:
    for key in sorted(set(theirs) | set(mine)):
        a, b = theirs.get(key), mine.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if a != b:
                return _first_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            return f"{prefix}{key}", a, b
    return prefix.rstrip(".") or "config", theirs, mine


def non_finite_count(tensors, dtype: torch.dtype | None = None) -> int:
    """How many of `tensors` hold inf or nan, after a cast to `dtype` (the save precision:
    a weight of 1e6 is finite in fp32 and inf in fp16)."""
    return sum(not torch.isfinite(t if dtype is None else t.to(dtype)).all().item()
               for t in tensors)


def last_good_checkpoint(output_dir: str | Path, dtype: torch.dtype | None = None) -> Path | None:
    """The newest checkpoint whose weights are finite (in `dtype` too); each is read, not assumed."""
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint is simply not a good one
            continue
        tensors = [t for part in state.get("lora", {}).values() for t in part.values()]
        if tensors and non_finite_count(tensors, dtype) == 0:
            return path
    return None


def last_good_description(output_dir: str | Path, dtype: torch.dtype | None = None) -> str:
    good = last_good_checkpoint(output_dir, dtype)
    return f"the last good checkpoint is {good}" if good else "no good checkpoint was written yet"
