"""How many CPU threads torch may use: never so many that a busy machine collapses.

torch's default is one thread per core. When another process keeps some of those cores busy,
every parallel region waits for its slowest thread, and OpenMP's spinning waiters take the time
the busy cores had left: on a 2-core machine with one core busy, a 64 px render took 7.9 s on
2 threads against 1.1 s on one, 60 training steps 792 s against 17 s (bench/threads.py
measures it). So sdlora counts the cores that are free when it starts (the cores it may run
on, less the load average) and lets waiting threads sleep (OMP_WAIT_POLICY=PASSIVE, set before
torch loads, unless the user set it); `--threads N` overrides the count.
"""

from __future__ import annotations

import os


def prepare_environment() -> None:
    """Before torch is imported: idle OpenMP threads sleep instead of spinning."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def free_cores() -> int:
    """Cores this process may run on, less those other processes keep busy (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, min(cores, cores - busy))


def use_threads(requested: int | None) -> int:
    """Set torch's thread count to `requested`, or to the free cores when None; returns it."""
    import torch

    threads = requested if requested else free_cores()
    torch.set_num_threads(threads)
    return threads
