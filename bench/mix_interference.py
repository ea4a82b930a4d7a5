"""Interference of two style adapters on the demo base: styles kept and content, per mix mode.

    python bench/mix_interference.py OUT_DIR [--train-seeds 0,1,2,3,4] [--seeds 20]

For each training seed S the demo's two adapters are trained by the demo's own recipe
(configs/demo.yaml, `sdlora.demo.style_config`) with train.seed=S into OUT_DIR/seed-S (about
1 minute on one core; kept and reused), then every configuration draws the held-out prompts of
the demo base (sdlora.base.demo_base.HELD_OUT, combinations it never saw) x --seeds seeds.
A single training run is one draw: the same recipe at another seed moves the mix's content by
up to 0.3, so the tables average over the training seeds (each seed's statistics are cached
in OUT_DIR/seed-S/statistics.json, so runs over disjoint seeds can go in parallel and a last
run with all of them only prints).

Statistics, per configuration:
- saturation (mean HSV S, what sepia lowers) and stripe energy (what stripes raises);
- "kept": the move of that statistic from the base, as a fraction of the style's move alone at
  the same weight, per training seed, then averaged (the goal: both styles at 1.0 keep >= 0.8);
- content: the fraction of images whose subject reads as their prompt (shape kind and both
  colours, `demo_content.read_content`, colours named as the styles at those weights draw
  them, so a style's own colour grade or texture is not counted against it); the range is the
  lowest and highest training seed's.
Configurations: each style alone at 0.5 and 1.0, the stripes alone on the late half of the
steps (`<lora:stripes:1@0.5-1>`, sdlora.mix.schedules); per mix mode: both at 1.0, sepia 1.0
with late stripes, and one style at 0.5 with the other at 1.0. One thread; results in
bench/RESULTS-mix.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from sdlora import demo
from sdlora.base import demo_base, demo_content
from sdlora.mix.modes import MIX_MODES

LATE = "@0.5-1"  # the stripes on the late half of the steps
ALONE = [("base", {}), ("sepia 0.5", {"sepia": 0.5}), ("sepia 1.0", {"sepia": 1.0}),
         ("stripes 0.5", {"stripes": 0.5}), ("stripes 1.0", {"stripes": 1.0})]
MIXES = [("both 1.0", {"sepia": 1.0, "stripes": 1.0}, {}),
         (f"sepia 1.0 + stripes 1{LATE}", {"sepia": 1.0, "stripes": 1.0}, {"stripes": LATE}),
         ("sepia 0.5 + stripes 1.0", {"sepia": 0.5, "stripes": 1.0}, {}),
         ("sepia 1.0 + stripes 0.5", {"sepia": 1.0, "stripes": 0.5}, {})]


def configurations() -> list[tuple[str, str, dict, dict]]:
    """(label, mode, weights, schedules) of every row."""
    rows = [(label, "add", weights, {}) for label, weights in ALONE]
    rows.append((f"stripes 1{LATE}", "add", {"stripes": 1.0}, {"stripes": LATE}))
    rows += [(f"{label}, {mode}", mode, weights, schedules)
             for label, weights, schedules in MIXES for mode in MIX_MODES]
    return rows


def render(pipeline, mixer, mode, weights, schedules, jobs, batch=40):
    """One image per (combo, seed) job, `batch` at a time (sdlora.demo.render)."""
    images = []
    for start in range(0, len(jobs), batch):
        combos, seeds = zip(*jobs[start:start + batch])
        images += demo.render(pipeline, mixer, weights, combos, seeds, mode, schedules)
    return images


def statistics(images, jobs, weights) -> dict[str, float]:
    palette = demo_content.styled_palette(demo.styled_as(weights))
    return {
        "saturation": float(np.mean([demo_base.saturation(image) for image in images])),
        "stripes": float(np.mean([demo_base.stripe_energy(image) for image in images])),
        "content": float(np.mean([demo_content.read_content(image, palette).matches(*combo)
                                  for image, (combo, _) in zip(images, jobs)])),
    }


def train_adapters(folder: Path, seed: int) -> dict[str, Path]:
    """The demo's two adapters trained with train.seed=`seed` into `folder` (reused when there)."""
    from sdlora.train.loop import train

    adapters = {}
    for style in demo.STYLES:
        path = folder / style / f"{style}.safetensors"
        if not path.is_file():
            config = demo.style_config(style, folder, overrides=(f"train.seed={seed}",))
            with contextlib.redirect_stderr(io.StringIO()):  # the progress bars of 10 runs
                train(config, overwrite=True)
        adapters[style] = path
    return adapters


def measure_seed(folder: Path, seed: int, seeds: int) -> dict[str, dict[str, float]]:
    """Every configuration's statistics for the adapters of training seed `seed`."""
    cache = folder / "statistics.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached["seeds"] == seeds:
            return cached["rows"]
    pipeline, mixer = demo.demo_pipeline(train_adapters(folder, seed))
    jobs = [(combo, image_seed) for combo in demo_base.HELD_OUT for image_seed in range(seeds)]
    rows = {}
    for label, mode, weights, schedules in configurations():
        rows[label] = statistics(render(pipeline, mixer, mode, weights, schedules, jobs), jobs,
                                 weights)
        print(f"  seed {seed}: {label}: {rows[label]}", flush=True)
    cache.write_text(json.dumps({"seeds": seeds, "rows": rows}))
    return rows


def kept(rows, label: str, weights: dict) -> tuple[float | None, float | None]:
    """Each style's move in row `label` as a fraction of its move alone at its weight there."""
    base = rows["base"]
    fractions = []
    for style, statistic in (("sepia", "saturation"), ("stripes", "stripes")):
        alone_label = f"{style} {weights.get(style, 0.0)}"  # as in ALONE
        if alone_label in rows and label != alone_label:
            alone = rows[alone_label][statistic] - base[statistic]
            fractions.append((rows[label][statistic] - base[statistic]) / alone)
        else:
            fractions.append(None)
    return fractions[0], fractions[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train-seeds", default="0,1,2,3,4")
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_seeds = [int(seed) for seed in args.train_seeds.split(",")]
    per_seed = [measure_seed(args.out / f"seed-{seed}", seed, args.seeds) for seed in train_seeds]
    print(f"\ndemo base, {len(demo_base.HELD_OUT)} held-out prompts x {args.seeds} seeds, "
          f"{demo.RENDER['num_inference_steps']} steps; adapters trained with seeds "
          f"{args.train_seeds}: means (content: lowest-highest seed)\n")
    print("| configuration | saturation | stripe energy | sepia kept | stripes kept | content |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, _, weights, _ in configurations():
        def mean(values):
            values = [value for value in values if value is not None]
            return f"{np.mean(values):.2f}" if values else ""
        sepia_kept, stripes_kept = zip(*(kept(rows, label, weights) for rows in per_seed))
        content = [rows[label]["content"] for rows in per_seed]
        print(f"| {label} | {np.mean([rows[label]['saturation'] for rows in per_seed]):.3f} "
              f"| {np.mean([rows[label]['stripes'] for rows in per_seed]):.4f} "
              f"| {mean(sepia_kept)} | {mean(stripes_kept)} "
              f"| {np.mean(content):.3f} ({min(content):.2f}-{max(content):.2f}) |")


if __name__ == "__main__":
    main()
