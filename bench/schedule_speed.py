"""Cost of a weight schedule that changes at every step, on the SD1.5-sized model.

    python bench/schedule_speed.py [--runs 3]

The pipeline and rank-16 adapters of bench/mix_speed.py (UNet and text encoder attention).
Three adapters, each with a schedule (sdlora.mix.schedules) whose weight changes at every step:
between steps the session calls `Mixer.set_step_weights`, which re-fuses those adapters' UNet
modules only (the text encoder keeps its weights). Measured on one thread, process CPU time:
one UNet step (batch 2, 256 px) and one step's re-weight of the three adapters; a 20-step image
costs 20 steps + 19 re-weights against the base's 20 steps (the VAE and the text encoder, the
same in both, are left out, which makes the ratio an upper bound). Goal: <= 1.05x.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from mix_speed import random_lora, sd15_pipeline, seconds, unet_step

from sdlora.mix.mixer import Mixer
from sdlora.mix.schedules import WeightSchedule

STEPS = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipeline = sd15_pipeline()
    mixer = Mixer(pipeline)
    names = []
    for seed in range(3):
        adapter, _ = random_lora(pipeline, f"style{seed}", seed, text_encoder=True)
        mixer.add(adapter, 1.0)
        names.append(adapter.name)
    ramp = WeightSchedule(to=0.2)  # 1.0 at the first step to 0.2 at the last: a new weight each step
    step = unet_step(pipeline.unet, 32)
    step()  # warm-up
    step_seconds = statistics.median(seconds(step) for _ in range(args.runs))
    changes = [
        seconds(lambda i=i: mixer.set_step_weights(
            {name: ramp.weight(1.0, i, STEPS) for name in names}))
        for i in range(1, STEPS)
    ]
    change = statistics.median(changes)
    ratio = (STEPS * step_seconds + (STEPS - 1) * change) / (STEPS * step_seconds)
    print("SD1.5-sized UNet, 256 px, batch 2, 1 thread, CPU time; 3 rank-16 adapters\n")
    print("| UNet step | re-weight of 3 adapters per step | 20-step image vs base |")
    print("|---:|---:|---:|")
    print(f"| {step_seconds * 1000:.0f} ms | {change * 1000:.1f} ms | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
