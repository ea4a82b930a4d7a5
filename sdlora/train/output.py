"""Everything a training run writes under `output.dir`, from the main process only.

    {dir}/{name}.safetensors        the adapter (kohya or diffusers layout, with metadata)
    {dir}/{name}.config.yaml        the resolved config the run used (written when it starts)
    {dir}/.sdlora-run.lock          held while a run trains here (see run_folder)
    {dir}/checkpoints/step-*.pt     resumable state, last `checkpoint.keep` kept
    {dir}/checkpoints/{name}-step*.safetensors   the adapter as it was at each checkpoint
    {dir}/validation/step-*.png     without/with-adapter grids
    {dir}/logs/                     TensorBoard scalars and validation images
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from sdlora.adapters.metadata import training_metadata
from sdlora.adapters.write import save_adapter
from sdlora.errors import SdloraError
from sdlora.files import atomic_write
from sdlora.train import checkpoints
from sdlora.train.config import portable_base, portable_dict
from sdlora.train.run_folder import (
    RunLock,
    clear_previous_run,
    refuse_previous_run,
    remove_stale_temporaries,
)
from sdlora.train.validation import Validator

OUTPUT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class OutputWriter:
    """Owns `output.dir` from construction (checks, lock) to `close`; `start` marks the moment
    the run starts for real, after every check and the model load."""

    def __init__(self, config, enabled: bool, overwrite: bool = False, resuming: bool = False):
        self.config = config
        self.resolution = config.data.resolution  # the loop sets the family default when None
        self.v_prediction = False
        self.enabled = enabled
        self.dir = Path(config.output.dir)
        self.dtype = OUTPUT_DTYPES[config.output.dtype]
        self.run: dict | None = None  # checkpoints.run_identity, from `start`
        self._overwrite = overwrite and not resuming
        self._lock = RunLock(self.dir)
        self._tensorboard = None
        if enabled:
            self._check_writable()
            self._claim(overwrite or resuming)

    def _check_writable(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise SdloraError(f"output.dir {self.dir} is not writable ({error.strerror or error}); "
                              "choose another folder with --set output.dir=PATH") from None

    def _claim(self, replacing_allowed: bool) -> None:
        self._lock.acquire()
        try:
            removed = remove_stale_temporaries(self.dir)
            if removed:
                self.say(f"removed {len(removed)} unfinished file(s) a killed run left in {self.dir}")
            if not replacing_allowed:
                refuse_previous_run(self.dir, self.config.output.name)
        except BaseException:
            self._lock.release()
            raise

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        self._lock.release()

    def start(self, run_id: str) -> None:
        """The run starts for real: an --overwrite run removes the one it replaces, and the
        config is written beside the adapter it will describe."""
        self.run = checkpoints.run_identity(self.config, run_id)
        if not self.enabled:
            return
        if self._overwrite:
            clear_previous_run(self.dir)
        text = yaml.safe_dump(self.config.to_dict(), sort_keys=False)
        path = self.dir / f"{self.config.output.name}.config.yaml"
        atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))

    def say(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message)

    def log_scalars(self, step: int, **values: float) -> None:
        writer = self.tensorboard
        if writer is not None:
            for key, value in values.items():
                writer.add_scalar(f"train/{key}", value, step)

    @property
    def tensorboard(self):
        if self.enabled and self.config.output.tensorboard and self._tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.dir / "logs"))
        return self._tensorboard

    def validator(self, pipeline, embed, resolution: int) -> Validator | None:
        settings = self.config.validation
        if not settings.every:
            return None
        pipeline.set_progress_bar_config(disable=True)
        return Validator(pipeline, settings.prompts, embed, settings.resolution or resolution,
                         settings.steps, settings.guidance, settings.seed, self.dir / "validation")

    def validation_grid(self, validator: Validator, step: int, models: dict, at_strength,
                        strengths: tuple[float, ...]) -> None:
        for model in models.values():
            model.eval()
        path, grid = validator.grid_for_step(step, at_strength, strengths)
        for model in models.values():
            model.train()
        self.say(f"validation grid: {path}")
        if self.tensorboard is not None:
            self.tensorboard.add_image("validation", np.asarray(grid), step, dataformats="HWC")

    def checkpoint(self, step: int, training_state, current_adapter) -> None:
        if not self.enabled or step == 0:
            return
        adapter = current_adapter()
        self._check_finite(adapter, step)
        checkpoints.save_checkpoint(self.dir, step, {**training_state(), "run": self.run})
        folder = checkpoints.checkpoint_dir(self.dir)
        self._save(adapter, folder / f"{self.config.output.name}-step{step:06d}.safetensors",
                   step, None)
        checkpoints.prune(self.dir, step, self.config.checkpoint.keep)

    def final_adapter(self, adapter, data, step: int) -> Path:
        path = self.config.adapter_path
        if self.enabled:
            self._check_finite(adapter, step)
            self._save(adapter, path, step, data)
            self.say(f"adapter written: {path} ({path.stat().st_size / 1e6:.2f} MB)")
        return path

    def _check_finite(self, adapter, step: int) -> None:
        """Never save weights that are, or become in the save precision, inf or nan."""
        tensors = [t for layer in adapter.layers.values() for t in (layer.down, layer.up)]
        broken = checkpoints.non_finite_count(tensors)
        if broken:
            what, fix = "became inf or nan", "lower train.learning_rate"
        else:
            broken = checkpoints.non_finite_count(tensors, self.dtype)
            if not broken:
                return
            what = f"overflow {self.config.output.dtype}"
            fix = ("lower train.learning_rate, or save in fp32 or bf16 "
                   "(--set output.dtype=fp32)")
        raise SdloraError(
            f"the adapter's weights {what} at step {step} ({broken} of {len(tensors)} tensors); "
            f"nothing was saved and {checkpoints.last_good_description(self.dir, self.dtype)}. "
            f"To fix: {fix}")

    def _save(self, adapter, path: Path, step: int, data) -> None:
        config = self.config
        trigger = config.data.trigger_word
        metadata = training_metadata(
            family=adapter.family,
            rank=config.lora.rank,
            alpha=config.lora.alpha,
            resolution=self.resolution,
            max_train_steps=step,
            base_model=portable_base(config.base),
            output_name=config.output.name,
            trigger_words=[trigger] if trigger else [],
            tag_frequency=data.tag_frequency() if data is not None else None,
            config=portable_dict(config),
            v_prediction=self.v_prediction,
            learning_rate=config.train.learning_rate,
            batch_size=config.train.batch_size,
            seed=config.train.seed,
            clip_skip=config.train.clip_skip,
            num_train_images=data.num_instance_images if data is not None else None,
        )
        try:
            save_adapter(adapter, path, layout=config.output.format, dtype=self.dtype,
                         metadata=metadata)
        except OSError as error:
            raise SdloraError(checkpoints.write_failure(path, error, self.dir, self.dtype)) from error
