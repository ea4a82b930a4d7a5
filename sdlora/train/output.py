"""Everything a training run writes under `output.dir`, from the main process only.

    {dir}/{name}.safetensors        the adapter (kohya or diffusers layout, with metadata)
    {dir}/{name}.config.yaml        the resolved config the run used
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
from sdlora.train.validation import Validator

OUTPUT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class OutputWriter:
    def __init__(self, config, enabled: bool):
        self.config = config
        self.resolution = config.data.resolution  # the loop sets the family default when None
        self.v_prediction = False
        self.enabled = enabled
        self.dir = Path(config.output.dir)
        self._tensorboard = None
        if enabled:
            self._check_writable()
            text = yaml.safe_dump(config.to_dict(), sort_keys=False)
            path = self.dir / f"{config.output.name}.config.yaml"
            atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))

    def _check_writable(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise SdloraError(f"output.dir {self.dir} is not writable ({error.strerror or error}); "
                              "choose another folder with --set output.dir=PATH") from None

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
        keep = self.config.checkpoint.keep
        checkpoints.save_checkpoint(self.dir, step, training_state(), keep)
        folder = checkpoints.checkpoint_dir(self.dir)
        name = self.config.output.name
        self._save(current_adapter(), folder / f"{name}-step{step:06d}.safetensors", step, None)
        snapshots = sorted(folder.glob(f"{name}-step*.safetensors"))
        for old in snapshots[:-keep]:
            old.unlink(missing_ok=True)

    def final_adapter(self, adapter, data, step: int) -> Path:
        path = self.config.adapter_path
        if self.enabled:
            self._save(adapter, path, step, data)
            self.say(f"adapter written: {path} ({path.stat().st_size / 1e6:.2f} MB)")
            if self._tensorboard is not None:
                self._tensorboard.close()
        return path

    def _save(self, adapter, path: Path, step: int, data) -> None:
        config = self.config
        trigger = config.data.trigger_word
        metadata = training_metadata(
            family=adapter.family,
            rank=config.lora.rank,
            alpha=config.lora.alpha,
            resolution=self.resolution,
            max_train_steps=step,
            base_model=config.base,
            output_name=config.output.name,
            trigger_words=[trigger] if trigger else [],
            tag_frequency=data.tag_frequency() if data is not None else None,
            config=config.to_dict(),
            v_prediction=self.v_prediction,
            learning_rate=config.train.learning_rate,
            batch_size=config.train.batch_size,
            seed=config.train.seed,
            clip_skip=config.train.clip_skip,
            num_train_images=data.num_instance_images if data is not None else None,
        )
        try:
            save_adapter(adapter, path, layout=config.output.format,
                         dtype=OUTPUT_DTYPES[config.output.dtype], metadata=metadata)
        except OSError as error:
            found = checkpoints.list_checkpoints(self.dir)
            kept = f"; the last checkpoint {found[-1][1]} is intact" if found else ""
            raise SdloraError(f"could not write {path} ({error.strerror or error}){kept}") from error
