"""What the Train tab runs: a preset config with the user's few choices, trained in a thread.

    preset (configs/*.yaml) + base, images (and their unstyled originals), name, trigger word,
    steps, rank, learning rate, resolution, targets, text encoder -> Config
    -> sdlora.train.loop.train in a background thread, `on_step` recording step and loss
    -> the run folder {adapters}[/{user}]/{name}/: the adapter {name}.safetensors beside its
       checkpoints and validation grids, where the Generate tab's scan finds it (its newest
       grid is its card picture)

A name already taken in the user's folder gets a number (`ink-2`): a run never overwrites
another. Cancel makes the next `on_step` raise KeyboardInterrupt: the loop saves a checkpoint
and stops. One run trains at a time (it takes the whole machine); later ones wait in a queue.
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
    before_uploads: list[str] = field(default_factory=list)  # ... or uploaded, same file names
    learning_rate: float | None = None  # None: the preset's
    resolution: int | None = None
    targets: str | None = None  # attention | transformer | full
    text_encoder: bool | None = None
    paired_target: str | None = None  # picture | change (train.paired_target), with originals


class TrainingJob:
    """One run in a background thread; its fields are read by the UI while it trains."""

    def __init__(self, config, machine: threading.Lock):
        self.config = config
        self.total_steps = config.train.steps
        self.step = 0
        self.loss: float | None = None
        self.losses: list[tuple[int, float]] = []  # (step, loss) for the chart
        self.state = "queued"  # queued, starting, training, finished, cancelled, failed
        self.message = ""
        self._started = time.monotonic()
        self._first_step_at: float | None = None
        self._cancel = threading.Event()
        self._machine = machine  # held while training: one run at a time
        self._thread = threading.Thread(
            target=self._run, name=f"train-{config.output.name}", daemon=True
        )

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output.dir)

    @property
    def running(self) -> bool:
        return self.state in ("queued", "starting", "training")

    @property
    def adapter_path(self) -> Path:
        return self.run_dir / f"{self.config.output.name}.safetensors"

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
        self.losses.append((step, loss))
        if self._cancel.is_set():
            raise KeyboardInterrupt

    def _run(self) -> None:
        from sdlora.train.loop import train

        with self._machine:
            if self._cancel.is_set():
                self.state, self.message = "cancelled", "cancelled while waiting for its turn"
                return
            self.state, self._started = "starting", time.monotonic()
            try:
                train(self.config, on_step=self._on_step)
                self.state = "finished"
                self.message = f"adapter {self.config.output.name} is ready in the Generate tab"
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
        self.lock = threading.Lock()  # names are taken one request at a time
        self.machine = threading.Lock()  # held by the run that trains
        self.jobs: list[TrainingJob] = []

    def start(self, request: TrainingRequest, user: str | None = None) -> TrainingJob:
        """Queue a run; it trains when the runs before it are done."""
        with self.lock:
            job = TrainingJob(self.config_for(request, user), self.machine)
            self.jobs = [*(queued for queued in self.jobs if queued.running), job]
            return job.start()

    def place_in_queue(self, job: TrainingJob) -> int:
        """How many runs train or wait before `job`."""
        waiting = [queued for queued in self.jobs if queued.running]
        return waiting.index(job) if job in waiting else 0

    def config_for(self, request: TrainingRequest, user: str | None = None):
        """The preset with the request's choices; the images are copied into the run folder,
        a new folder of the user's named after the adapter."""
        name = request.name.strip()
        trigger = request.trigger_word.strip()
        if not PLAIN_NAME.fullmatch(name):
            raise SdloraError("give the adapter a plain name (letters, digits, - _ . +)")
        if not trigger:
            raise SdloraError("give a trigger word, e.g. sks")
        if not 1 <= request.steps <= MAX_STEPS or not 1 <= request.rank <= MAX_RANK:
            raise SdloraError(f"steps must be 1-{MAX_STEPS} and rank 1-{MAX_RANK}")
        if request.before_uploads and not request.folder.strip():
            _check_pairs(request.uploads, request.before_uploads)
        raw = yaml.safe_load(self.folders.preset(request.preset).read_text(encoding="utf-8"))
        name = _unused_name(self.folders.adapters_for(user), name)
        run_dir = self.folders.adapters_for(user) / name
        try:
            return self._configured(raw, request, run_dir, name)
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)  # a refused run keeps no folder, nor its name
            raise

    def _configured(self, raw: dict, request: TrainingRequest, run_dir: Path, name: str):
        """The preset `raw` with the request's choices, its uploads copied into `run_dir`."""
        trigger = request.trigger_word.strip()
        data = raw.setdefault("data", {})
        data["instance_dir"] = str(self._images(request, run_dir / "images"))
        # A preset's originals pair with the preset's images, never with the user's.
        data["before_dir"] = self._originals(request, run_dir / "originals")
        if not data["before_dir"]:
            if request.paired_target == "change":
                raise SdloraError("learning only what the style changes needs the originals: "
                                  "upload them or name their folder")
            raw.setdefault("train", {})["paired_target"] = "picture"  # the preset's is for pairs
        previous = data.get("trigger_word")
        data["instance_prompt"] = _with_trigger(data.get("instance_prompt", ""), previous, trigger)
        data["trigger_word"] = trigger
        validation = raw.setdefault("validation", {})
        # Every run shows previews, also from a preset without validation prompts (the demo's):
        # its instance prompt, at about four points of the run and at its end.
        validation["prompts"] = [
            _with_trigger(text, previous, trigger) for text in validation.get("prompts", [])
        ] or [data["instance_prompt"]]
        validation["every"] = validation.get("every") or max(1, request.steps // 4)
        lora = raw.setdefault("lora", {})
        ratio = float(lora.get("alpha", lora.get("rank", 1))) / float(lora.get("rank", 1))
        lora["rank"], lora["alpha"] = request.rank, ratio * request.rank
        train_settings = raw.setdefault("train", {})
        train_settings["steps"] = request.steps
        for section, key, value in (("train", "learning_rate", request.learning_rate),
                                    ("data", "resolution", request.resolution),
                                    ("lora", "targets", request.targets),
                                    ("lora", "text_encoder", request.text_encoder),
                                    ("train", "paired_target", request.paired_target)):
            if value is not None:
                raw.setdefault(section, {})[key] = value
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
        return _copy_uploads(request.uploads, destination)

    def _originals(self, request: TrainingRequest, destination: Path) -> str | None:
        if request.before_folder.strip():
            return str(self.folders.data_folder(request.before_folder))
        if request.before_uploads:
            return str(_copy_uploads(request.before_uploads, destination))
        return None


def _unused_name(folder: Path, name: str) -> str:
    """`name`, or `name-2`, `name-3`... when a run or adapter of that name is in `folder`."""
    candidate, number = name, 1
    while (folder / candidate).exists() or (folder / f"{candidate}.safetensors").exists():
        number += 1
        candidate = f"{name}-{number}"
    return candidate


def _check_pairs(uploads: list[str], originals: list[str]) -> None:
    """Refuse, before the run queues, uploaded images without an uploaded original of the same
    name (a.png may pair with a.jpg): the trainer would fail on them only when its turn came."""
    names = {Path(original).stem for original in originals}
    images = [Path(upload).name for upload in uploads if Path(upload).suffix.lower() != CAPTION_SUFFIX]
    missing = [name for name in images if Path(name).stem not in names]
    if missing:
        raise SdloraError(f"no original for {len(missing)} of the {len(images)} images (first: "
                          f"{missing[0]}): upload each one's unstyled picture under its file name")


def _copy_uploads(uploads: list[str], destination: Path) -> Path:
    checked = [_checked_upload(Path(upload)) for upload in uploads]
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
