"""One picture from a loaded pipeline: txt2img, img2img, inpainting, and the hires fix.

`generate_image` is what the render session calls per image. The base pipeline (SD 1.x/2.x
`StableDiffusionPipeline` or `StableDiffusionXLPipeline`) does txt2img; img2img and inpainting
run diffusers' Img2Img/Inpaint pipelines built from the same module objects
(`AutoPipelineFor*.from_pipe`), so the Mixer's fused weights, the device and the dtype are
theirs too, and no weight is copied. They are built once per base pipeline and take the base's
current scheduler (class and config) at every call.

Shapes: PIL images in and out. The init image is resized (Lanczos) to the output size, a
multiple of the VAE's scale factor (8); its latents are (1, 4, h/8, w/8), noised to the
strength's step and denoised for about strength x steps steps.

Choices, following AUTOMATIC1111 where it has one:
- strength s runs int(s x steps) steps (diffusers' rule) but at least one, like A1111, which
  also denoises one step at strength 0; strength 1 starts from pure noise;
- inpainting works with regular 4-channel UNets (diffusers blends the kept region's latents
  back at every step); the mask is blurred by A1111's default 4 px and, like A1111, the
  decoded picture is pasted over the original through that mask, so the kept region is the
  input's own pixels, not a VAE round trip of them;
- hires fix: txt2img at the requested size, the decoded picture upscaled with Lanczos, then
  img2img at the upscaled size with the same conditioning and the same seed. A1111's default
  upscaler is "Latent" (upscaling latents), which blurs below a strength of about 0.5; an
  image-space upscale works at any strength and is what diffusers' img2img takes.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image, ImageFilter

from sdlora.errors import SdloraError
from sdlora.render.init_images import DEFAULT_STRENGTH, fit_size, init_output_size

MASK_BLUR = 4  # pixels; A1111's "Mask blur" default


@dataclass(frozen=True)
class Hires:
    """A1111's hires fix: upscale the txt2img picture by `scale`, repaint at `strength`."""

    scale: float
    strength: float


