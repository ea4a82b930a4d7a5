"""Process settings that make training on a CPU faster and leaner (bench/RESULTS-train.md)."""

from __future__ import annotations

import contextlib

import torch

from sdlora.malloc import serve_large_blocks_from_mmap


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
    serve_large_blocks_from_mmap()  # freed activations go back to the OS at once
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous
