"""One module's tensors from a file -> its validated LoRA, LoHa or LoKr layer.

Every check here stands between a damaged or hand-edited file and a silent failure later: a
nan/inf weight or an integer tensor renders an all-black picture, a rank of 0 divides by zero,
and mismatched shapes fail deep inside a matmul. Each error names the file key to fix.
"""

from __future__ import annotations

import math

import torch

from sdlora.adapters.core import Layer, LohaLayer, LokrLayer, LoraLayer
from sdlora.errors import SdloraError

# Float types torch.isfinite handles directly; the rarer ones (float8) are checked as float32.
_ISFINITE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(key: str, tensor: torch.Tensor) -> None:
    """Refuse what would poison the picture: integer/bool/complex tensors and nan/inf values."""
    if not tensor.is_floating_point():
        raise SdloraError(
            f"{key} holds {str(tensor.dtype).removeprefix('torch.')} values, not floats; "
            "the file is damaged or not a LoRA adapter"
        )
    values = tensor if tensor.dtype in _ISFINITE_DTYPES else tensor.float()
    if not torch.isfinite(values).all():
        raise SdloraError(
            f"{key} contains nan or inf values (the training diverged or the file is damaged); "
            "use an earlier checkpoint or re-export the adapter"
        )


class LayerTensors:
    """The tensors of one module, by parameter ("down", "up", "alpha", "hada_w1_a", ...)."""

    def __init__(self, path: str, tensors: dict[str, torch.Tensor], names: dict[str, str]):
        self.path = path  # the module path, for messages about the module as a whole
        self.tensors = tensors
        self.names = names  # parameter -> the key in the file, for messages about one tensor

    def __contains__(self, parameter: str) -> bool:
        return parameter in self.tensors

    def require(self, *parameters: str) -> list[torch.Tensor]:
        missing = [name for name in parameters if name not in self.tensors]
        if missing:
            raise SdloraError(
                f"{self.path} has no {', '.join(missing)} weights; the file is damaged"
            )
        return [self.tensor(name, None) for name in parameters]

    def tensor(self, parameter: str, dims: tuple[int, ...] | None) -> torch.Tensor:
        """The tensor, checked to be non-empty and (when `dims` is given) of those dimensions."""
        tensor = self.tensors[parameter]
        if dims is not None and tensor.dim() not in dims:
            expected = " or ".join(str(d) for d in dims)
            raise SdloraError(
                f"{self.names[parameter]} has {tensor.dim()} dimensions {tuple(tensor.shape)}; "
                f"expected {expected}; the file is damaged"
            )
        if tensor.numel() == 0:
            raise SdloraError(
                f"{self.names[parameter]} is empty (shape {tuple(tensor.shape)}, rank 0?); "
                "the file is damaged"
            )
        return tensor

    def alpha(self) -> float | None:
        if "alpha" not in self.tensors:
            return None
        alpha = self.tensors["alpha"]
        if alpha.numel() != 1:
            raise SdloraError(
                f"{self.names['alpha']} holds {alpha.numel()} values (shape "
                f"{tuple(alpha.shape)}); an alpha is one number; the file is damaged"
            )
        return float(alpha.float())

    def mismatch(self, first: str, second: str, what: str) -> SdloraError:
        a, b = self.tensors[first], self.tensors[second]
        return SdloraError(
            f"{self.names[first]} {tuple(a.shape)} and {self.names[second]} {tuple(b.shape)} "
            f"disagree on {what}; the file is damaged"
        )


