"""generate_image on the tiny SD1 and SDXL pipelines: img2img runs strength x steps UNet
steps at the init image's rounded size, inpainting keeps the unmasked region, the hires fix
doubles the size, and the img2img/inpaint twins share the base's modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.base.tiny import build_tiny_pipeline
from sdlora.errors import SdloraError
from sdlora.render.pipelines import Hires, generate_image, variant

PROMPT = {"prompt": "a red house", "negative_prompt": "blurry"}


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def pipeline(request):
    pipeline = build_tiny_pipeline(request.param)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def sd1():
    pipeline = build_tiny_pipeline("sd1")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class UnetCalls:
    """Counts UNet forward calls (one per denoising step: CFG batches both halves)."""

    def __init__(self, pipeline):
        self.count = 0
        self.handle = pipeline.unet.register_forward_hook(self.hook)

    def hook(self, *_):
        self.count += 1

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.handle.remove()


def photo(width=48, height=40, seed=0) -> Image.Image:
    """A smooth colour gradient with some texture: something for img2img to keep."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    pixels = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 128.0)], axis=-1)
    pixels += rng.normal(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def generate(pipeline, steps=4, seed=0, **options) -> Image.Image:
    return generate_image(
        pipeline,
        conditioning=options.pop("conditioning", PROMPT),
        steps=steps,
        cfg=5.0,
        width=options.pop("width", None),
        height=options.pop("height", None),
        generator=torch.Generator().manual_seed(seed),
        **options,
    )


def test_img2img_runs_strength_times_the_steps(pipeline):
    with UnetCalls(pipeline) as txt2img:
        generate(pipeline, steps=4, width=32, height=32)
    with UnetCalls(pipeline) as img2img:
        image = generate(pipeline, steps=4, init_image=photo(50, 42), strength=0.5)
    assert (txt2img.count, img2img.count) == (4, 2)
    assert image.size == (48, 40)  # the init image's size, rounded down to 8


@pytest.mark.parametrize("strength, expected", [(0.0, 1), (0.1, 1), (0.75, 3), (1.0, 4)])
def test_every_strength_runs_at_least_one_step(sd1, strength, expected):
    with UnetCalls(sd1) as calls:
        generate(sd1, steps=4, init_image=photo(), strength=strength)
    assert calls.count == expected


def vae_round_trip(pipeline, image: Image.Image) -> np.ndarray:
    """What the (random, tiny) VAE makes of `image` without any denoising."""
    with torch.no_grad():
        pixels = pipeline.image_processor.preprocess(image)
        latents = pipeline.vae.encode(pixels).latent_dist.mode()
        decoded = pipeline.vae.decode(latents).sample
    return np.asarray(pipeline.image_processor.postprocess(decoded)[0], dtype=float)


def test_img2img_keeps_the_picture_at_low_strength():
    # The random tiny VAE samples its latents with std 1 around a mean of ~0.03 (scaled), so
    # its pictures carry no content. Make it encode deterministically (log-variance -30) at
    # unit latent scale, as SD's trained VAE and scaling factor do.
    pipeline = build_tiny_pipeline("sd1")
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipeline.vae.quant_conv.weight[4:] = 0
        pipeline.vae.quant_conv.bias[4:] = -30
    pipeline.vae.register_to_config(scaling_factor=5.0)
    source = photo(64, 64)
    kept = vae_round_trip(pipeline, source)
    distance = {
        strength: np.abs(
            np.asarray(generate(pipeline, steps=10, init_image=source, strength=strength), float)
            - kept
        ).mean()
        for strength in (0.1, 0.5, 1.0)
    }
    assert distance[0.1] < 5 < distance[0.5] < distance[1.0]


def test_requested_size_resizes_the_init_image(sd1):
    assert generate(sd1, init_image=photo(48, 40), width=32, height=64, strength=0.5).size == (
        32,
        64,
    )
    assert generate(sd1, init_image=photo(48, 40), width=24, strength=0.5).size == (24, 16)


def test_prompt_embeddings_pass_through_unchanged(pipeline):
    encoded = pipeline.encode_prompt(
        PROMPT["prompt"],
        device="cpu",
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt=PROMPT["negative_prompt"],
    )
    names = ["prompt_embeds", "negative_prompt_embeds"]
    if len(encoded) == 4:  # SDXL: also the pooled embeddings
        names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    embeds = dict(zip(names, encoded))
    from_text = generate(pipeline, init_image=photo(), strength=0.5)
    from_embeds = generate(pipeline, init_image=photo(), strength=0.5, conditioning=embeds)
    assert np.array_equal(np.asarray(from_text), np.asarray(from_embeds))


def test_inpaint_repaints_only_the_mask(pipeline):
    source = photo(64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))  # repaint the right half
    result = np.asarray(generate(pipeline, init_image=source, mask=mask, strength=1.0), float)
    original = np.asarray(source, dtype=float)
    kept = np.abs(result[:, :24] - original[:, :24]).mean()  # clear of the 4 px blur
    repainted = np.abs(result[:, 40:] - original[:, 40:]).mean()
    assert kept < 1.0 and repainted > 20


