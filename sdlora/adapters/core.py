"""The adapter in memory: one normalized form that every file format is read into.

An `Adapter` maps module paths of the base pipeline to the update each module receives:

    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" -> LoraLayer
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"      -> LoraLayer
    "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"    -> LoraLayer (SDXL)

The first dotted part is the pipeline component, the rest is the module name inside it, exactly
as `component.named_modules()` spells it (diffusers names, never LDM names). Readers produce this
form, writers consume it, and the mixer fuses `layer.delta()` into the base weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sdlora.adapters.embeddings import Embedding

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class LoraLayer:
    """delta W = (alpha / rank) * up @ down, for a Linear or a Conv2d.

    down: (rank, in_features) or, for convs, (rank, in_channels, kh, kw)
    up:   (out_features, rank) or (out_channels, rank, 1, 1)
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full update, shaped like the module's weight."""
        up = self.up.to(dtype).flatten(1)
        down = self.down.to(dtype).flatten(1)
        weight = (up @ down) * self.scale
        if self.down.dim() == 4:
            return weight.reshape(self.up.shape[0], *self.down.shape[1:])
        return weight


@dataclass
class LohaLayer:
    """LyCORIS LoHa: delta W = (alpha / rank) * (w1a @ w1b) * (w2a @ w2b), Hadamard product."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float
    weight_shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        first = self.w1a.to(dtype) @ self.w1b.to(dtype)
        second = self.w2a.to(dtype) @ self.w2b.to(dtype)
        return (first * second * (self.alpha / self.rank)).reshape(self.weight_shape)


@dataclass
class LokrLayer:
    """LyCORIS LoKr: delta W = scale * kron(w1, w2), each factor either full or a low-rank pair."""

    w1: torch.Tensor
    w2: torch.Tensor
    scale: float
    weight_shape: tuple[int, ...]

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w2 = self.w2.to(dtype)
        w1 = self.w1.to(dtype)
        if w2.dim() == 4 and w1.dim() == 2:
            w1 = w1[:, :, None, None]
        return (torch.kron(w1, w2) * self.scale).reshape(self.weight_shape)


Layer = LoraLayer | LohaLayer | LokrLayer


@dataclass
class Adapter:
    """A named set of per-module updates for one model family."""

    name: str
    layers: dict[str, Layer]
    family: str | None = None  # "sd1", "sd2", "sdxl", or None when the file does not tell
    metadata: dict[str, str] = field(default_factory=dict)
    # textual-inversion embeddings bundled with the layers (pivotal tuning), by prompt word
    embeddings: dict[str, Embedding] = field(default_factory=dict)

    def component_layers(self, component: str) -> dict[str, Layer]:
        """Layers of one component, keyed by the module name inside that component."""
        prefix = component + "."
        return {
            path[len(prefix) :]: layer for path, layer in self.layers.items() if path.startswith(prefix)
        }

    @property
    def components(self) -> list[str]:
        return sorted({path.split(".", 1)[0] for path in self.layers})

    @property
    def num_parameters(self) -> int:
        total = 0
        for layer in self.layers.values():
            tensors = [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
            total += sum(tensor.numel() for tensor in tensors)
        return total


def split_path(path: str) -> tuple[str, str]:
    """"unet.down_blocks.0..." -> ("unet", "down_blocks.0...")."""
    component, _, module = path.partition(".")
    return component, module