def build_layer(params: LayerTensors, default_alpha: float | None) -> Layer:
    """One module's tensors -> its layer; the alpha key wins over `default_alpha`, then rank."""
    if "dora" in params:
        raise SdloraError(
            f"{params.path} is a DoRA layer, which sdlora cannot apply; use a plain LoRA"
        )
    if "tucker" in params:
        raise SdloraError(
            f"{params.path} uses a Tucker/CP-decomposed conv (lora_mid, hada_t or lokr_t keys), "
            "which sdlora does not read; re-export the adapter without use_tucker/use_cp"
        )
    alpha = params.alpha()
    if alpha is None:
        alpha = default_alpha
    if "down" in params or "up" in params:
        return _build_lora(params, alpha)
    if any(parameter.startswith("hada_") for parameter in params.tensors):
        return _build_loha(params, alpha)
    return _build_lokr(params, alpha)


def _build_lora(params: LayerTensors, alpha: float | None) -> LoraLayer:
    params.require("down", "up")
    down = params.tensor("down", (2, 4))
    up = params.tensor("up", (2, 4))
    if up.dim() == 4 and up.shape[2:] != (1, 1):
        raise SdloraError(
            f"{params.names['up']} has shape {tuple(up.shape)}; a LoRA up weight of a conv is "
            "(out, rank, 1, 1); the file is damaged"
        )
    if down.shape[0] != up.shape[1]:
        raise params.mismatch("down", "up", "the rank")
    return LoraLayer(down=down, up=up, alpha=alpha if alpha is not None else down.shape[0])


def _build_loha(params: LayerTensors, alpha: float | None) -> LohaLayer:
    params.require("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    w1a, w1b, w2a, w2b = (
        params.tensor(name, (2,)) for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    )
    for a, b in (("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")):
        if params.tensors[a].shape[1] != params.tensors[b].shape[0]:
            raise params.mismatch(a, b, "the rank")
    if w1a.shape[0] != w2a.shape[0]:
        raise params.mismatch("hada_w1_a", "hada_w2_a", "the output size")
    if w1b.shape[1] != w2b.shape[1]:
        raise params.mismatch("hada_w1_b", "hada_w2_b", "the input size")
    return LohaLayer(
        w1a=w1a,
        w1b=w1b,
        w2a=w2a,
        w2b=w2b,
        alpha=alpha if alpha is not None else w1b.shape[0],
        # Conv LoHa stores (rank, in * kh * kw); match_to_base reshapes it to the module.
        weight_shape=(w1a.shape[0], w1b.shape[1]),
    )


def _build_lokr(params: LayerTensors, alpha: float | None) -> LokrLayer:
    """LoKr: each Kronecker factor is stored whole (lokr_wN) or as a low-rank pair (_a @ _b).

    As LyCORIS and AUTOMATIC1111 do, the scale is alpha / rank only when a factor is decomposed
    (rank of the second factor's pair, else the first's); with both factors whole it is 1.
    """
    factors = []
    for index, dims in ((1, (2,)), (2, (2, 4))):  # only the second factor may be a conv kernel
        if f"lokr_w{index}" in params:
            factors.append(params.tensor(f"lokr_w{index}", dims).float())
            continue
        pair = (f"lokr_w{index}_a", f"lokr_w{index}_b")
        params.require(*pair)
        first, second = params.tensor(pair[0], (2,)), params.tensor(pair[1], dims)
        if first.shape[1] != second.shape[0]:
            raise params.mismatch(*pair, "the rank")
        product = first.float() @ second.float().flatten(1)
        factors.append(product.reshape(first.shape[0], *second.shape[1:]))
    w1, w2 = factors
    decomposed = [
        params.tensors[f"lokr_w{i}_b"].shape[0] for i in (2, 1) if f"lokr_w{i}_b" in params
    ]
    rank = decomposed[0] if decomposed else None
    scale = alpha / rank if rank and alpha is not None else 1.0
    weight_shape = (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:])
    return LokrLayer(w1=w1, w2=w2, scale=scale, weight_shape=weight_shape)


def metadata_alpha(value: object, key: str, where: str) -> float:
    """An alpha from JSON metadata, which must be a finite number (JSON allows NaN, Infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SdloraError(f"metadata {key} {where} is {value!r}, not a number; the file is damaged")
    return float(value)
