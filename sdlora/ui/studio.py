"""What the Generate tab runs: a `GenerationSession` (the one `sdlora render` runs), shared by
every browser.

A request carries its whole mix: adapter weights from the sliders and from `<lora:name:w>`
tags in the prompt, per-component and per-block weights. The session's lock is held from "set
this mix" to the last denoising step, so two users with different sliders never generate on
each other's weights; each gets exactly the image a solo run (and `sdlora render`) gives.

Images are written as PNGs with the same settings `sdlora render` writes, into the user's
outputs folder (sdlora.ui.history), and `render_command` gives the `sdlora render` line that
draws the same images. An init image and mask are files in that folder's `inputs/` (the UI
saves uploads there), so the record names a file that `sdlora render --prompts x.png` re-reads.
"""

from __future__ import annotations

import secrets
import shlex
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import SdloraError
from sdlora.mix.block_weights import format_block_spec
from sdlora.mix.modes import DEFAULT_MIX_MODE
from sdlora.render.defaults import DEFAULT_CFG, DEFAULT_SCHEDULER, DEFAULT_STEPS
from sdlora.render.init_images import InitImage, read_init_images
from sdlora.render.prompts import prompt_row
from sdlora.render.session import GenerationSession, ImageRequest
from sdlora.ui.folders import AdapterInfo, Folders
from sdlora.ui.history import ImageHistory

MAX_STEPS = 150
MAX_BATCH = 8
MAX_SIZE = 2048
MAX_SEED = 2**32 - 1
PREVIEW_SIZE = 256  # an adapter's card picture, rendered on demand


@dataclass
class GenerationRequest:
    prompt: str
    base: str = ""  # the user's choice; "" is the operator's --base
    negative: str = ""
    seed: int = 0  # -1: a random seed, drawn per request and recorded
    steps: int = DEFAULT_STEPS
    cfg: float = DEFAULT_CFG
    width: int | None = None  # None: the base's own resolution
    height: int | None = None
    scheduler: str = DEFAULT_SCHEDULER
    clip_skip: int = 1
    batch: int = 1
    weights: dict[str, float] = field(default_factory=dict)  # adapter name -> weight
    block_weights: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {down: w}
    component_weights: dict[str, dict[str, float]] = field(default_factory=dict)  # {unet: w}
    init_image: str | None = None  # img2img: a file in the user's outputs/inputs
    mask: str | None = None  # inpainting: white = repaint, also in outputs/inputs
    strength: float | None = None
    hires_scale: float | None = None
    hires_strength: float | None = None
    mix_mode: str = DEFAULT_MIX_MODE

    def image_requests(self, seed: int) -> list[ImageRequest]:
        """The request as one `ImageRequest` per image of the batch (seeds counting up from
        `seed`, as `sdlora render --batch` does); <lora:> tags in the prompts join the mix.
        Refuses what a shared server should not run, before anything is loaded."""
        if max(self.width or 0, self.height or 0) > MAX_SIZE:
            raise SdloraError(f"width and height are limited to {MAX_SIZE}")
        if not 1 <= self.steps <= MAX_STEPS or not 1 <= self.batch <= MAX_BATCH:
            raise SdloraError(f"steps must be 1-{MAX_STEPS} and batch count 1-{MAX_BATCH}")
        row = prompt_row(self.prompt, self.negative, where="prompt")
        loras = {**self.weights, **row.loras}
        components = {**self.component_weights, **row.lora_components}
        requests = [
            ImageRequest(
                prompt=row.prompt,
                negative=row.negative or "",
                seed=seed + index,
                steps=self.steps,
                cfg=self.cfg,
                width=self.width,
                height=self.height,
                scheduler=self.scheduler,
                clip_skip=self.clip_skip,
                loras=loras,
                lora_components={k: v for k, v in components.items() if v},
                lora_blocks={k: v for k, v in self.block_weights.items() if v},
                lora_schedules=dict(row.lora_schedules),
                mix_mode=self.mix_mode,
                init_image=self.init_image,
                mask=self.mask,
                strength=self.strength,
                hires_scale=self.hires_scale,
                hires_strength=self.hires_strength,
            )
            for index in range(self.batch)
        ]
        for request in requests:
            request.check()
        return requests


@dataclass
class GeneratedImage:
    path: Path  # PNG with the settings inside
    caption: str  # the settings, as AUTOMATIC1111's infotext
    settings: dict


