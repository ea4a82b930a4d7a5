"""How glibc's allocator treats large blocks: the one process setting that trades page faults
for peak memory (Linux with glibc only; elsewhere, and when the user set MALLOC_MMAP_THRESHOLD_,
nothing is changed).

glibc serves a block above its mmap threshold from fresh pages and unmaps it when freed, so
every such block costs a page fault per 4 KiB page at its first touch; below it, the block
comes from the heap, re-used without faults, but the heap keeps its peak. The threshold starts
at 128 KiB and rises with freed blocks, to at most 32 MiB. The two uses want opposite ends:

- Training (`serve_large_blocks_from_mmap`): freed activations go back to the OS at once,
  which keeps the peak low (SD1.5-sized UNet at 256 px: peak RSS 4.40 -> 4.25 GiB).
- Generation (`keep_large_blocks_in_the_heap`): every UNet call allocates the same blocks
  again, attention's above 32 MiB; re-used from the heap instead of faulted in afresh, an
  SD1.5-sized render at 256 px spends 1.0 s of system time instead of 5.5 s per 2 images
  (bench/RESULTS-render.md).
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt's parameter numbers, from glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
TRAINING_MMAP_THRESHOLD = 1 << 20
GENERATION_MMAP_THRESHOLD = 1 << 30


def serve_large_blocks_from_mmap() -> None:
    """Blocks of 1 MiB and more from mmap for the rest of the process (training).

    glibc has no call that restores its moving threshold, so it stays fixed; free space above
    2 MiB at the heap's top goes back too (glibc's own rule: twice the mmap threshold), and
    malloc_trim returns what loading and caching left free inside the heap.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, TRAINING_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * TRAINING_MMAP_THRESHOLD)
        libc.malloc_trim(0)


def keep_large_blocks_in_the_heap() -> None:
    """Blocks up to 1 GiB from the heap, kept there when freed (generation). Threads other
    than the main one allocate from arenas of at most 64 MiB, so their larger blocks still
    come from mmap."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, GENERATION_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * GENERATION_MMAP_THRESHOLD)


def _glibc():
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL("libc.so.6")
