"""Mix modes: how the updates of several adapters on one module combine into its weight.

    add         W = base + sum_i c_i delta_i                          (the default; A1111,
                                                                       ComfyUI and diffusers)
    orthogonal  W = base + sum_i (c_i - 1/2 sum_{j != i} c_j <delta_i, delta_j> / |delta_i|^2)
                    * delta_i

`orthogonal` counts the part two updates share once instead of twice: each update gives up
half of the other's projection on it (Frobenius inner product, per module), so two copies of
one adapter at 1 and 1 fuse as that adapter at 1, two unrelated (orthogonal) updates add
exactly as in `add`, and a module that one adapter alone touches is as in `add`. It was
chosen by measurement (bench/mix_interference.py, bench/RESULTS-mix.md) over per-module norm
balancing, projection off the other adapter's output subspace, K-LoRA's per-module top-k
selection, TIES (trim + sign election) and per-element max magnitude.

Both modes only change the coefficients of the adapters' updates, per module, from a Gram
matrix of the updates that depends on the adapters alone (computed once, in float64, from the
LoRA factors without forming the dense update). So the fused weight stays one GEMM over the
concatenated ranks (a generation costs the base's time), `mix --out` stays an exact
concatenation, and the weights stay a pure function of the mix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

import torch

from sdlora.adapters.core import Layer, LoraLayer
from sdlora.errors import SdloraError

MixMode = Literal["add", "orthogonal"]
MIX_MODES: tuple[str, ...] = get_args(MixMode)
DEFAULT_MIX_MODE: MixMode = "add"


def check_mix_mode(mode: str) -> MixMode:
    """`mode` when it names a mix mode; else a one-line SdloraError listing them."""
    if mode not in MIX_MODES:
        raise SdloraError(f"unknown mix mode {mode!r}; expected one of {', '.join(MIX_MODES)}")
    return mode  # type: ignore[return-value]


def mixed_coefficients(
    mode: MixMode, coefficients: Mapping[str, float], gram: Mapping[tuple[str, str], float]
) -> dict[str, float]:
    """The coefficient each adapter's update is fused with on one module.

    `coefficients`: adapter -> its coefficient there (zeros left out); `gram`: (a, b) -> the
    Frobenius inner product of a's and b's unweighted updates, for every pair of them
    (`inner_product`). Names are visited in sorted order, so the floats come out the same
    whatever order the mix was set in.
    """
    if mode == "add" or len(coefficients) < 2:
        return dict(coefficients)
    names = sorted(coefficients)
    mixed = {}
    for name in names:
        own = gram[name, name]
        shared = sum(coefficients[other] * gram[name, other] for other in names if other != name)
        mixed[name] = coefficients[name] - (0.5 * shared / own if own > 0 else 0.0)
    return mixed


def inner_product(first: Layer, second: Layer) -> float:
    """<delta_first, delta_second> (Frobenius), in float64; LoRA pairs stay factored:
    <s1 U1 D1, s2 U2 D2> = s1 s2 sum((U1^T U2) * (D1 D2^T)), r x r matrices only."""
    if isinstance(first, LoraLayer) and isinstance(second, LoraLayer):
        ups = first.up.flatten(1).double().T @ second.up.flatten(1).double()
        downs = first.down.flatten(1).double() @ second.down.flatten(1).double().T
        return float((ups * downs).sum()) * first.scale * second.scale
    return float((first.delta(torch.float64).flatten() * second.delta(torch.float64).flatten()).sum())
