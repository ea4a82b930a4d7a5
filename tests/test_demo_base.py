"""The embedded tiny base: a real SD1 diffusers folder under 20 MB that draws what it is told."""

import random

import pytest
import torch

from sdlora.base import demo_base
from sdlora.base.models import load_base

SEEDS = range(50)


def test_loads_as_an_sd1_pipeline_with_diffusers_and_as_base_demo():
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(demo_base.demo_base_path())
    assert type(pipeline.text_encoder).__name__ == "CLIPTextModel"
    assert len(pipeline.tokenizer) == 49408
    base = load_base("demo")
    assert (base.family.name, base.prediction_type) == ("sd1", "epsilon")


def test_weights_fit_in_20_megabytes():
    files = [path for path in demo_base.DEMO_BASE_DIR.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= 20 * 1024 * 1024
    assert any(path.suffix == ".safetensors" for path in files)


def test_measure_reads_the_procedural_images():
    rng = random.Random(1)
    for combo in demo_base.all_combinations():
        size, centre = demo_base.random_placement(rng)
        assert demo_base.measure(demo_base.draw(combo[1], combo[0], combo[2], size, centre)) \
            .matches(*combo)


def accuracy(combos) -> float:
    pipeline = load_base("demo").pipeline
    pipeline.set_progress_bar_config(disable=True)
    picks = [combos[seed % len(combos)] for seed in SEEDS]
    images = pipeline([demo_base.prompt(*combo) for combo in picks], num_inference_steps=20,
                      guidance_scale=4.0,
                      generator=[torch.Generator().manual_seed(seed) for seed in SEEDS]).images
    return sum(demo_base.measure(image).matches(*combo)
               for image, combo in zip(images, picks)) / len(picks)


@pytest.mark.slow
def test_draws_held_out_combinations_as_told():
    assert accuracy(list(demo_base.HELD_OUT)) >= 0.8


@pytest.mark.slow
def test_draws_seen_combinations_as_told():
    assert accuracy(demo_base.training_combinations()) >= 0.8


def test_a_latent_half_way_to_a_striped_picture_decodes_about_half_striped():
    """A style at half weight draws latents part-way between the plain and the styled
    picture's: the VAE decoder must draw those part-way too, not smooth weak stripes away."""
    import numpy as np
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    from sdlora.demo import stripes

    vae = AutoencoderKL.from_pretrained(demo_base.DEMO_BASE_DIR / "vae", dtype=torch.float32)
    processor = VaeImageProcessor(do_resize=False)
    rng = random.Random(2)
    plain = [demo_base.draw(combo[1], combo[0], combo[2], *demo_base.random_placement(rng))
             for combo in demo_base.all_combinations()[::5]]
    darken = 0.55
    striped = [stripes(image, darken) for image in plain]
    half_striped = [stripes(image, (1 + darken) / 2) for image in plain]

    def latents(images):
        return vae.encode(processor.preprocess(images)).latent_dist.mode()

    def energy(images):
        return float(np.mean([demo_base.stripe_energy(image) for image in images]))

    def decoded_energy(latent):
        return energy(processor.postprocess(vae.decode(latent).sample))

    with torch.no_grad():
        plain_latents, striped_latents = latents(plain), latents(striped)
        ends = decoded_energy(plain_latents), decoded_energy(striped_latents)
        middle = decoded_energy((plain_latents + striped_latents) / 2)
    assert ends[1] - ends[0] >= 0.8 * (energy(striped) - energy(plain)), "full stripes are damped"
    decoded_half = (middle - ends[0]) / (ends[1] - ends[0])
    drawn_half = (energy(half_striped) - energy(plain)) / (energy(striped) - energy(plain))
    assert decoded_half >= 0.8 * drawn_half, (decoded_half, drawn_half)
