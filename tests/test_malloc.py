"""glibc settings for large blocks: generation re-uses them from the heap, training gives them
back; a threshold the user set is left alone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

# 20 blocks of 64 MiB, each written once and freed: the page faults they cost
FAULTS = """
import resource, sys
from sdlora import malloc
getattr(malloc, sys.argv[1])() if sys.argv[1] != "none" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block = bytearray(64 << 20)
    del block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(setting: str, **environ: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", FAULTS, setting], capture_output=True, text=True, check=True,
        env={**os.environ, **environ},
    )
    return int(result.stdout)


def test_generation_reuses_large_blocks_instead_of_faulting_them_in_again():
    pages_per_block = (64 << 20) // 4096
    assert faults("none") > 15 * pages_per_block  # glibc's default: fresh pages every time
    assert faults("keep_large_blocks_in_the_heap") < 3 * pages_per_block


def test_training_gives_large_blocks_back_and_a_users_threshold_is_kept():
    pages_per_block = (64 << 20) // 4096
    assert faults("serve_large_blocks_from_mmap") > 15 * pages_per_block
    assert faults("keep_large_blocks_in_the_heap", MALLOC_MMAP_THRESHOLD_="131072") > (
        15 * pages_per_block
    )
