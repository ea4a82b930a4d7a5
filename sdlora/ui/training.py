"""What the Train tab runs: a preset config with the user's few choices, trained in a thread.

    preset (configs/*.yaml) + base, images, name, trigger word, steps, rank -> Config
    -> sdlora.train.loop.train in a background thread, `on_step` recording step and loss
    -> {adapters}/runs/{name}/ (checkpoints, validation grids, logs)
    -> the adapter copied to {adapters}/{name}.safetensors, where the Generate tab finds it

Cancel makes the next `on_step` raise KeyboardInterrupt: the loop saves a checkpoint and stops.
One run at a time per server: training takes the whole machine.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image

from sdlora.errors import SdloraError
from sdlora.files import atomic_write
from sdlora.train.config import from_dict, validate
from sdlora.train.dataset import IMAGE_SUFFIXES
from sdlora.ui.folders import PLAIN_NAME, Folders

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOADS = 500
CAPTION_SUFFIX = ".txt"
MAX_STEPS = 100_000
MAX_RANK = 256


@dataclass
class TrainingRequest:
    preset: str
    name: str
    trigger_word: str
    steps: int
    rank: int
    base: str = ""  # the user's choice; "" is the operator's --base
    uploads: list[str] = field(default_factory=list)  # files the browser uploaded
    folder: str = ""  # an image folder inside --data-dir, instead of uploads
    before_folder: str = ""  # the same pictures unstyled, inside --data-dir (data.before_dir)


class TrainingJob:
    """One run in a background thread; its fields are read by the UI while it trains."""

    def __init__(self, config, adapters_dir: Path):
        self.config = config
        self.adapters_dir = adapters_dir
        self.total_steps = config.train.steps
        self.step = 0
        self.loss: float | None = None
        self.state = "starting"  # starting, training, finished, cancelled, failed
        self.message = ""
        self.adapter_path: Path | None = None
        self._started = time.monotonic()
        self._first_step_at: float | None = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"train-{config.output.name}", daemon=True
        )

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output.dir)

    @property
    def running(self) -> bool:
        return self.state in ("starting", "training")

    def start(self) -> TrainingJob:
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def eta_seconds(self) -> float | None:
        """Remaining time from the pace since the first step (model loading excluded)."""
        if self._first_step_at is None or self.step < 2:
            return None
        pace = (time.monotonic() - self._first_step_at) / (self.step - 1)
        return pace * (self.total_steps - self.step)

    def validation_images(self) -> list[Path]:
        return sorted((self.run_dir / "validation").glob("step-*.png"))

    def _on_step(self, step: int, loss: float) -> None:
        if self._first_step_at is None:
            self._first_step_at = time.monotonic()
        self.step, self.loss, self.state = step, loss, "training"
        if self._cancel.is_set():
            raise KeyboardInterrupt

    def _run(self) -> None:
        from sdlora.train.loop import train

        try:
            # Training a name again is the user asking for a new adapter of that name.
            trained = train(self.config, on_step=self._on_step, overwrite=True)
            self.adapter_path = self.adapters_dir / trained.name
            atomic_write(self.adapter_path, lambda temp: shutil.copyfile(trained, temp))
            self.state = "finished"
            self.message = f"adapter {self.adapter_path.stem} is ready in the Generate tab"
        except KeyboardInterrupt:
            self.state = "cancelled"
            self.message = (
                f"cancelled at step {self.step}; the last checkpoint is kept in "
                f"{self.run_dir / 'checkpoints'}"
            )
        except SdloraError as error:
            self.state, self.message = "failed", str(error)
        except Exception as error:  # noqa: BLE001 - the browser gets the reason, not a hang
            self.state, self.message = "failed", f"{type(error).__name__}: {error}"
        self.message += f" ({time.monotonic() - self._started:.0f} s)"


class Trainer:
    def __init__(self, folders: Folders):
        self.folders = folders
        self.lock = threading.Lock()
        self.job: TrainingJob | None = None

    def start(self, request: TrainingRequest) -> TrainingJob:
        with self.lock:
            if self.job is not None and self.job.running:
                raise SdloraError(
                    f"adapter {self.job.config.output.name!r} is training; one run at a time"
                )
            config = self.config_for(request)
            self.job = TrainingJob(config, self.folders.adapters).start()
            return self.job

    def config_for(self, request: TrainingRequest):
        """The preset with the request's choices; the images are copied into the run folder."""
        name = request.name.strip()
        trigger = request.trigger_word.strip()
        if not PLAIN_NAME.fullmatch(name):
            raise SdloraError("give the adapter a plain name (letters, digits, - _ . +)")
        if not trigger:
            raise SdloraError("give a trigger word, e.g. sks")
        if not 1 <= request.steps <= MAX_STEPS or not 1 <= request.rank <= MAX_RANK:
            raise SdloraError(f"steps must be 1-{MAX_STEPS} and rank 1-{MAX_RANK}")
        raw = yaml.safe_load(self.folders.preset(request.preset).read_text(encoding="utf-8"))
        run_dir = self.folders.adapters / "runs" / name
        data = raw.setdefault("data", {})
        data["instance_dir"] = str(self._images(request, run_dir / "images"))
        # A preset's originals pair with the preset's images, never with the user's.
        data["before_dir"] = (str(self.folders.data_folder(request.before_folder))
                              if request.before_folder.strip() else None)
        previous = data.get("trigger_word")
        data["instance_prompt"] = _with_trigger(data.get("instance_prompt", ""), previous, trigger)
        data["trigger_word"] = trigger
        validation = raw.setdefault("validation", {})
        validation["prompts"] = [
            _with_trigger(text, previous, trigger) for text in validation.get("prompts", [])
        ]
        lora = raw.setdefault("lora", {})
        ratio = float(lora.get("alpha", lora.get("rank", 1))) / float(lora.get("rank", 1))
        lora["rank"], lora["alpha"] = request.rank, ratio * request.rank
        raw.setdefault("train", {})["steps"] = request.steps
        raw["base"] = self.folders.base_source(request.base)
        raw["output"] = {**raw.get("output", {}), "dir": str(run_dir), "name": name}
        config = from_dict(raw)
        validate(config)
        return config

    def _images(self, request: TrainingRequest, destination: Path) -> Path:
        if request.folder.strip():
            return self.folders.data_folder(request.folder)
        if not request.uploads:
            raise SdloraError("upload some images or name a folder")
        if len(request.uploads) > MAX_UPLOADS:
            raise SdloraError(f"at most {MAX_UPLOADS} files per run")
        checked = [_checked_upload(Path(upload)) for upload in request.uploads]
        shutil.rmtree(destination, ignore_errors=True)  # a new run of this name: its own images
        destination.mkdir(parents=True)
        for upload in checked:
            shutil.copyfile(upload, destination / Path(upload).name)
        return destination


def _checked_upload(path: Path) -> Path:
    """An image (or caption) the trainer may read, or an error naming the file."""
    suffix = path.suffix.lower()
    if suffix not in (*IMAGE_SUFFIXES, CAPTION_SUFFIX):
        raise SdloraError(
            f"{path.name}: only {', '.join(IMAGE_SUFFIXES)} images and "
            f"{CAPTION_SUFFIX} captions can be uploaded"
        )
    if path.stat().st_size > MAX_UPLOAD_BYTES:
        raise SdloraError(f"{path.name} is larger than {MAX_UPLOAD_BYTES // 2**20} MB")
    if suffix != CAPTION_SUFFIX:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception:  # noqa: BLE001 - any decoder failure means "not an image"
            raise SdloraError(f"{path.name} is not a readable image") from None
    return path


def _with_trigger(text: str, previous: str | None, trigger: str) -> str:
    """The preset's prompt with its trigger word swapped for the user's (or the word alone)."""
    if previous and re.search(rf"\b{re.escape(previous)}\b", text):
        return re.sub(rf"\b{re.escape(previous)}\b", lambda _: trigger, text)
    return text or trigger
