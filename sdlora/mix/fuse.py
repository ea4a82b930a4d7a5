"""One fused module: W = W_base + sum_i c_i * delta_i, recomputed from a kept base copy.

c_i is adapter i's coefficient as the mix mode combines it (sdlora.mix.modes; in `add`, its
coefficient as set).

The weight is always recomputed from the base copy by the same steps, never nudged by the change
(W += (c_new - c_old) * delta): nudges round differently depending on the changes before, so the
image would depend on the slider's history. Recomputed, the weights are a pure function of the
mix: bit for bit what a fresh Mixer fuses for the same mix.

The recompute, in float32 on the weight's device, adapters in name order:
    W = base + [c_1 s_1 up_1 | c_2 s_2 up_2 | ...] @ [down_1; down_2; ...]   (LoRA: one GEMM)
        + c_k * delta_k for each other layer (LoHa, LoKr: dense deltas)
One GEMM over the concatenated ranks reads the base and writes the weight once, instead of a
copy plus one pass per adapter. On the CPU it runs in row tiles of TILE_ELEMENTS, so the base
rows, the product and the weight rows meet in the cache (bench/RESULTS-mix.md has the numbers).

Memory: the base copy lives on the weight's device in the weight's dtype, so a change copies
nothing between host and device; it costs one copy of every fused module (SD1.5 attention:
122 M parameters, 244 MB in fp16). Each adapter's factors are kept on that device in float32
(a few MB per adapter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import torch

from sdlora.adapters.core import Layer, LoraLayer

# 128 Ki floats = 512 KiB per tile: base rows and weight rows fit in L2 together.
TILE_ELEMENTS = 1 << 17


class FusedModule:
    """A module weight with the contributions of the adapters fused into it."""

    def __init__(self, weight: torch.nn.Parameter):
        self.weight = weight
        self.users: set[str] = set()  # loaded adapters with a layer on this module
        self.contributions: dict[str, float] = {}  # adapter -> coefficient, zeros left out
        self.fused: dict[str, float] = {}  # adapter -> coefficient as fused (the mode's)
        self.gram: dict[tuple[str, str], float] = {}  # (a, b) -> <delta_a, delta_b>
        self.base: torch.Tensor | None = None  # made when something is first fused
        self._device_layers: dict[str, Layer] = {}  # adapter -> its layer in fp32 on device

    def forget(self, name: str) -> None:
        """Drop adapter `name`'s device copy and inner products (after its contribution went
        to 0)."""
        self._device_layers.pop(name, None)
        self.gram = {pair: value for pair, value in self.gram.items() if name not in pair}

    @torch.no_grad()
    def refuse(self, layers: Mapping[str, Layer], coefficients: Mapping[str, float]) -> None:
        """Set the weight to base + sum of coefficient * delta over `coefficients` (adapter ->
        coefficient as fused), and remember them as `fused`.

        `layers` maps each contributing adapter to its layer on this module.
        """
        self.fused = dict(coefficients)
        weight = self.weight.data
        if not self.fused:
            if self.base is not None:
                weight.copy_(self.base)
            return
        if self.base is None:
            self.base = weight.clone(memory_format=torch.contiguous_format)
        rows = weight.shape[0]
        base = self.base.view(rows, -1)
        up, down, dense = self._terms(layers)
        in_place = weight.dtype == torch.float32 and weight.is_contiguous()
        if weight.is_contiguous():
            tiles, target = _row_tiles(rows, base.shape[1], weight.device), weight.view(rows, -1)
        else:  # e.g. channels_last: fused whole, then copied in the weight's own layout
            tiles, target = [slice(0, rows)], None
        for tile in tiles:
            base_rows = base[tile] if base.dtype == torch.float32 else base[tile].float()
            out = target[tile] if in_place else None
            fused = torch.addmm(base_rows, up[tile], down, out=out)
            for coefficient, delta in dense:
                fused.add_(delta[tile], alpha=coefficient)
            if target is None:
                weight.copy_(fused.view(weight.shape))
            elif not in_place:
                target[tile].copy_(fused)

    def _terms(self, layers: Mapping[str, Layer]):
        """(up, down) of the LoRA layers, concatenated in name order with each coefficient and
        scale folded into up; and (coefficient, dense delta) of the other layers."""
        rows = self.weight.shape[0]
        columns = self.weight.numel() // rows
        ups, downs, dense = [], [], []
        for name in sorted(self.fused):
            coefficient = self.fused[name]
            layer = self._on_device(name, layers[name])
            if isinstance(layer, LoraLayer):
                ups.append(layer.up.flatten(1) * (coefficient * layer.scale))
                downs.append(layer.down.flatten(1))
            else:
                dense.append((coefficient, layer.delta(torch.float32).reshape(rows, -1)))
        device = self.weight.device
        if not ups:
            return (
                torch.zeros(rows, 0, device=device),
                torch.zeros(0, columns, device=device),
                dense,
            )
        return torch.cat(ups, dim=1), torch.cat(downs, dim=0), dense

    def _on_device(self, name: str, layer: Layer) -> Layer:
        """`layer` with its tensors in float32 on the weight's device, copied once."""
        if name not in self._device_layers:
            device = self.weight.device
            tensors = {
                field.name: value.to(device, torch.float32)
                for field in dataclasses.fields(layer)
                if isinstance(value := getattr(layer, field.name), torch.Tensor)
            }
            self._device_layers[name] = dataclasses.replace(layer, **tensors)
        return self._device_layers[name]


def _row_tiles(rows: int, columns: int, device: torch.device) -> Iterator[slice]:
    """Row slices of about TILE_ELEMENTS on the CPU; one slice elsewhere (GPUs stream well)."""
    step = max(1, TILE_ELEMENTS // columns) if device.type == "cpu" else rows
    for start in range(0, rows, step):
        yield slice(start, start + step)