def generate_image(
    pipeline,
    *,
    conditioning: dict,
    steps: int,
    cfg: float,
    width: int | None,
    height: int | None,
    generator: torch.Generator,
    init_image: Image.Image | None = None,
    mask: Image.Image | None = None,
    strength: float = DEFAULT_STRENGTH,
    hires: Hires | None = None,
    step_hook: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """Render one picture with `pipeline` and return it.

    `conditioning` holds the pipeline keyword arguments that carry the prompt (`prompt` and
    `negative_prompt`, or `prompt_embeds`, `negative_prompt_embeds` and for SDXL the pooled
    ones) and is passed through unchanged. Without `init_image`: txt2img at width x height,
    then the hires fix if asked. With it: img2img (inpainting when `mask`, L mode, white =
    repaint, the image's size) at `strength`; the output has width x height when both are
    given, else the image's aspect ratio, rounded down to the VAE multiple.

    `step_hook(step, steps)`, when given, runs before every denoising step of every pass (0 to
    steps - 1 of that pass; the weight schedules of sdlora.mix.schedules). Step 0 is announced
    before the pass knows its length, with the nominal `steps`; later steps come from
    diffusers' `callback_on_step_end` with the pass's own count.
    """
    run = functools.partial(_run, step_hook=step_hook)
    if init_image is None:
        if mask is not None:
            raise ValueError("a mask needs an init image")
        seed_state = generator.get_state()  # the hires pass starts from the same seed
        picture = run(
            pipeline,
            conditioning,
            steps,
            cfg,
            generator,
            width=width,
            height=height,
        )
        if hires is None:
            return picture
        reseeded = torch.Generator(generator.device).set_state(seed_state)
        return _hires_pass(run, pipeline, picture, hires, conditioning, steps, cfg, reseeded)
    if hires is not None:
        raise ValueError("the hires fix applies to txt2img only")
    size = init_output_size(init_image.size, width, height, pipeline.vae_scale_factor)
    source = _resized(init_image, size, Image.LANCZOS)
    if mask is None:
        return _img2img(run, pipeline, source, strength, conditioning, steps, cfg, generator)
    if mask.size != init_image.size:
        raise SdloraError(
            f"mask is {mask.size[0]}x{mask.size[1]} but the init image is "
            f"{init_image.size[0]}x{init_image.size[1]}; masks must have the image's size"
        )
    soft_mask = _resized(mask.convert("L"), size, Image.BILINEAR)
    soft_mask = soft_mask.filter(ImageFilter.GaussianBlur(MASK_BLUR))
    painted = run(
        variant(pipeline, "inpaint"),
        conditioning,
        steps,
        cfg,
        generator,
        image=source,
        mask_image=soft_mask,  # diffusers binarises it at 0.5 for the latent blend
        width=size[0],
        height=size[1],
        strength=_steps_strength(strength, steps),
    )
    return Image.composite(painted, source, soft_mask)


def variant(pipeline, task: str):
    """The base pipeline's "img2img" or "inpaint" twin: same modules, built once per base,
    with a fresh scheduler of the base's current class and config at every call (a scheduler
    keeps per-run state, so two pipelines must not share one object)."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    twins = _VARIANTS.setdefault(pipeline, {})
    twin = twins.get(task)
    if twin is None or not _shares_modules(twin, pipeline):
        builder = {"img2img": AutoPipelineForImage2Image, "inpaint": AutoPipelineForInpainting}
        twin = twins[task] = builder[task].from_pipe(pipeline)
    twin.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config)
    # the session may have silenced the base's progress bar; the twin follows it
    twin.set_progress_bar_config(**getattr(pipeline, "_progress_bar_config", {}))
    return twin


# base pipeline -> {task: twin}; weak, so that dropping a base frees its twins
_VARIANTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _shares_modules(twin, pipeline) -> bool:
    """False once the base's modules were replaced (another VAE, a reloaded UNet)."""
    return all(
        getattr(twin, name, None) is module
        for name, module in pipeline.components.items()
        if name != "scheduler"
    )


def _hires_pass(run, pipeline, picture, hires, conditioning, steps, cfg, generator) -> Image.Image:
    size = fit_size(
        int(picture.width * hires.scale),
        int(picture.height * hires.scale),
        pipeline.vae_scale_factor,
    )
    source = picture.resize(size, Image.LANCZOS)
    return _img2img(run, pipeline, source, hires.strength, conditioning, steps, cfg, generator)


def _img2img(run, pipeline, source, strength, conditioning, steps, cfg, generator) -> Image.Image:
    """`source` repainted at `strength` (img2img itself, and the hires fix's second pass)."""
    return run(
        variant(pipeline, "img2img"),
        conditioning,
        steps,
        cfg,
        generator,
        image=source,
        strength=_steps_strength(strength, steps),
    )


def _run(pipeline, conditioning, steps, cfg, generator, step_hook=None, **task) -> Image.Image:
    if step_hook is not None:
        step_hook(0, steps)
        task["callback_on_step_end"] = step_callback(step_hook)
    return pipeline(
        **conditioning,
        **task,
        num_inference_steps=steps,
        guidance_scale=cfg,
        generator=generator,
    ).images[0]


def step_callback(step_hook):
    """diffusers' `callback_on_step_end` that runs `step_hook(step, steps)` before each step
    after the first (the caller runs step 0's: a pass announces it before it starts)."""
    def next_step(pipe, step, timestep, tensors):
        if step + 1 < pipe.num_timesteps:
            step_hook(step + 1, pipe.num_timesteps)
        return {}

    return next_step


def _steps_strength(strength: float, steps: int) -> float:
    """The strength to hand diffusers so that it runs max(1, int(strength x steps)) steps.

    diffusers runs int(strength x steps) steps and fails on 0. Between two whole step counts
    the strength changes nothing (it only picks the starting timestep), so the middle of the
    interval is passed, which no rounding of strength x steps can push to a neighbour; 1.0
    stays 1.0, which inpainting reads as "start from pure noise".
    """
    if strength >= 1:
        return 1.0
    run = max(1, int(steps * strength))
    return min(1.0, (run + 0.5) / steps)


def _resized(image: Image.Image, size: tuple[int, int], resample) -> Image.Image:
    return image if image.size == size else image.resize(size, resample)
