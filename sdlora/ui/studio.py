"""What the Generate tab runs: one loaded base and its `Mixer`, shared by every browser.

A request carries its whole mix (adapter weights and per-block weights). The base, the mixer's
fused weights and the pipeline's scheduler are shared state, so one request at a time owns
them: `Studio.lock` is held from "load this base / these adapters" through `Mixer.using(mix)`
to the last denoising step. Two users with different sliders therefore never generate on each
other's weights; they take turns, and each gets exactly the image a solo run gives (the mixer
is reproducible: fused weights depend on the mix alone, not on the mix before it).

Images are written as PNGs with the same settings text `sdlora render` writes, and
`render_command` gives the `sdlora render` line that produces the same images.
"""

from __future__ import annotations

import json
import shlex
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

import sdlora
from sdlora.errors import SdloraError
from sdlora.render.png import a1111_parameters, lora_hash, model_hash, write_png
from sdlora.render.prompts import check_size
from sdlora.render.schedulers import build_scheduler, get_sampler
from sdlora.ui.folders import Folders

MAX_STEPS = 150
MAX_BATCH = 8
MAX_SIZE = 2048


@dataclass
class GenerationRequest:
    prompt: str
    base: str = ""  # the user's choice; "" is the operator's --base
    negative: str = ""
    seed: int = 0
    steps: int = 20
    cfg: float = 7.0
    width: int | None = None  # None: the base's own resolution
    height: int | None = None
    scheduler: str = "euler_a"
    batch: int = 1
    weights: dict[str, float] = field(default_factory=dict)  # adapter name -> weight
    block_weights: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {down: w}

    def check(self) -> None:
        """Refuse what a shared server should not run, before anything is loaded."""
        get_sampler(self.scheduler)
        check_size(self.width, self.height, "size")
        if max(self.width or 0, self.height or 0) > MAX_SIZE:
            raise SdloraError(f"width and height are limited to {MAX_SIZE}")
        if not 1 <= self.steps <= MAX_STEPS or not 1 <= self.batch <= MAX_BATCH:
            raise SdloraError(f"steps must be 1-{MAX_STEPS} and batch count 1-{MAX_BATCH}")

    @property
    def active_weights(self) -> dict[str, float]:
        return {name: weight for name, weight in self.weights.items() if weight}


@dataclass
class GeneratedImage:
    path: Path  # PNG with the settings inside
    caption: str  # the settings, as AUTOMATIC1111's infotext
    settings: dict


@dataclass
class _LoadedBase:
    source: str
    base: object  # sdlora.base.models.Base
    mixer: object  # sdlora.mix.mixer.Mixer
    scheduler_config: dict
    model_hash: str | None
    # adapter name -> (file, mtime in ns): a file rewritten by training is loaded again
    adapter_files: dict[str, tuple[Path, int]] = field(default_factory=dict)
    lora_hashes: dict[str, str] = field(default_factory=dict)