class Studio:
    """One loaded base for every browser; each user's pictures go to their own folder."""

    def __init__(self, folders: Folders):
        self.folders = folders
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.lock = threading.Lock()  # one base loaded at a time; the session locks the rest
        self._session: GenerationSession | None = None
        self._histories: dict[str | None, ImageHistory] = {}

    def history(self, user: str | None) -> ImageHistory:
        if user not in self._histories:
            self._histories[user] = ImageHistory(self.folders.outputs_for(user))
        return self._histories[user]

    def generate(self, request: GenerationRequest, user: str | None = None) -> list[GeneratedImage]:
        seed = secrets.randbelow(MAX_SEED + 1) if request.seed == -1 else request.seed
        images = request.image_requests(seed)
        source = self.folders.base_source(request.base)
        files = {name: self.folders.adapter_path(name, user) for name in images[0].active_loras}
        init = self._init_image(request, user)
        results = []
        with self.lock:
            session = self._use_base(source)
            session.use_adapters(files)
            for index, image_request in enumerate(images):
                results.append(session.generate(image_request, init, batch_index=index))
        paths = self.history(user).new_paths([rendered.record["seed"] for rendered in results])
        generated = []
        for path, rendered in zip(paths, results):
            rendered.write(path)
            generated.append(GeneratedImage(path, rendered.infotext, rendered.record))
        return generated

    def _init_image(self, request: GenerationRequest, user: str | None) -> InitImage | None:
        """The request's init image and mask, which must be files of the user's own folder
        (a PNG's record, loaded back, may name any path)."""
        if request.init_image is None:
            return None
        history = self.history(user)
        for path in filter(None, (request.init_image, request.mask)):
            if not history.owns(Path(path)) or not Path(path).is_file():
                raise SdloraError(f"init image {Path(path).name} is not in your outputs folder")
        (init,), _ = read_init_images(request.init_image, request.mask)
        return init

    def render_preview(self, adapter: AdapterInfo, base: str) -> Path:
        """Draw the adapter's card picture (its trigger words at weight 1, seed 0) on `base`
        and keep it beside the adapter, where the cards look first."""
        prompt = ", ".join(adapter.trigger_words) or adapter.name
        request = GenerationRequest(prompt=prompt, base=base, width=PREVIEW_SIZE,
                                    height=PREVIEW_SIZE)
        (image_request,) = request.image_requests(0)
        image_request.loras = {adapter.name: 1.0}
        with self.lock:
            session = self._use_base(self.folders.base_source(base))
            native = session.base.native_size
            image_request.width = image_request.height = min(native, PREVIEW_SIZE)
            session.use_adapters({adapter.name: adapter.path})
            rendered = session.generate(image_request)
        rendered.write(adapter.cached_preview)
        return adapter.cached_preview

    def _use_base(self, source: str) -> GenerationSession:
        if self._session is None or self._session.source != source:
            self._session = None  # free the old base before loading the next
            self._session = GenerationSession(
                source, self.device, embeddings_dir=self.folders.embeddings
            )
        return self._session

    def loaded_family(self, choice: str) -> str | None:
        """The family of the chosen base: from the loaded one, else from its config files."""
        session = self._session
        source = self.folders.base_source(choice)
        if session is not None and session.source == source:
            return session.base.family.name
        return self.folders.base_family(choice)

    def render_command(self, request: GenerationRequest, user: str | None = None) -> str:
        """`render_command`, with the base's own size filled in once that base is loaded."""
        session = self._session
        source = self.folders.base_source(request.base)
        native_size = session.base.native_size if session and session.source == source else None
        return render_command(request, self.folders, native_size, user)



def render_command(
    request: GenerationRequest,
    folders: Folders,
    native_size: int | None = None,
    user: str | None = None,
) -> str:
    """The `sdlora render` command line that renders what `request` generates; `native_size`
    (the base's own size) is written out for a size left to the base, as render's default
    is the family's resolution, which a small base may not share."""
    (first, *_) = request.image_requests(request.seed if request.seed != -1 else 0)
    words = ["sdlora", "render", "--base", folders.base_source(request.base)]
    if folders.embeddings is not None:
        words += ["--embeddings-dir", str(folders.embeddings)]
    for name, weight in first.active_loras.items():
        words += ["--lora", f"{folders.adapter_path(name, user)}:{weight:g}"]
    for name in first.active_loras:
        spec = format_block_spec(
            first.lora_components.get(name, {}), first.lora_blocks.get(name, {})
        )
        if spec:
            words += ["--block-weights", f"{name}={spec}"]
    # a weight schedule has no flag: its tag goes back into the prompt (it overrides --lora)
    scheduled = "".join(
        f" <lora:{name}:{first.loras[name]:g}{schedule}>"
        for name, schedule in first.lora_schedules.items()
    )
    words += ["--prompt", first.prompt + scheduled]
    if first.negative:
        words += ["--negative", first.negative]
    words += ["--seed", str(request.seed), "--steps", str(request.steps)]
    words += ["--cfg", f"{request.cfg:g}"]
    for flag, size in (("--width", request.width), ("--height", request.height)):
        if size or native_size:
            words += [flag, str(size or native_size)]
    words += ["--scheduler", request.scheduler]
    if request.mix_mode != DEFAULT_MIX_MODE:
        words += ["--mix-mode", request.mix_mode]
    if request.clip_skip != 1:
        words += ["--clip-skip", str(request.clip_skip)]
    for flag, value in (("--init-image", request.init_image), ("--mask", request.mask),
                        ("--strength", request.strength), ("--hires-scale", request.hires_scale),
                        ("--hires-strength", request.hires_strength)):
        if value is not None:
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    words += ["--batch", str(request.batch), "--out", "out/ui"]
    return shlex.join(words)
