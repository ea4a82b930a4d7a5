"""Recompute the feed-forward activations of the UNet's transformer blocks during backward.

The feed-forwards (GEGLU: a Linear to 8x the width, a GELU, a product, a Linear back) keep the
largest activations of a training step: 132 of the 386 MiB an SD1.5 UNet saves at 256 px. Their
forward is cheap next to the attention and the ResNet convolutions, so recomputing it in
backward trades about a tenth of the step time for a third of the saved activations (on by
default: train.recompute_feed_forward). Full gradient checkpointing (train.gradient_checkpointing)
recomputes every block and already covers them.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def recompute_feed_forwards(unet: torch.nn.Module) -> int:
    """Wrap the forward of every diffusers FeedForward in `unet`; returns how many."""
    from diffusers.models.attention import FeedForward

    wrapped = 0
    for module in unet.modules():
        if isinstance(module, FeedForward):
            module.forward = _recomputed(module.forward)
            wrapped += 1
    return wrapped


def _recomputed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # Non-reentrant: works with frozen inputs, and replays the RNG so LoRA dropout repeats.
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run
