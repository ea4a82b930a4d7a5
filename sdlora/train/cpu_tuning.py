"""Process settings that make training on a CPU faster and leaner (bench/RESULTS-train.md)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform

import torch

# mallopt's parameter numbers, from glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 1 << 20


@contextlib.contextmanager
def tuned_for_cpu(device: torch.device):
    """Within the block, on CPU: PyTorch's own convolution, and activations outside the heap."""
    if device.type != "cpu":
        yield
        return
    previous = torch.backends.mkldnn.enabled
    # oneDNN copies every frozen conv weight into its own layout on every call; PyTorch's own
    # conv trains faster and peaks lower.
    torch.backends.mkldnn.enabled = False
    keep_large_blocks_out_of_the_heap()
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def keep_large_blocks_out_of_the_heap() -> None:
    """Have glibc serve blocks of 1 MiB and more from mmap for the rest of the process.

    glibc's heap never gives back memory below its top, and its mmap threshold rises to 32 MiB
    as soon as a large block is freed: after one step every activation comes from the heap,
    and the freed gaps between long-lived blocks keep the peak high. At a fixed 1 MiB, freed
    activations go back to the OS at once: SD1.5-sized UNet at 256 px, peak RSS 4.40 -> 4.25
    GiB, paid for in page faults (fresh pages for each large block). glibc has no call that
    restores its moving threshold, so it stays fixed; a threshold the user set with
    MALLOC_MMAP_THRESHOLD_ is left alone.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL("libc.so.6")
    # Free space above 2 MiB at the heap's top goes back too (glibc's own rule: twice the mmap
    # threshold), and malloc_trim returns what loading and caching left free inside the heap.
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_BYTES)
    libc.malloc_trim(0)
