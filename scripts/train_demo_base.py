"""Train the embedded tiny base (sdlora/assets/demo_base) from nothing, reproducibly from a seed.

    python scripts/train_demo_base.py [--seed 0] [--vae-steps 2500] [--unet-steps 3600]
    python scripts/train_demo_base.py --start-from FOLDER --unet-steps N   # train further
    python scripts/train_demo_base.py --start-from FOLDER --decoder-steps N --unet-steps 0

The committed base came from: the first command with the defaults (seed 0), its step-2400
save (the folder is rewritten every --save-every steps: copy it then), then --start-from that
copy with --unet-steps 3000, then --start-from that with --decoder-steps 2000 --unet-steps 0
(banded pairs only: `striped_pair`, in git history), then
twice more with --unet-steps 0: --seed 1 --decoder-steps 1000, and --seed 2001
--decoder-steps 2000; about 25 + 15 + 9 + 27 minutes on one CPU thread. On the tests' 50 seeds
it draws 94% of the held-out prompts and 96% of the seen ones as told by `measure` (96% and
100% before the last two decoder runs; `read_content`, on 20 seeds: 97% of the held-out
prompts, was 95%).

1. VAE: reconstruct procedural images (any colours, shapes, stripes, faded colours: a VAE
   should decode more than the base draws, or styles could not be learnt) from the posterior
   mean (the only latent sdlora ever uses; sampling it made a short run blurry and off-colour)
   with a small KL term; then frozen, its latent scaling factor set to 1 / std of the latents.
2. UNet + text encoder: epsilon prediction on cached latents of the captioned training set
   (sdlora.base.demo_base.training_combinations; the held-out combinations never appear), 10% of
   captions dropped for classifier-free guidance, an EMA of the weights kept.
3. VAE decoder, alone (--decoder-steps): a latent a fraction of the way from a picture's latent
   to its styled version's (toned, banded or both) must decode as the picture that fraction of
   the way styled. The toned pairs: before them, the demo base's renders of its held-out
   prompts, toned sepia and striped (sdlora.demo), encoded and decoded, read as their prompt
   only 0.82, 0.84 and, both, 0.61 of the time (purple blotches in toned backgrounds, red
   triangles drawn as bells); after them 0.93, 0.86 and 0.78, and 0.93 each under the demo's
   lighter styles of now (sepia shade 0.9, stripes 0.7). The banded pairs: a
   decoder trained only on real pictures' latents smooths weak stripes away: before this step
   it kept 79% of full stripes and drew the half-way latent 0.23 as striped (a half-striped
   picture reads 0.41: stripe energy is relative to brightness), and the demo's stripes
   adapter at 0.5 showed 0.10 of its effect at 1; after it, 100%, 0.38 and 0.21. The rest of
   the gap is in sampling: at weights 0.25, 0.5, 0.75 the final latents move 0.26, 0.50, 0.76
   of the way, but their stripes only 0.12, 0.33, 0.63; the last steps decide (the adapter
   switched off for the last 5 of 20 steps leaves no stripes), and there the base's denoiser,
   which has only seen flat pictures, pulls weak stripes back towards none. Tried and dropped,
   ratio at 0.5 / held-out accuracy: faint random brightness bands on all the UNet's pictures
   (--texture-sigma, in git history before this item was written; 0.20-0.37, but 82-58% and
   random bands in the base's pictures; no gain on top of this decoder), striped pictures only
   below timestep 300-500 (0.13-0.16; the base then keeps 73% of half stripes at timestep 50
   in one step, against 18%), and for the stripes adapter: the up or down blocks only (0.19,
   0.14), attention and feed-forward only (0.12), rank 2 or 16 (0.20, 0.22), dropout 0.2
   (0.18), min-SNR 5 (0.18), weaker training stripes (0.20), other samplers or guidance
   (0.20-0.22). What closed the gap is in the adapter's training, not in this base: trained
   from before/after pairs (data.before_dir, each step at a random strength) the stripes
   adapter shows 0.34 of its effect at 0.5 (a picture half-way striped reads 0.43).
4. Every --save-every steps the pipeline is saved in fp16 (so a good-enough model exists if
   the run is stopped) and its accuracy on held-out prompts is printed.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdlora.base import demo_base  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(demo_base.DEMO_BASE_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=2500)
    parser.add_argument("--unet-steps", type=int, default=3600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="the denoiser's peak")
    parser.add_argument("--images", type=int, default=6000, help="size of the captioned set")
    parser.add_argument("--save-every", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--start-from", help="a saved demo base to train further (keeps its VAE)")
    parser.add_argument("--decoder-steps", type=int, default=0,
                        help="with --start-from: first teach the VAE decoder part-way latents")
    parser.add_argument("--vae-lightest-band", type=float, default=LIGHTEST_BAND,
                        help="the weakest brightness bands among the VAE's pictures (1 = none)")
    args = parser.parse_args()
    if args.decoder_steps and not args.start_from:
        parser.error("--decoder-steps fine-tunes a trained base: give it with --start-from FOLDER")
    torch.set_num_threads(args.threads)
    started = time.time()
    rng = random.Random(args.seed)
    if args.start_from:
        from diffusers import StableDiffusionPipeline

        pipeline = StableDiffusionPipeline.from_pretrained(args.start_from, dtype=torch.float32)
        pipeline.vae.requires_grad_(False)
        if args.decoder_steps:
            train_decoder_on_interpolations(pipeline.vae, rng, args.decoder_steps)
    else:
        pipeline = demo_base.build_demo_pipeline(args.seed)
        train_vae(pipeline.vae, rng, args.vae_steps, args.vae_lightest_band)
    if args.unet_steps:
        latents, prompts = encode_training_set(pipeline.vae, rng, args.images,
                                               rescale=not args.start_from)
        train_denoiser(pipeline, latents, prompts, args, rng)
    else:  # only the VAE changed
        save(pipeline, {"unet": pipeline.unet, "text_encoder": pipeline.text_encoder}, args.out)
        tqdm.write(evaluate(args.out))
    tqdm.write(f"done in {(time.time() - started) / 60:.1f} min; saved to {args.out}")


# --- 1. the VAE ---------------------------------------------------------------------------------

LIGHTEST_BAND = 0.9  # the weakest brightness bands among the VAE's pictures (committed recipe)


def vae_example(rng: random.Random, lightest_band: float = LIGHTEST_BAND) -> torch.Tensor:
    """A varied image in [-1, 1]: mostly the named colours, some random ones, often striped or
    faded."""
    def colour():
        return tuple(rng.randrange(256) for _ in range(3))

    if rng.random() < 0.8:
        image, _ = demo_base.random_example(rng, demo_base.all_combinations())
    else:
        size, centre = demo_base.random_placement(rng)
        image = demo_base.draw(rng.choice(demo_base.SHAPES), colour(), colour(), size, centre)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    if rng.random() < 0.3:  # faded or toned colours
        grey = pixels.mean(axis=-1, keepdims=True)
        tone = np.array([rng.uniform(0.6, 1.2) for _ in range(3)], dtype=np.float32)
        pixels = np.clip(pixels + rng.uniform(0.3, 1.0) * (grey * tone - pixels), 0, 1)
    if rng.random() < 0.3:  # brightness bands of a random period and direction
        pixels = pixels * band_factors(rng, rng.randrange(6, 24), 24, 0.4, lightest_band, 0.5)
    return torch.from_numpy(pixels).permute(2, 0, 1) * 2 - 1


def band_factors(rng: random.Random, period: int, phases: int, darkest: float,
                 lightest: float, horizontal_share: float) -> np.ndarray:
    """Brightness factors to multiply a (height, width, channels) picture by: every other band
    of period / 2 pixels, from a random phase, darkened to one random factor between `darkest`
    and `lightest`; the bands run across the picture with probability `horizontal_share`."""
    phase = rng.randrange(phases)
    bands = ((np.arange(demo_base.RESOLUTION) + phase) // (period / 2)) % 2 == 0
    factor = np.where(bands, rng.uniform(darkest, lightest), 1.0).astype(np.float32)
    return factor[:, None, None] if rng.random() < horizontal_share else factor[None, :, None]


def train_vae(vae, rng: random.Random, steps: int, lightest_band: float,
              batch: int = 16) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=1e-4)
    vae.train()
    progress = tqdm(range(steps), desc="VAE", dynamic_ncols=True)
    for _ in progress:
        pixels = torch.stack([vae_example(rng, lightest_band) for _ in range(batch)])
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.mode()).sample
        loss = reconstruction_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    tqdm.write(f"VAE reconstructions read back right: {vae_accuracy(vae, rng)}")


def reconstruction_loss(reconstruction: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(reconstruction, pixels) + F.mse_loss(reconstruction, pixels)


def styled_pair(rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """A VAE picture and the same picture styled, both in [-1, 1]: toned (faded towards grey,
    tinted and darkened: a colour grade), banded (bands darkened to 30-80%, mostly horizontal,
    mostly 16 pixels apart: a texture), or both, half the time both."""
    plain = vae_example(rng, lightest_band=1.0)
    pixels = ((plain + 1) / 2).permute(1, 2, 0).numpy()
    kinds = rng.choice(["tone", "bands", "both", "both"])
    if kinds in ("tone", "both"):
        grey = pixels.mean(axis=-1, keepdims=True)
        tint = np.array([rng.uniform(0.5, 1.1) for _ in range(3)], dtype=np.float32)
        faded = pixels + rng.uniform(0.2, 0.9) * (grey - pixels)
        pixels = np.clip(faded * tint * rng.uniform(0.6, 1.0), 0, 1)
    if kinds in ("bands", "both"):
        pixels = pixels * band_factors(rng, rng.choice([8, 12, 16, 16, 16, 24, 32]), 32, 0.3,
                                       0.8, 0.7)
    return plain, torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1) * 2 - 1


def train_decoder_on_interpolations(vae, rng: random.Random, steps: int,
                                    batch: int = 16) -> None:
    """Fine-tune the decoder alone (the latents stay what the UNet learnt) so that a latent
    a fraction of the way from a picture's latent to its styled version's (`styled_pair`)
    decodes as the picture that fraction of the way styled. A style at half weight draws
    latents half-way; a decoder trained only on real pictures' latents smooths those away, and
    one trained on few toned and banded pictures draws them with blotches and bent shapes."""
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=1e-3, weight_decay=0.0)
    progress = tqdm(range(steps), desc="VAE decoder", dynamic_ncols=True)
    for _ in progress:
        plain, styled = (torch.stack(side) for side in
                          zip(*(styled_pair(rng) for _ in range(batch))))
        # A quarter of the batch is the plain pictures, an eighth the styled ones: the
        # decoder keeps reconstructing what the encoder gives it.
        fraction = torch.tensor([rng.random() for _ in range(batch)]).view(batch, 1, 1, 1)
        fraction[:batch // 4] = 0.0
        fraction[batch // 4:batch // 4 + batch // 8] = 1.0
        with torch.no_grad():
            plain_latents = vae.encode(plain).latent_dist.mode()
            styled_latents = vae.encode(styled).latent_dist.mode()
        reconstruction = vae.decode(plain_latents + fraction * (styled_latents - plain_latents)).sample
        loss = reconstruction_loss(reconstruction, plain + fraction * (styled - plain))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    vae.requires_grad_(False)


def vae_accuracy(vae, rng: random.Random, count: int = 48) -> str:
    examples = [demo_base.random_example(rng, demo_base.all_combinations()) for _ in range(count)]
    with torch.no_grad():
        decoded = vae.decode(vae.encode(to_pixels([image for image, _ in examples]))
                             .latent_dist.mode()).sample
    right = sum(demo_base.measure(image).matches(*caption.split()[1:3], caption.split()[5])
                for image, (_, caption) in zip(to_images(decoded), examples))
    return f"{right}/{count}"


def to_pixels(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1)
                        .permute(2, 0, 1) for image in images])


def to_images(pixels: torch.Tensor) -> list:
    from PIL import Image

    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(item) for item in array]


def encode_training_set(vae, rng: random.Random, count: int,
                        rescale: bool = True) -> tuple[torch.Tensor, list[str]]:
    """Scaled latents (posterior means) of `count` captioned images; `rescale` first sets the
    VAE's scaling factor to 1 / std of the latents."""
    examples = [demo_base.random_example(rng, demo_base.training_combinations())
                for _ in range(count)]
    chunks = []
    with torch.no_grad():
        for start in tqdm(range(0, count, 128), desc="encoding", dynamic_ncols=True):
            pixels = to_pixels([image for image, _ in examples[start:start + 128]])
            chunks.append(vae.encode(pixels).latent_dist.mode())
    latents = torch.cat(chunks)
    if rescale:
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        tqdm.write(f"latent scaling factor {vae.config.scaling_factor:.4f}")
    return latents * vae.config.scaling_factor, [caption for _, caption in examples]