def test_mask_of_another_size_is_refused(sd1):
    with pytest.raises(SdloraError, match="mask is 32x32 but the init image is 48x40"):
        generate(sd1, init_image=photo(), mask=Image.new("L", (32, 32)), strength=0.5)


def test_hires_fix_upscales_and_repaints_at_its_strength(pipeline):
    with UnetCalls(pipeline) as calls:
        image = generate(pipeline, width=32, height=24, hires=Hires(scale=2.0, strength=0.5))
    assert image.size == (64, 48)
    assert calls.count == 4 + 2  # txt2img steps + strength x steps img2img steps


def test_hires_size_rounds_down_like_a1111(sd1):
    image = generate(sd1, steps=2, width=32, height=32, hires=Hires(scale=1.4, strength=0.5))
    assert image.size == (40, 40)  # int(32 x 1.4) = 44 -> 40


def test_twins_share_the_base_modules_and_follow_its_scheduler(pipeline):
    from diffusers import EulerDiscreteScheduler

    img2img, inpaint = variant(pipeline, "img2img"), variant(pipeline, "inpaint")
    for twin in (img2img, inpaint):
        assert twin is not pipeline
        assert twin.unet is pipeline.unet and twin.vae is pipeline.vae
        assert twin.text_encoder is pipeline.text_encoder
    assert variant(pipeline, "img2img") is img2img  # built once

    original = pipeline.scheduler
    pipeline.scheduler = EulerDiscreteScheduler.from_config(original.config)
    try:
        scheduler = variant(pipeline, "img2img").scheduler
        assert isinstance(scheduler, EulerDiscreteScheduler)
        assert scheduler is not pipeline.scheduler  # per-run state is not shared
    finally:
        pipeline.scheduler = original


def test_twin_is_rebuilt_when_the_base_gets_new_modules(sd1):
    twin = variant(sd1, "img2img")
    unet = sd1.unet
    sd1.unet = build_tiny_pipeline("sd1", seed=1).unet
    try:
        assert variant(sd1, "img2img").unet is sd1.unet
        assert variant(sd1, "img2img") is not twin
    finally:
        sd1.unet = unet


def test_hires_pass_is_img2img_of_the_upscaled_picture_with_the_same_seed(sd1):
    hires = generate(sd1, width=32, height=24, seed=3, hires=Hires(scale=2.0, strength=0.5))
    first = generate(sd1, width=32, height=24, seed=3)
    upscaled = first.resize((64, 48), Image.LANCZOS)
    again = generate(sd1, init_image=upscaled, strength=0.5, seed=3)
    assert np.array_equal(np.asarray(hires), np.asarray(again))
