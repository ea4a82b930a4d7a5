"""The mixer: several adapters, each with its own weight, fused into the base weights.

Flow: `Adapter`s (LoRA factors on the CPU) -> `Mixer.add` resolves each layer to its module ->
weights are set (per adapter, optionally per component and per UNet block) -> every touched
module holds W = W_base + sum_i c_i * delta_i, where c_i is adapter i's effective weight there.

Because the mix lives in the module weights, a generation costs exactly what the base costs.
Changing one adapter's weight updates only the modules that adapter touches, by
W += (c_new - c_old) * up @ down (an in-place addmm on fp32 weights). Each touched module keeps
one CPU copy of its base weight, so that a module whose contributions all return to 0 is
restored bit for bit, and fp16/bf16 weights are recomputed from it in fp32 (adding small
deltas into a half-precision weight would drift). `Mixer(pipeline, reproducible=True)`
recomputes fp32 weights too, so that the same mix gives the same bits whatever came before.

A lock makes "set these weights, then generate" atomic for a multi-user web UI:

    with mixer.using({"oil": 0.8, "ink": -0.3}):
        image = pipeline(prompt).images[0]
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from sdlora.adapters.core import COMPONENTS, Adapter, Layer, LoraLayer, split_path
from sdlora.adapters.read import match_to_base
from sdlora.base.models import describe_pipeline
from sdlora.errors import SdloraError
from sdlora.mix.block_weights import check_block_key

# Exact incremental updates still round; refreshing from the base copy this often bounds the
# drift of a slider dragged for hours while keeping the usual update incremental.
REFRESH_EVERY = 64


@dataclass
class MixedAdapter:
    """What the mixer knows about one loaded adapter (returned by `Mixer.adapters`)."""

    name: str
    weight: float
    component_weights: dict[str, float]
    block_weights: dict[str, float]
    num_layers: int
    unmatched: list[str]


@dataclass
class _Entry:
    adapter: Adapter
    layers: dict[str, Layer]  # only the layers that matched a module of the base
    unmatched: list[str]
    weight: float = 0.0
    component_weights: dict[str, float] = field(default_factory=dict)
    block_weights: dict[str, float] = field(default_factory=dict)

    def coefficient(self, path: str) -> float:
        """Effective weight on one module: weight x component weight x UNet block weight."""
        component, module_name = split_path(path)
        factor = self.weight * self.component_weights.get(component, 1.0)
        if component == "unet" and self.block_weights:
            for key in _block_keys(module_name):
                if key in self.block_weights:
                    return factor * self.block_weights[key]
        return factor


@dataclass
class _Module:
    weight: torch.nn.Parameter
    users: set[str] = field(default_factory=set)  # loaded adapters with a layer here
    contributions: dict[str, float] = field(default_factory=dict)  # adapter -> fused coefficient
    base: torch.Tensor | None = None  # CPU copy of the base weight, made when first fused
    updates_since_refresh: int = 0


def _block_keys(module_name: str) -> list[str]:
    """Block-weight keys for a UNet module, most specific first: ["down.1.0", "down.1", "down"].

    Layer j of a block is its resnets.j / attentions.j; its down- or upsampler is layer 2 (the
    LDM layout, which A1111's block-weight vectors count in; see sdlora.mix.block_weights).
    """
    head, _, rest = module_name.partition(".")
    if head == "mid_block":
        return ["mid"]
    if head == "conv_in":
        return ["conv_in"]
    if head in ("down_blocks", "up_blocks"):
        kind = head.split("_")[0]
        block, _, inner = rest.partition(".")
        part, _, layer = inner.partition(".")
        layer = "2" if part in ("downsamplers", "upsamplers") else layer.partition(".")[0]
        keys = [f"{kind}.{block}.{layer}"] if layer.isdigit() else []
        return [*keys, f"{kind}.{block}", kind]
    return []


def _finite(value, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise SdloraError(f"{what} must be a finite number, not {value!r}")
    return number


def add_scaled(target: torch.Tensor, layer: Layer, coefficient: float) -> None:
    """target += coefficient * layer.delta, without materializing a LoRA's dense delta."""
    if isinstance(layer, LoraLayer) and target.is_contiguous():
        up = layer.up.to(target.device, target.dtype).flatten(1)
        down = layer.down.to(target.device, target.dtype).flatten(1)
        target.view(target.shape[0], -1).addmm_(up, down, alpha=coefficient * layer.scale)
    else:
        delta = layer.delta(torch.float32).to(target.device, target.dtype)
        target.add_(delta.reshape(target.shape), alpha=coefficient)


class Mixer:
    """Adapters fused into `pipeline`'s UNet and text encoders, re-weighted incrementally."""

    def __init__(self, pipeline, reproducible: bool = False):
        """`reproducible`: recompute each touched module from its base copy instead of adding
        the change, so the weights depend bit for bit on the mix alone, not on the order of
        changes (batch rendering wants this; a slider wants the cheaper incremental update)."""
        self.pipeline = pipeline
        self.reproducible = reproducible
        self.family = describe_pipeline(pipeline).family.name
        self.lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._modules: dict[str, _Module] = {}

    # -- loading ---------------------------------------------------------------------------

    def add(self, adapter: Adapter, weight: float = 0.0) -> MixedAdapter:
        """Load `adapter` (unfused at first), then fuse it at `weight`.

        The adapter layer's `match_to_base` re-keys its layers to the base's module names and
        refuses another family or mismatched shapes; layers naming no module of the base are
        skipped and listed in the result's `unmatched`.
        """
        with self.lock:
            if adapter.name in self._entries:
                raise SdloraError(f"an adapter named {adapter.name!r} is already loaded")
            report = match_to_base(adapter, self.pipeline, self.family)
            layers = {path: adapter.layers[path] for path in report.matched}
            unmatched = list(report.unmatched)
            if not layers:
                raise SdloraError(
                    f"adapter {adapter.name!r} matches no module of this {self.family} base "
                    f"({len(unmatched)} unmatched layers)"
                )
            self._entries[adapter.name] = _Entry(adapter, layers, unmatched)
            for path in layers:
                self._module(path).users.add(adapter.name)
            self.set_weights({adapter.name: weight})
            return self._describe(adapter.name)

    def remove(self, name: str) -> None:
        """Un-fuse `name`, forget it, and drop base copies no other adapter needs."""
        with self.lock:
            entry = self._entry(name)
            entry.weight = 0.0
            self._apply(name)
            for path in entry.layers:
                state = self._modules[path]
                state.users.discard(name)
                if not state.users:
                    del self._modules[path]  # its weight is back at base: no copy to keep
            del self._entries[name]

    # -- weights ---------------------------------------------------------------------------

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Set adapters' global weights; only the modules of adapters whose weight changes are
        touched."""
        with self.lock:
            for name, weight in weights.items():
                entry = self._entry(name)
                weight = _finite(weight, f"weight of {name!r}")
                if weight != entry.weight:
                    entry.weight = weight
                    self._apply(name)

    def set_component_weights(self, name: str, weights: Mapping[str, float]) -> None:
        """Multipliers per component ("unet", "text_encoder", "text_encoder_2"); default 1."""
        unknown = sorted(set(weights) - set(COMPONENTS))
        if unknown:
            raise SdloraError(f"unknown component {unknown[0]!r}; expected one of {COMPONENTS}")
        with self.lock:
            self._entry(name).component_weights = {
                key: _finite(value, f"{key} weight of {name!r}") for key, value in weights.items()
            }
            self._apply(name)

    def set_block_weights(self, name: str, weights: Mapping[str, float]) -> None:
        """Multipliers per UNet block: "down", "mid", "up", one block like "down.1", "up.2",
        one layer of a block like "down.1.0", or "conv_in" (sdlora.mix.block_weights).

        The most specific key wins; modules outside the blocks (time embedding, conv_out) keep
        multiplier 1, as do blocks not named.
        """
        for key in weights:
            check_block_key(key, f"block weights of {name!r}")
        with self.lock:
            self._entry(name).block_weights = {
                key: _finite(value, f"{key} weight of {name!r}") for key, value in weights.items()
            }
            self._apply(name)

    @contextlib.contextmanager
    def using(self, weights: Mapping[str, float]) -> Iterator[Mixer]:
        """Hold the lock with `weights` set, so that no other request re-weights mid-generation.

        Adapters not named keep their weights; the weights stay set afterwards, so the next
        request with the same mix costs nothing.
        """
        with self.lock:
            self.set_weights(weights)
            yield self

    @property
    def weights(self) -> dict[str, float]:
        with self.lock:
            return {name: entry.weight for name, entry in self._entries.items()}

    @property
    def adapters(self) -> list[MixedAdapter]:
        with self.lock:
            return [self._describe(name) for name in self._entries]

    # -- outputs ---------------------------------------------------------------------------

    def bake(self, out_dir) -> None:
        """Save the pipeline with the current mix fused in, as a diffusers folder."""
        with self.lock:
            self.pipeline.save_pretrained(str(out_dir))

    def merged_adapter(self, rank: int | None = None, name: str = "mix") -> tuple[Adapter, float]:
        """The current mix as one adapter, and its relative Frobenius error over all modules.

        Without `rank` the LoRA factors are concatenated (exact: error 0). With `rank`, each
        module keeps its `rank` largest singular directions.
        """
        with self.lock:
            layers = {}
            kept_squared = dropped_squared = 0.0
            for path, state in self._modules.items():
                if not state.contributions:
                    continue
                terms = [
                    (self._entries[adapter].layers[path], coefficient)
                    for adapter, coefficient in state.contributions.items()
                ]
                up, down, kept, dropped = _merge_module(terms, rank)
                layers[path] = _shaped_layer(up, down, tuple(state.weight.shape))
                kept_squared += kept
                dropped_squared += dropped
            total = kept_squared + dropped_squared
            error = math.sqrt(dropped_squared / total) if total > 0 else 0.0
            metadata = {"sdlora.mix.mixer": json.dumps(self._mix_description(), sort_keys=True)}
            return Adapter(name=name, layers=layers, family=self.family, metadata=metadata), error

    # -- internals -------------------------------------------------------------------------

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            loaded = ", ".join(self._entries) or "none"
            raise SdloraError(f"no adapter named {name!r} is loaded (loaded: {loaded})") from None

    def _module(self, path: str) -> _Module:
        if path not in self._modules:
            component, module_name = split_path(path)
            module = getattr(self.pipeline, component).get_submodule(module_name)
            self._modules[path] = _Module(weight=module.weight)
        return self._modules[path]

    def _apply(self, name: str) -> None:
        """Bring every module `name` touches to its current coefficient for `name`."""
        entry = self._entries[name]
        with torch.no_grad():
            for path in entry.layers:
                state = self._modules[path]
                new = entry.coefficient(path)
                old = state.contributions.get(name, 0.0)
                if new != old:
                    self._update(path, name, old, new)

    def _update(self, path: str, name: str, old: float, new: float) -> None:
        """Move adapter `name`'s coefficient on module `path` from `old` to `new`."""
        state = self._modules[path]
        weight = state.weight
        if state.base is None:
            state.base = weight.detach().to("cpu", copy=True)
        if new == 0.0:
            del state.contributions[name]
        else:
            state.contributions[name] = new
        if not state.contributions:
            weight.copy_(state.base)
            state.updates_since_refresh = 0
        elif (
            self.reproducible
            or weight.dtype != torch.float32
            or state.updates_since_refresh >= REFRESH_EVERY
        ):
            self._recompute(path, state)
        else:
            add_scaled(weight.data, self._entries[name].layers[path], new - old)
            state.updates_since_refresh += 1

    def _recompute(self, path: str, state: _Module) -> None:
        """W = base + sum of c_i * delta_i in fp32, adapters in name order: a pure function of
        the current mix, whatever changes led to it."""
        weight = state.weight
        if weight.dtype == torch.float32:
            fused = weight.data
            fused.copy_(state.base)
        else:
            fused = state.base.to(weight.device, torch.float32, copy=True)
        for adapter in sorted(state.contributions):
            add_scaled(fused, self._entries[adapter].layers[path], state.contributions[adapter])
        if fused is not weight.data:
            weight.copy_(fused)
        state.updates_since_refresh = 0

    def _describe(self, name: str) -> MixedAdapter:
        entry = self._entries[name]
        return MixedAdapter(
            name=name,
            weight=entry.weight,
            component_weights=dict(entry.component_weights),
            block_weights=dict(entry.block_weights),
            num_layers=len(entry.layers),
            unmatched=list(entry.unmatched),
        )

    def _mix_description(self) -> dict:
        return {
            name: {
                "weight": entry.weight,
                "components": entry.component_weights,
                "blocks": entry.block_weights,
            }
            for name, entry in self._entries.items()
            if entry.weight != 0.0
        }


def _merge_module(
    terms: list[tuple[Layer, float]], rank: int | None
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """sum(c * delta) over `terms` as factors (up, down), with the squared norm kept and dropped.

    LoRA terms stay factored: concatenated when that is within `rank`, else reduced through
    QR of both factors and an SVD of the small core, never forming the dense delta.
    """
    if all(isinstance(layer, LoraLayer) for layer, _ in terms):
        up = torch.cat(
            [layer.up.flatten(1).double() * (c * layer.scale) for layer, c in terms], dim=1
        )
        down = torch.cat([layer.down.flatten(1).double() for layer, _ in terms], dim=0)
        if rank is None or up.shape[1] <= rank:
            norm_squared = ((up.T @ up) * (down @ down.T)).sum().item()
            return up.float(), down.float(), norm_squared, 0.0
        q_up, r_up = torch.linalg.qr(up)
        q_down, r_down = torch.linalg.qr(down.T)
        u, s, vh = torch.linalg.svd(r_up @ r_down.T)
        u, vh = q_up @ u, vh @ q_down.T
    else:
        dense = sum(layer.delta(torch.float64).flatten(1) * c for layer, c in terms)
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        if rank is None:  # keep the numerical rank: exact up to float32 rounding
            tolerance = s[0] * max(dense.shape) * torch.finfo(torch.float32).eps
            rank = int((s > tolerance).sum())
    keep = max(1, min(rank, s.shape[0]))
    up = (u[:, :keep] * s[:keep]).float()
    down = vh[:keep].float()
    return up, down, (s[:keep] ** 2).sum().item(), (s[keep:] ** 2).sum().item()


def _shaped_layer(up: torch.Tensor, down: torch.Tensor, weight_shape: tuple[int, ...]) -> LoraLayer:
    """A LoraLayer with scale 1 whose factors have the module's layout (Linear or Conv2d)."""
    rank = up.shape[1]
    if len(weight_shape) == 4:
        up = up.reshape(weight_shape[0], rank, 1, 1)
        down = down.reshape(rank, *weight_shape[1:])
    return LoraLayer(down=down.contiguous(), up=up.contiguous(), alpha=float(rank))