# --- 2. the UNet and the text encoder -----------------------------------------------------------

def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def train_denoiser(pipeline, latents: torch.Tensor, prompts: list[str], args, rng) -> None:
    from diffusers import DDPMScheduler

    unet, text_encoder = pipeline.unet, pipeline.text_encoder
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    captions = sorted(set(prompts)) + [""]
    ids = token_ids(pipeline.tokenizer, captions)
    caption_index = torch.tensor([captions.index(p) for p in prompts])
    empty = len(captions) - 1
    models = (unet, text_encoder)
    for model in models:
        model.train().requires_grad_(True)
    ema = {name: copy.deepcopy(model).requires_grad_(False) for name, model in
           zip(("unet", "text_encoder"), models)}
    params = [p for model in models for p in model.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    warmup = 100

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (args.unet_steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(args.seed)
    progress = tqdm(range(1, args.unet_steps + 1), desc="UNet + text encoder", dynamic_ncols=True)
    for step in progress:
        index = torch.randint(0, len(latents), (args.batch,), generator=generator)
        chosen = caption_index[index]
        dropped = torch.rand(args.batch, generator=generator) < 0.1
        chosen = torch.where(dropped, torch.full_like(chosen, empty), chosen)
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch,),
                                  generator=generator)
        text = text_encoder(ids[chosen])[0]
        prediction = unet(noise_scheduler.add_noise(clean, noise, timesteps), timesteps, text).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, model in zip(ema, models):
                for averaged, current in zip(ema[name].parameters(), model.parameters()):
                    averaged.lerp_(current, 1 - decay)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if step % args.save_every == 0 or step == args.unet_steps:
            save(pipeline, ema, args.out)
            tqdm.write(f"step {step}: saved; {evaluate(args.out)}")


def save(pipeline, ema: dict, out: str) -> None:
    """The pipeline with the EMA weights, in fp16, as a diffusers folder."""
    from diffusers import StableDiffusionPipeline

    parts = {name: copy.deepcopy(model).half().eval() for name, model in ema.items()}
    StableDiffusionPipeline(
        vae=copy.deepcopy(pipeline.vae).half(), tokenizer=pipeline.tokenizer,
        scheduler=pipeline.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, **parts,
    ).save_pretrained(out)


def evaluate(folder: str, samples: int = 24) -> str:
    """Accuracy of `measure` on held-out and on seen prompts (a quick look, not the test)."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    report = []
    for label, combos in (("held-out", demo_base.HELD_OUT),
                          ("seen", demo_base.training_combinations())):
        picks = [combos[i % len(combos)] for i in range(samples)]
        images = pipeline([demo_base.prompt(*c) for c in picks], num_inference_steps=20,
                          guidance_scale=4.0, generator=torch.Generator().manual_seed(0)).images
        right = sum(demo_base.measure(image).matches(*c) for image, c in zip(images, picks))
        report.append(f"{label} {right}/{samples}")
    return ", ".join(report)


if __name__ == "__main__":
    main()
