"""Interference of two style adapters on the demo base: styles kept and content, per mix mode.

    python bench/mix_interference.py ADAPTERS_DIR [--seeds 20]

ADAPTERS_DIR holds `sdlora demo`'s {sepia,stripes}/{style}.safetensors (run `sdlora demo --out
DIR` once, ~2 min on one core). Every configuration draws the held-out prompts of the demo base
(sdlora.base.demo_base.HELD_OUT, combinations it never saw) x --seeds seeds and reports:
- saturation (mean HSV S, what sepia lowers) and stripe energy (what stripes raises);
- "kept": the move of that statistic from the base, as a fraction of the style's move alone
  at 1.0 (the goal: both styles at 1.0 keep >= 0.8 of it);
- content: the fraction of images whose subject reads as their prompt (shape kind and both
  colours, `demo_content.read_content`, colours named as the styles at those weights draw
  them, so a style's own colour grade or texture is not counted against it);
- measure: the same by `demo_base.measure`, which names colours by their plain hue and reads
  the shape kind by fill alone (the reading of earlier runs; a style moves it by itself).
Configurations: each style alone at 1.0; both at 1.0 in each mix mode; the same with stripes
only on the late half of the steps (`<lora:stripes:1@0.5-1>`, sdlora.mix.schedules).
One thread; results in bench/RESULTS-mix.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from sdlora import demo
from sdlora.base import demo_base, demo_content
from sdlora.mix.modes import MIX_MODES
from sdlora.mix.schedules import parse_weight_text

LATE = "1@0.5-1"


def render(pipeline, mixer, weights, schedules, jobs, batch=40):
    """One image per (combo, seed) job with `weights` set; `schedules` (name -> weight text)
    re-weight the UNet before each step, as the render session does."""
    full = {name: weights.get(name, 0.0) for name in mixer.weights}
    parsed = {name: parse_weight_text(text, "bench") for name, text in schedules.items()}

    def set_step(step, steps):
        mixer.set_step_weights({name: s.weight(w, step, steps) for name, (w, s) in parsed.items()})

    def callback(pipe, step, timestep, tensors):
        if step + 1 < pipe.num_timesteps:
            set_step(step + 1, pipe.num_timesteps)
        return {}

    images = []
    with mixer.using(full):
        for start in range(0, len(jobs), batch):
            chunk = jobs[start:start + batch]
            set_step(0, demo.RENDER["num_inference_steps"])
            images += pipeline(
                [demo_base.prompt(*combo) for combo, _ in chunk],
                generator=[torch.Generator().manual_seed(seed) for _, seed in chunk],
                callback_on_step_end=callback if parsed else None,
                **demo.RENDER,
            ).images
    mixer.set_step_weights(dict.fromkeys(parsed))
    return images


def statistics(images, jobs, weights) -> tuple[float, float, float, float]:
    palette = demo_content.styled_palette(demo.styled_as(weights))
    return (
        float(np.mean([demo_base.saturation(image) for image in images])),
        float(np.mean([demo_base.stripe_energy(image) for image in images])),
        float(np.mean([demo_content.read_content(image, palette).matches(*combo)
                       for image, (combo, _) in zip(images, jobs)])),
        float(np.mean([demo_base.measure(image).matches(*combo)
                       for image, (combo, _) in zip(images, jobs)])),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", type=Path)
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    adapters = {style: args.adapters / style / f"{style}.safetensors" for style in demo.STYLES}
    pipeline, mixer = demo.demo_pipeline(adapters)
    jobs = [(combo, seed) for combo in demo_base.HELD_OUT for seed in range(args.seeds)]
    both = {"sepia": 1.0, "stripes": 1.0}
    configurations = [("base", "add", {}, {}), ("sepia 1.0", "add", {"sepia": 1.0}, {}),
                      ("stripes 1.0", "add", {"stripes": 1.0}, {}),
                      (f"stripes {LATE}", "add", {"stripes": 1.0}, {"stripes": LATE})]
    for mode in MIX_MODES:
        configurations += [(f"both 1.0, {mode}", mode, both, {}),
                           (f"sepia 1.0 + stripes {LATE}, {mode}", mode, both, {"stripes": LATE})]
    print(f"demo base, {len(demo_base.HELD_OUT)} held-out prompts x {args.seeds} seeds, "
          f"{demo.RENDER['num_inference_steps']} steps\n")
    print("| configuration | saturation | stripe energy | sepia kept | stripes kept | content "
          "| measure |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    results = {}
    for label, mode, weights, schedules in configurations:
        mixer.set_mode(mode)
        results[label] = saturation, stripes, content, measured = statistics(
            render(pipeline, mixer, weights, schedules, jobs), jobs, weights)
        kept = ["", ""]
        if "base" in results and "sepia 1.0" in results and "stripes 1.0" in results:
            base, sepia_alone, stripes_alone = (results[k] for k in
                                                ("base", "sepia 1.0", "stripes 1.0"))
            kept = [f"{(saturation - base[0]) / (sepia_alone[0] - base[0]):.2f}",
                    f"{(stripes - base[1]) / (stripes_alone[1] - base[1]):.2f}"]
        print(f"| {label} | {saturation:.3f} | {stripes:.4f} | {kept[0]} | {kept[1]} "
              f"| {content:.3f} | {measured:.3f} |", flush=True)


if __name__ == "__main__":
    main()
