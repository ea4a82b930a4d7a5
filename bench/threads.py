"""Thread counts under load: why sdlora's default counts free cores (sdlora/threads.py).

Renders one picture of the demo base (--size px, --steps steps) in a fresh `sdlora render`
process with 1 thread, with every core, with every core and spinning OpenMP waits
(OMP_WAIT_POLICY=ACTIVE: what sdlora's passive default prevents), and with sdlora's default,
on the machine as it is ("idle") and with one busy-looping process per core but one
("loaded"). Prints wall time per setting and the ratio to 1 thread in the same condition.

    python bench/threads.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time


def busy_loop() -> None:
    while True:
        pass


def render_seconds(threads: str | None, env: dict, size: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "sdlora", "render", "--base", "demo", "--prompt",
                   "a red circle on a blue background", "--steps", str(steps),
                   "--width", str(size), "--height", str(size), "--out", out]
        if threads:
            command += ["--threads", threads]
        start = time.perf_counter()
        subprocess.run(command, check=True, env=env, capture_output=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    spinning = {**env, "OMP_WAIT_POLICY": "ACTIVE"}
    settings = {
        "1 thread": ("1", env),
        f"{cores} threads": (str(cores), env),
        f"{cores} threads, spinning waits": (str(cores), spinning),
        "sdlora default": (None, env),
    }
    print(f"| condition | threads | wall s (median of {args.repeats}) | vs 1 thread |")
    print("|---|---|---|---|")
    for condition in ("idle", "loaded"):
        hogs = []
        if condition == "loaded":
            hogs = [multiprocessing.Process(target=busy_loop, daemon=True)
                    for _ in range(max(1, cores - 1))]
            for hog in hogs:
                hog.start()
            time.sleep(2)
        try:
            times = {
                label: statistics.median(
                    render_seconds(threads, environment, args.size, args.steps)
                    for _ in range(args.repeats)
                )
                for label, (threads, environment) in settings.items()
            }
        finally:
            for hog in hogs:
                hog.terminate()
        for label, seconds in times.items():
            ratio = seconds / times["1 thread"]
            print(f"| {condition} | {label} | {seconds:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
