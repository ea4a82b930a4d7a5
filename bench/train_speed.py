"""Seconds per training step and peak memory: sdlora's trainer against the diffusers recipe.

    python bench/train_speed.py [--models tiny,sd15] [--steps N] [--variants default,gc,te]

"reference" is a compact copy of the per-step work of diffusers'
examples/dreambooth/train_dreambooth_lora.py: every step encodes the pixels with the VAE
(`latent_dist.sample()`) and the prompt with the text encoder (no caching); LoRA through
`add_adapter(LoraConfig(init_lora_weights="gaussian"))` on to_q/to_k/to_v/to_out.0 (and q/k/v/
out_proj of the text encoder when it is trained); AdamW; MSE on epsilon; grad clipping 1.0.
"ours" is `sdlora.train.loop.train` with the same settings: rank 4, alpha 4, batch 1, UNet
attention, fp32, constant lr 1e-4, 4 random-pixel images, no validation, checkpoints or logs.

Models (random weights, nothing downloaded): `tiny` (sdlora.base.tiny, 64 px) and `sd15` (SD1.5's
UNet, VAE and CLIP-L configs, 256 px), saved once under --cache. Variants: `default`,
`gc` (gradient checkpointing), `te` (text encoder trained too).
Each measurement is its own subprocess, so peak RSS (ru_maxrss) belongs to one run. Reported:
median s/step over the steps after the first two, peak RSS, speedup = ref time / our time,
memory = our RSS / ref RSS, our trainable parameters and adapter file size.
Goal: speedup >= 1.3x and memory <= 0.85x. Results: bench/RESULTS-train.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESOLUTION = {"tiny": 64, "sd15": 256}
DEFAULT_STEPS = {"tiny": 20, "sd15": 8}
SKIP = 2  # warm-up steps left out of the median
RANK, PROMPT, NUM_IMAGES = 4, "a photo of sks", 4
GOAL_SPEEDUP, GOAL_MEMORY = 1.3, 0.85


# --- models and data, built once ----------------------------------------------------------------
def save_sd15_pipeline(folder: Path) -> None:
    """An SD1.5-sized StableDiffusionPipeline with random weights, saved as a diffusers folder."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdlora.base.tiny import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False)
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).save_pretrained(str(folder))


def prepare(model: str, cache: Path) -> tuple[Path, Path]:
    """(pipeline folder, image folder) for `model`, built on first use."""
    from PIL import Image

    folder = cache / model
    if not (folder / "model_index.json").is_file():
        print(f"building the {model} pipeline in {folder} (once) ...", flush=True)
        if model == "tiny":
            from sdlora.base.tiny import save_tiny_pipeline

            save_tiny_pipeline(folder, "sd1")
        else:
            save_sd15_pipeline(folder)
    size = RESOLUTION[model]
    images = cache / f"images-{size}"
    if len(list(images.glob("*.png"))) != NUM_IMAGES:
        images.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for index in range(NUM_IMAGES):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / f"image{index}.png")
    return folder, images


# --- the two trainers ---------------------------------------------------------------------------
def run_ours(base: Path, images: Path, size: int, variant: str, steps: int, out: Path,
             stamp) -> dict:
    from safetensors import safe_open

    from sdlora.train.config import from_dict, validate
    from sdlora.train.loop import train

    config = from_dict({
        "base": str(base),
        "data": {"instance_dir": str(images), "instance_prompt": PROMPT, "resolution": size},
        "lora": {"rank": RANK, "alpha": RANK, "targets": "attention",
                 "text_encoder": variant == "te"},
        "train": {"steps": steps, "batch_size": 1, "learning_rate": 1e-4,
                  "lr_scheduler": "constant", "mixed_precision": "no",
                  "gradient_checkpointing": variant == "gc"},
        "validation": {"every": 0}, "checkpoint": {"every": 0},
        "output": {"dir": str(out), "name": "bench", "tensorboard": False},
    })
    validate(config)
    path = train(config, on_step=lambda step, loss: stamp())
    with safe_open(str(path), framework="pt") as handle:
        trainable = sum(math.prod(handle.get_slice(key).get_shape())
                        for key in handle.keys() if ".lora_" in key)
    return {"trainable": trainable, "adapter_bytes": path.stat().st_size}


