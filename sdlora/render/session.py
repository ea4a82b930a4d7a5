"""One generation session: what `sdlora render` and the web UI's Generate tab both run.

    ImageRequest (everything that decides one picture: prompt, seed, sampler, size, clip skip,
    each adapter's weight with its per-component and per-block multipliers and its schedule
    over the steps, the mix mode, img2img inputs)
      -> GenerationSession.record(request): the request with the base's defaults filled in and
         the files it used identified by hash; written into the PNG's `sdlora` chunk, and what
         "is this existing file the picture I was asked for?" compares (`same_picture`)
      -> GenerationSession.generate(request): under the session's lock, the mix is fused into
         the weights (a pure function of the mix: the same bits whatever was rendered before),
         the scheduler built, the textual-inversion embeddings the prompts name loaded (only
         those: sdlora.render.embeddings), the prompt encoded, and the picture drawn with a CPU
         generator seeded by the request's seed (the same noise on any device); adapters with
         a weight schedule are re-weighted on the UNet between steps (`schedule_hook`)
      -> RenderedImage: the PIL image, its record and its A1111 infotext; `write_image` saves it

Precision: float16 on CUDA, float32 elsewhere.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import sdlora
from sdlora.errors import SdloraError
from sdlora.mix.modes import DEFAULT_MIX_MODE, check_mix_mode
from sdlora.mix.schedules import parse_schedule, schedule_hook
from sdlora.render.defaults import DEFAULT_CFG, DEFAULT_SCHEDULER, DEFAULT_STEPS, MAX_CLIP_SKIP
from sdlora.render.embeddings import SessionEmbeddings
from sdlora.render.init_images import InitImage, check_image_options, init_output_size
from sdlora.render.pipelines import Hires, generate_image
from sdlora.render.png import a1111_parameters, file_sha256, lora_hash, model_hash, write_png
from sdlora.render.prompt_embeds import encode_prompts
from sdlora.render.prompts import check_size
from sdlora.render.schedulers import build_scheduler, get_sampler

# Record keys that say where a picture sits in a run, not what it shows.
_PLACE_KEYS = ("version", "index", "prompt_index", "batch_index")


@dataclass
class ImageRequest:
    """Everything that decides one picture. Weights are per adapter name; an adapter's
    components (unet, text_encoder, text_encoder_2) and UNet blocks (down, mid.., see
    sdlora.mix.block_weights) multiply its weight where named."""

    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = DEFAULT_STEPS
    cfg: float = DEFAULT_CFG
    width: int | None = None  # None: the base's own resolution
    height: int | None = None
    scheduler: str = DEFAULT_SCHEDULER
    clip_skip: int = 1  # A1111's numbering: 1 is the last layer
    loras: dict[str, float] = field(default_factory=dict)
    lora_components: dict[str, dict[str, float]] = field(default_factory=dict)
    lora_blocks: dict[str, dict[str, float]] = field(default_factory=dict)
    init_image: str | None = None  # img2img: the input picture's file
    mask: str | None = None  # inpainting: white = repaint
    strength: float | None = None  # img2img's denoising strength
    hires_scale: float | None = None  # hires fix: upscale factor of the txt2img picture
    hires_strength: float | None = None
    # adapter name -> weight schedule over the steps ("@0.5-1", "~1": sdlora.mix.schedules)
    lora_schedules: dict[str, str] = field(default_factory=dict)
    mix_mode: str = DEFAULT_MIX_MODE  # how the adapters' updates combine (sdlora.mix.modes)

    def check(self) -> None:
        """Refuse a request that cannot give the picture asked for, before anything loads."""
        get_sampler(self.scheduler)
        check_size(self.width, self.height, "size")
        if self.steps < 1:
            raise SdloraError(f"steps must be at least 1, not {self.steps}")
        if not math.isfinite(self.cfg):
            raise SdloraError(f"CFG scale must be a finite number, not {self.cfg}")
        if not 0 <= self.seed < 2**64:
            raise SdloraError(f"seed must be 0 to 2^64-1 (or -1 for a random one), not {self.seed}")
        if not 1 <= self.clip_skip <= MAX_CLIP_SKIP:
            raise SdloraError(f"clip skip must be 1-{MAX_CLIP_SKIP}, not {self.clip_skip}")
        for name, weight in self.loras.items():
            if not math.isfinite(weight):
                raise SdloraError(f"weight of {name!r} must be a finite number, not {weight}")
        check_mix_mode(self.mix_mode)
        for name, schedule in self.lora_schedules.items():
            parse_schedule(schedule, f"schedule of {name!r}")
        check_image_options(init_image=self.init_image, mask=self.mask, strength=self.strength,
                            hires_scale=self.hires_scale, hires_strength=self.hires_strength)

    @property
    def active_loras(self) -> dict[str, float]:
        return {name: weight for name, weight in self.loras.items() if weight}


@dataclass
class RenderedImage:
    image: object  # PIL.Image
    record: dict  # the `sdlora` PNG chunk
    infotext: str  # the `parameters` PNG chunk, A1111's format

    def write(self, path: Path) -> None:
        write_png(self.image, path, self.record, self.infotext)


def _file_entry(path: str | None) -> dict | None:
    """An input file as recorded: where it was and what it held (sha256)."""
    return {"path": path, "hash": file_sha256(Path(path))[:16]} if path else None


def same_picture(recorded: dict | None, record: dict) -> bool:
    """Whether a file's recorded settings ask for the same picture as `record` (its place in a
    run and the sdlora version aside): only then may a run re-use the file."""
    return recorded is not None and _decisive(recorded) == _decisive(record)


def _decisive(record: dict) -> dict:
    """A record without its place in a run, its adapters named by content (hash), not path."""
    decisive = {key: value for key, value in record.items() if key not in _PLACE_KEYS}
    for key in ("init_image", "mask"):
        if isinstance(decisive.get(key), dict):
            decisive[key] = decisive[key].get("hash")
    for key in ("lora_files", "embeddings"):
        if isinstance(decisive.get(key), dict):
            decisive[key] = {
                name: entry.get("hash") if isinstance(entry, dict) else entry
                for name, entry in decisive[key].items()
            }
    return decisive


class GenerationSession:
    """A loaded base and its Mixer; generates one request at a time (`lock`).
    `embeddings_dir`: A1111's embeddings folder (see sdlora.render.embeddings)."""

    def __init__(self, source: str, device: torch.device | None = None,
                 embeddings_dir: str | Path | None = None):
        import diffusers
        import transformers

        from sdlora.base.models import load_base
        from sdlora.mix.mixer import Mixer

        # our bars count images; the libraries' loading bars would only interleave with them
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        self.source = source
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.base = load_base(source, torch_dtype=dtype)
        self.pipeline = self.base.pipeline.to(self.device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.scheduler_config = self.pipeline.scheduler.config
        self.mixer = Mixer(self.pipeline)
        self.embeddings = SessionEmbeddings(self.pipeline, embeddings_dir)
        self.model_hash = model_hash(source)
        path = Path(source.rstrip("/\\"))
        self.model_name = path.stem if path.is_file() else path.name
        self.lock = threading.RLock()
        # adapter name -> (file, mtime in ns): a file rewritten by training is loaded again
        self.adapter_files: dict[str, tuple[Path, int]] = {}
        self.lora_hashes: dict[str, str] = {}
        self._parts: dict[str, tuple[dict, dict]] = {}  # component and block weights as set

    # -- adapters ----------------------------------------------------------------------------

    def use_adapters(self, files: dict[str, Path]) -> None:
        """Load adapters not yet in the mixer (at weight 0); reload one whose file changed."""
        from sdlora.adapters.read import load_adapter

        with self.lock:
            for name, path in files.items():
                path = Path(path)
                stamp = path.stat().st_mtime_ns
                if self.adapter_files.get(name) == (path, stamp):
                    continue
                if name in self.adapter_files:
                    self.mixer.remove(name)
                    self._parts.pop(name, None)
                adapter = load_adapter(path, name=name)
                self.mixer.add(adapter, 0.0)
                self.adapter_files[name] = (path, stamp)
                self.lora_hashes[name] = lora_hash(path)
                self.embeddings.set_bundled(name, path, adapter.embeddings, self.lora_hashes[name])

    # -- one picture -------------------------------------------------------------------------

    def record(self, request: ImageRequest, init: InitImage | None = None, **place) -> dict:
        """The `sdlora` PNG chunk for `request`: defaults filled in, files named with hashes.
        `init` is the request's init image, already checked; `place` adds where the picture
        sits in a run (index, prompt_index, batch_index)."""
        missing = sorted(set(request.active_loras) - set(self.adapter_files))
        if missing:
            raise SdloraError(f"adapter {missing[0]!r} is not loaded in this session")
        size = self.base.native_size
        if init is not None:
            width, height = init_output_size(
                init.size, request.width, request.height, self.pipeline.vae_scale_factor
            )
        else:
            width, height = request.width or size, request.height or size
        loras = request.active_loras
        record = {
            "version": sdlora.__version__,
            "base": self.source,
            "model_hash": self.model_hash,
            "family": self.base.family.name,
            **asdict(request),
            "width": width,
            "height": height,
            "init_image": _file_entry(request.init_image),
            "mask": _file_entry(request.mask),
            "loras": loras,
            "lora_components": {
                name: parts for name, parts in request.lora_components.items()
                if name in loras and parts
            },
            "lora_blocks": {
                name: parts for name, parts in request.lora_blocks.items()
                if name in loras and parts
            },
            "lora_schedules": {
                name: schedule for name, schedule in request.lora_schedules.items()
                if name in loras
            },
            "lora_files": {
                name: {"path": str(self.adapter_files[name][0]), "hash": self.lora_hashes[name]}
                for name in loras
            },
            **place,
        }
        used = self.embeddings.used(request.prompt, request.negative, list(loras))
        if used:  # only then: records made before embeddings existed stay the same pictures
            record["embeddings"] = {name: item.record() for name, item in used.items()}
        return record

    def generate(
        self, request: ImageRequest, init: InitImage | None = None,
        record: dict | None = None, **place
    ) -> RenderedImage:
        """Draw `request` (see the module docstring); the lock is held throughout. `record`:
        what `record(request, init, **place)` returned, when the caller already asked for it
        (it hashes the input files and looks up embeddings)."""
        request.check()
        image, mask = init.load() if init is not None else (None, None)
        with self.lock:
            record = record or self.record(request, init, **place)
            self._apply_mix(request)
            self.pipeline.scheduler = build_scheduler(request.scheduler, self.scheduler_config)
            generator = torch.Generator("cpu").manual_seed(request.seed)
            used = self.embeddings.used(request.prompt, request.negative, list(request.active_loras))
            self.embeddings.activate(used)
            with torch.inference_mode():
                conditioning = encode_prompts(
                    self.pipeline,
                    self.embeddings.rewrite(request.prompt, used),
                    self.embeddings.rewrite(request.negative, used),
                    request.clip_skip,
                )
                hires = None
                if request.hires_scale:
                    hires = Hires(request.hires_scale, request.hires_strength)
                image = generate_image(
                    self.pipeline,
                    conditioning=conditioning,
                    steps=request.steps,
                    cfg=request.cfg,
                    width=record["width"],
                    height=record["height"],
                    generator=generator,
                    init_image=image,
                    mask=mask,
                    strength=request.strength,
                    hires=hires,
                    step_hook=schedule_hook(self.mixer, request.active_loras,
                                            request.lora_schedules),
                )
        infotext = a1111_parameters(record, get_sampler(request.scheduler), self.model_name)
        return RenderedImage(image, record, infotext)

    def _apply_mix(self, request: ImageRequest) -> None:
        """Fuse the request's mix: every loaded adapter at its weight (0 when not named), with
        its component and block multipliers; parts are re-set only where they changed."""
        weights = {name: request.loras.get(name, 0.0) for name in self.adapter_files}
        self.mixer.set_mode(request.mix_mode)
        self.mixer.set_weights(weights)
        for name, weight in weights.items():
            parts = (
                (request.lora_components.get(name, {}), request.lora_blocks.get(name, {}))
                if weight
                else ({}, {})
            )
            if self._parts.get(name, ({}, {})) != parts:
                self.mixer.set_component_weights(name, parts[0])
                self.mixer.set_block_weights(name, parts[1])
                self._parts[name] = parts