class Studio:
    def __init__(self, folders: Folders, output_dir: Path | None = None):
        self.folders = folders
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="sdlora-ui-"))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.lock = threading.Lock()
        self._loaded: _LoadedBase | None = None
        self._counter = 0

    def generate(self, request: GenerationRequest) -> list[GeneratedImage]:
        request.check()
        source = self.folders.base_source(request.base)
        files = {name: self.folders.adapter_path(name) for name in request.active_weights}
        results = []
        with self.lock:
            loaded = self._use_base(source)
            self._use_adapters(loaded, files)
            mix = {name: request.weights.get(name, 0.0) for name in loaded.adapter_files}
            pipeline = loaded.base.pipeline
            with loaded.mixer.using(mix), torch.inference_mode():
                for name in files:
                    loaded.mixer.set_block_weights(name, request.block_weights.get(name, {}))
                pipeline.scheduler = build_scheduler(request.scheduler, loaded.scheduler_config)
                for index in range(request.batch):
                    settings = self._settings(request, loaded, index)
                    image = pipeline(
                        prompt=request.prompt,
                        negative_prompt=request.negative or None,
                        num_inference_steps=request.steps,
                        guidance_scale=request.cfg,
                        width=settings["width"],
                        height=settings["height"],
                        generator=torch.Generator("cpu").manual_seed(settings["seed"]),
                    ).images[0]
                    results.append((image, settings))
            self._counter += len(results)
            first_number = self._counter - len(results)
        return [
            self._write(image, settings, loaded, first_number + offset, request.scheduler)
            for offset, (image, settings) in enumerate(results)
        ]

    # -- loading, under the lock -------------------------------------------------------------

    def _use_base(self, source: str) -> _LoadedBase:
        if self._loaded is not None and self._loaded.source == source:
            return self._loaded
        from sdlora.base.models import load_base
        from sdlora.mix.mixer import Mixer

        self._loaded = None  # free the old base before loading the next
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        base = load_base(source, torch_dtype=dtype)
        base.pipeline.to(self.device)
        base.pipeline.set_progress_bar_config(disable=True)
        self._loaded = _LoadedBase(
            source=source,
            base=base,
            mixer=Mixer(base.pipeline),
            scheduler_config=base.pipeline.scheduler.config,
            model_hash=model_hash(source),
        )
        return self._loaded

    @staticmethod
    def _use_adapters(loaded: _LoadedBase, files: dict[str, Path]) -> None:
        """Load adapters not yet in the mixer; reload one whose file changed (retrained)."""
        from sdlora.adapters.read import load_adapter

        for name, path in files.items():
            stamp = path.stat().st_mtime_ns
            if loaded.adapter_files.get(name) == (path, stamp):
                continue
            if name in loaded.adapter_files:
                loaded.mixer.remove(name)
                del loaded.adapter_files[name]
            loaded.mixer.add(load_adapter(path, name=name), 0.0)
            loaded.adapter_files[name] = (path, stamp)
            loaded.lora_hashes[name] = lora_hash(path)

    def _settings(self, request: GenerationRequest, loaded: _LoadedBase, index: int) -> dict:
        """The `sdlora` PNG chunk, with the keys `sdlora render` writes."""
        default_size = loaded.base.native_size
        loras = request.active_weights
        return {
            "version": sdlora.__version__,
            "base": loaded.source,
            "model_hash": loaded.model_hash,
            "family": loaded.base.family.name,
            "prompt": request.prompt,
            "negative": request.negative,
            "seed": request.seed + index,
            "steps": request.steps,
            "cfg": request.cfg,
            "width": request.width or default_size,
            "height": request.height or default_size,
            "scheduler": request.scheduler,
            "loras": loras,
            "lora_blocks": {
                name: request.block_weights[name]
                for name in loras
                if request.block_weights.get(name)
            },
            "lora_files": {
                name: {"path": str(loaded.adapter_files[name][0]), "hash": loaded.lora_hashes[name]}
                for name in loras
            },
            "batch_index": index,
        }

    def _write(
        self, image, settings: dict, loaded: _LoadedBase, number: int, scheduler: str
    ) -> GeneratedImage:
        source = Path(loaded.source.rstrip("/\\"))
        model_name = source.stem if source.is_file() else source.name
        caption = a1111_parameters(
            settings, get_sampler(scheduler), loaded.model_hash, model_name, loaded.lora_hashes
        )
        path = self.output_dir / f"{number:05d}-{settings['seed']}.png"
        texts = {"parameters": caption, "sdlora": json.dumps(settings, sort_keys=True)}
        write_png(image, path, texts)
        return GeneratedImage(path, caption, settings)

    def render_command(self, request: GenerationRequest) -> str:
        """`render_command`, with the base's own size filled in once that base is loaded."""
        loaded = self._loaded
        source = self.folders.base_source(request.base)
        native_size = loaded.base.native_size if loaded and loaded.source == source else None
        return render_command(request, self.folders, native_size)


def render_command(
    request: GenerationRequest, folders: Folders, native_size: int | None = None
) -> str:
    """The `sdlora render` command line that renders what `request` generates; `native_size`
    (the base's own size) is written out for a size left to the base, as render's default
    is the family's resolution, which a small base may not share."""
    words = ["sdlora", "render", "--base", folders.base_source(request.base)]
    for name, weight in request.active_weights.items():
        words += ["--lora", f"{folders.adapter_path(name)}:{weight:g}"]
    words += ["--prompt", request.prompt]
    if request.negative:
        words += ["--negative", request.negative]
    words += [
        "--seed",
        str(request.seed),
        "--steps",
        str(request.steps),
        "--cfg",
        f"{request.cfg:g}",
    ]
    for flag, size in (("--width", request.width), ("--height", request.height)):
        if size or native_size:
            words += [flag, str(size or native_size)]
    words += ["--scheduler", request.scheduler, "--batch", str(request.batch), "--out", "out/ui"]
    command = shlex.join(words)
    blocks = {
        name: request.block_weights[name]
        for name in request.active_weights
        if request.block_weights.get(name)
    }
    if blocks:
        command += f"\n# per-block weights have no render flag: {json.dumps(blocks)}"
    return command