def run_reference(base: Path, images: Path, size: int, variant: str, steps: int, out: Path,
                  stamp) -> dict:
    """The per-step work of diffusers' train_dreambooth_lora.py (no prior preservation)."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig, inject_adapter_in_model
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    if variant == "te":
        # = text_encoder.add_adapter(config), which transformers 5 refuses below peft 0.22
        inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                           target_modules=["q_proj", "k_proj", "v_proj",
                                                           "out_proj"]), text_encoder)
    if variant == "gc":
        unet.enable_gradient_checkpointing()
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2,
                                  eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    pixels = [torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((size, size))))
              .permute(2, 0, 1).float().div(127.5).sub(1.0) for p in sorted(images.glob("*.png"))]
    unet.train()
    if variant == "te":
        text_encoder.train()
    for step in range(steps):
        pixel_values = pixels[step % len(pixels)][None]
        input_ids = tokenizer(PROMPT, truncation=True, padding="max_length",
                              max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        model_input = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,)).long()
        noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids, attention_mask=None)[0]
        model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states,
                          return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        loss.detach().item()
        stamp()
    return {"trainable": sum(p.numel() for p in params), "adapter_bytes": None}


def current_rss_gib() -> float:
    """Resident memory now (the peak is ru_maxrss); shows whether loading or training peaks."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def worker(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base, images = prepare(args.model, Path(args.cache))
    if args.threads:
        torch.set_num_threads(args.threads)
    stamps, cpu, rss = [time.perf_counter()], [time.process_time()], []

    def stamp():
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        rss.append(current_rss_gib())
        print(f"    step {len(stamps) - 1}: {stamps[-1] - stamps[-2]:.3f} s", flush=True)

    runner = run_ours if args.worker == "ours" else run_reference
    with tempfile.TemporaryDirectory(prefix="sdlora-bench-") as out:
        result = runner(base, images, RESOLUTION[args.model], args.variant, args.steps,
                        Path(out), stamp)
    times = np.diff(stamps)[SKIP:].tolist()  # ours' first interval also holds loading: skipped
    cpu_times = np.diff(cpu)[SKIP:].tolist()
    result.update(who=args.worker, model=args.model, variant=args.variant, step_times=times,
                  median_s=statistics.median(times), cpu_s=statistics.median(cpu_times),
                  peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  rss_after_steps=rss,
                  threads=torch.get_num_threads(), loadavg=os.getloadavg()[0])
    Path(args.json).write_text(json.dumps(result))


# --- the driver ---------------------------------------------------------------------------------
def measure(who: str, model: str, variant: str, steps: int, args, log: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    command = [sys.executable, __file__, "--worker", who, "--model", model, "--variant", variant,
               "--steps", str(steps), "--cache", args.cache, "--json", str(out)]
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    if args.threads:
        command += ["--threads", str(args.threads)]
        env["OMP_NUM_THREADS"] = str(args.threads)
    started = time.time()
    with log.open("a") as stream:
        stream.write(f"\n=== {who} {model} {variant}\n")
        stream.flush()
        code = subprocess.run(command, env=env, stdout=stream, stderr=subprocess.STDOUT).returncode
    if code:
        tail = log.read_text().splitlines()[-15:]
        sys.exit(f"{who} {model} {variant} failed (exit {code}); end of {log}:\n" + "\n".join(tail))
    result = json.loads(out.read_text())
    out.unlink()
    print(f"    {time.time() - started:.0f} s: {result['median_s']:.3f} s/step "
          f"({result['cpu_s']:.3f} CPU s), "
          f"peak {result['peak_rss_gib']:.2f} GiB (last step {result['rss_after_steps'][-1]:.2f}), "
          f"load {result['loadavg']:.1f}", flush=True)
    return result


def table(rows: list[tuple[dict, dict]]) -> str:
    lines = ["| model | variant | ours s/step | ref s/step | speedup | speedup CPU s | ours GiB "
             "| ref GiB | memory | trainable | adapter MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for ours, ref in rows:
        speed, cpu_speed = ref["median_s"] / ours["median_s"], ref["cpu_s"] / ours["cpu_s"]
        memory = ours["peak_rss_gib"] / ref["peak_rss_gib"]
        check = "" if ours["trainable"] == ref["trainable"] else f" (ref {ref['trainable']:,})"
        lines.append(
            f"| {ours['model']} | {ours['variant']} "
            f"| {ours['median_s']:.3f} | {ref['median_s']:.3f} "
            f"| {speed:.2f}x | {cpu_speed:.2f}x "
            f"| {ours['peak_rss_gib']:.2f} | {ref['peak_rss_gib']:.2f} "
            f"| {memory:.2f}x | {ours['trainable']:,}{check} "
            f"| {ours['adapter_bytes'] / 1e6:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,sd15")
    parser.add_argument("--variants", default="default,gc,te")
    parser.add_argument("--steps", type=int, help="steps per run (default: 20 tiny, 8 sd15)")
    parser.add_argument("--cache", default="/tmp/sdlora-bench", help="models and images")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's)")
    parser.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    models, variants = args.models.split(","), args.variants.split(",")
    log = Path(args.cache) / "train_speed.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    for model in models:
        prepare(model, Path(args.cache))  # build outside the timed subprocesses
    runs = [(m, v) for m in models for v in variants]
    threads = args.threads or torch.get_num_threads()
    print(f"{len(runs) * 2} runs, {threads} threads each, load {os.getloadavg()[0]:.1f}, "
          f"worker output in {log}")
    rows = []
    for index, (model, variant) in enumerate(runs):
        steps = args.steps or DEFAULT_STEPS[model]
        pair = []
        for who in ("ours", "reference"):
            print(f"[{2 * index + len(pair) + 1}/{2 * len(runs)}] {model} {variant} {who}, "
                  f"{steps} steps", flush=True)
            pair.append(measure(who, model, variant, steps, args, log))
        rows.append(tuple(pair))
    print(f"\nmedian wall s/step after {SKIP} warm-up steps ({threads} threads); "
          "speedup = ref/ours "
          f"(CPU s: the same with process CPU time, steadier on a shared machine); peak RSS per "
          f"process; memory = ours/ref. Goal: speedup >= {GOAL_SPEEDUP}x, memory <= {GOAL_MEMORY}x."
          "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
