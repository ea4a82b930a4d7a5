"""Cost of img2img against txt2img, through `sdlora.render.pipelines.generate_image`.

    python bench/img2img_speed.py [--quick]

An SD1.5-sized UNet and CLIP text encoder with random weights (built in code by
bench/mix_speed.py, nothing downloaded) and the tiny VAE, 256 px (32x32 latents), CFG on.
Times one txt2img picture and img2img pictures of the same size at strengths 0.25, 0.5 and 1,
in one run, and prints the UNet calls and the CPU time of each as a ratio to txt2img.
Expected: img2img at strength s costs about s x txt2img (it runs int(s x steps) of the steps),
plus the fixed costs (prompt encoding, VAE encode and decode). `--quick` uses the tiny SD1
pipeline instead, where those fixed costs dominate.
Result (8 steps, one thread): txt2img 32.0 s; img2img 0.25x (strength 0.25, 2 UNet calls),
0.49x (0.5, 4 calls), 0.97x (1, 8 calls).

Timing: one thread and process CPU time, as in bench/mix_speed.py (wall time on a small
shared machine measures the neighbours).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from mix_speed import sd15_pipeline
from PIL import Image

from sdlora.base.tiny import build_tiny_pipeline
from sdlora.render.pipelines import generate_image

STRENGTHS = (0.25, 0.5, 1.0)


def timed_run(pipeline, steps: int, size: int, **options) -> tuple[float, int]:
    """(CPU seconds, UNet calls) of one generate_image call."""
    calls = []
    handle = pipeline.unet.register_forward_hook(lambda *_: calls.append(1))
    start = time.process_time()
    generate_image(
        pipeline,
        conditioning={"prompt": "an oil painting of a harbour", "negative_prompt": "blurry"},
        steps=steps,
        cfg=7.0,
        width=size,
        height=size,
        generator=torch.Generator().manual_seed(0),
        **options,
    )
    seconds = time.process_time() - start
    handle.remove()
    return seconds, len(calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny SD1 pipeline, 64 px")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipeline = build_tiny_pipeline("sd1") if args.quick else sd15_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    size = 64 if args.quick else 256
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8))

    # warm-up: first-call allocations, lazy imports, building the img2img twin
    timed_run(pipeline, 1, size)
    timed_run(pipeline, 1, size, init_image=photo, strength=1.0)
    base_seconds, base_calls = timed_run(pipeline, args.steps, size)
    rows = [("txt2img", base_calls, base_seconds)]
    for strength in STRENGTHS:
        seconds, calls = timed_run(
            pipeline, args.steps, size, init_image=photo, strength=strength
        )
        rows.append((f"img2img strength {strength:g}", calls, seconds))

    model = "tiny SD1" if args.quick else "SD1.5-sized UNet + CLIP"
    print(f"{model}, {size} px, {args.steps} steps, CFG, 1 thread, CPU time")
    print(f"| {'run':<22} | UNet calls | CPU s | ratio to txt2img |")
    print(f"|{'-' * 24}|-----------:|------:|-----------------:|")
    for name, calls, seconds in rows:
        print(f"| {name:<22} | {calls:>10} | {seconds:5.1f} | {seconds / base_seconds:16.2f} |")


if __name__ == "__main__":
    main()
