"""`sdlora render` against a minimal diffusers script drawing the same pictures.

    python bench/render_speed.py [--images 8] [--steps 4] [--size 256] [--threads 1]

Builds an SD1.5-sized pipeline in code (bench/mix_speed.py's UNet and CLIP text encoder with
random weights, the tiny VAE; nothing downloaded), saves it as a diffusers folder, then runs
each side as a fresh process: `sdlora render --batch N` (with one rank-16 adapter at 0.8 in
the mix), and a script that loads the folder with `StableDiffusionPipeline.from_pretrained`,
fuses the same adapter with diffusers' own `load_lora_weights` + `fuse_lora`, and draws the
same N pictures. Reports wall time, the processes' CPU time (which time-slicing on a busy
machine does not inflate), time to the first picture, and the ratios sdlora / diffusers; each
side runs `--repeats` times, alternating, and the fastest run counts.

sdlora hashes the base's weight files once (A1111's "Model hash", and what tells a re-usable
picture from a stale one) and caches the hash by file size and time; the bench warms that
cache first, as any render after the first finds it (for this 3.4 GB model: about 4.7 s of
CPU, once).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mix_speed import random_lora, sd15_pipeline  # noqa: E402

PROMPT = "a lighthouse on a cliff"

DIFFUSERS_SCRIPT = """
import sys, time, torch
from pathlib import Path
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
base, adapter, out, images, steps, size, threads = sys.argv[1:]
torch.set_num_threads(int(threads))
pipeline = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
pipeline.scheduler = EulerAncestralDiscreteScheduler.from_config(pipeline.scheduler.config)
pipeline.load_lora_weights(adapter, adapter_name="style")
pipeline.fuse_lora(lora_scale=0.8)
pipeline.set_progress_bar_config(disable=True)
for index in range(int(images)):
    generator = torch.Generator("cpu").manual_seed(index)
    image = pipeline("PROMPT", num_inference_steps=int(steps), guidance_scale=7.0,
                     width=int(size), height=int(size), generator=generator).images[0]
    image.save(Path(out) / f"{index:05d}.png")
""".replace("PROMPT", PROMPT)


def timed(command: list[str], out: Path) -> dict:
    """Run `command`; wall and CPU seconds, and seconds until the first PNG appeared."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    subprocess.run(command, check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    first = min(path.stat().st_mtime for path in out.glob("*.png")) - start
    return {"wall": wall, "cpu": cpu, "first": first, "count": len(list(out.glob("*.png")))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from sdlora.adapters.write import save_adapter

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        pipeline = sd15_pipeline()
        pipeline.save_pretrained(work / "base")
        adapter, _ = random_lora(pipeline, "style", seed=1, text_encoder=True)
        save_adapter(adapter, work / "style.safetensors")
        del pipeline
        from sdlora.render.png import model_hash

        model_hash(str(work / "base"))  # once per model file (see the docstring)
        common = [str(args.images), str(args.steps), str(args.size), str(args.threads)]
        results: dict[str, dict] = {}
        order = ["diffusers", "sdlora", "sdlora", "diffusers"] * args.repeats
        for run, side in enumerate(order[: 2 * args.repeats]):
            out = work / f"{side}-{run}"
            out.mkdir()
            if side == "sdlora":
                command = [
                    sys.executable, "-m", "sdlora", "render", "--base", str(work / "base"),
                    "--lora", f"{work / 'style.safetensors'}:0.8", "--prompt", PROMPT,
                    "--batch", str(args.images), "--steps", str(args.steps), "--cfg", "7",
                    "--width", str(args.size), "--height", str(args.size),
                    "--threads", str(args.threads), "--out", str(out),
                ]
            else:
                command = [sys.executable, "-c", DIFFUSERS_SCRIPT, str(work / "base"),
                           str(work / "style.safetensors"), str(out), *common]
            result = timed(command, out)
            assert result["count"] == args.images, result
            best = results.setdefault(side, result)
            results[side] = {key: min(best[key], result[key]) for key in result}
    ours, theirs = results["sdlora"], results["diffusers"]
    print(f"SD1.5-sized UNet + CLIP (random weights, tiny VAE), {args.images} images, "
          f"{args.steps} steps, {args.size} px, {args.threads} thread(s), torch "
          f"{torch.__version__}; each side a fresh process (load included)\n")
    print("| | sdlora render | diffusers script | ratio |")
    print("|---|---:|---:|---:|")
    for key, label in (("wall", "wall s"), ("cpu", "CPU s"), ("first", "first image s")):
        print(f"| {label} | {ours[key]:.1f} | {theirs[key]:.1f} | {ours[key] / theirs[key]:.3f}x |")


if __name__ == "__main__":
    main()
