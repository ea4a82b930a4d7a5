"""The mixer: several adapters, each with its own weight, fused into the base weights.

Flow: `Adapter`s (LoRA factors on the CPU) -> `Mixer.add` resolves each layer to its module ->
weights are set (per adapter, optionally per component and per UNet block) -> every touched
module holds W = W_base + sum_i c_i * delta_i, where c_i is adapter i's effective weight there.

How the updates on one module combine is the mixer's mode (sdlora.mix.modes): `add`, the sum
every other tool computes, or `orthogonal`, which counts the part two updates share once.

Because the mix lives in the module weights, a generation costs exactly what the base costs.
A change re-fuses only the modules whose coefficient it changes, each once, from the module's
base copy (see fuse.py): the weights are a pure function of the mix, bit for bit what a fresh
Mixer fuses for it, whatever changes came before, so an image never depends on the images made
before it.

A lock makes "set these weights, then generate" atomic for a multi-user web UI:

    with mixer.using({"oil": 0.8, "ink": -0.3}):
        image = pipeline(prompt).images[0]
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from sdlora.adapters.core import COMPONENTS, Adapter, Layer, LoraLayer, split_path
from sdlora.adapters.read import match_to_base
from sdlora.base.models import describe_pipeline
from sdlora.errors import SdloraError
from sdlora.mix.block_weights import check_block_key
from sdlora.mix.fuse import FusedModule, one_thread_per_op, refuse_all
from sdlora.mix.modes import (
    DEFAULT_MIX_MODE,
    MixMode,
    check_mix_mode,
    inner_product,
    mixed_coefficients,
)


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
    # the UNet's weight at the current denoising step when a schedule moves it (None: weight)
    step_weight: float | None = None

    def coefficient(self, path: str) -> float:
        """Effective weight on one module: weight (the step's weight on the UNet, when one is
        set) x component weight x UNet block weight."""
        component, module_name = split_path(path)
        weight = self.weight
        if component == "unet" and self.step_weight is not None:
            weight = self.step_weight
        factor = weight * self.component_weights.get(component, 1.0)
        if component == "unet" and self.block_weights:
            for key in _block_keys(module_name):
                if key in self.block_weights:
                    return factor * self.block_weights[key]
        return factor


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


class Mixer:
    """Adapters fused into `pipeline`'s UNet and text encoders; the weights a pure function of
    the mix."""

    def __init__(self, pipeline, mode: MixMode = DEFAULT_MIX_MODE):
        self.pipeline = pipeline
        self.family = describe_pipeline(pipeline).family.name
        self.lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._modules: dict[str, FusedModule] = {}
        self._mode = check_mix_mode(mode)

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
            self._apply([name])
            for path in entry.layers:
                module = self._modules[path]
                module.users.discard(name)
                module.forget(name)
                if not module.users:
                    del self._modules[path]  # its weight is back at base: no copy to keep
            del self._entries[name]

    # -- weights ---------------------------------------------------------------------------

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Set adapters' global weights; only the modules of adapters whose weight changes are
        touched, each once however many of its adapters change."""
        with self.lock:
            new = {name: _finite(weight, f"weight of {name!r}") for name, weight in weights.items()}
            entries = {name: self._entry(name) for name in new}
            changed = [name for name, weight in new.items() if weight != entries[name].weight]
            for name in changed:
                entries[name].weight = new[name]
            self._apply(changed)

    def set_step_weights(self, weights: Mapping[str, float | None]) -> None:
        """Set adapters' UNet weights for the coming denoising step (None: back to the global
        weight), for weight schedules (sdlora.mix.schedules): only the UNet modules of the
        adapters whose step weight changes are re-fused, so a step costs their modules only."""
        with self.lock:
            new = {
                name: None if weight is None else _finite(weight, f"step weight of {name!r}")
                for name, weight in weights.items()
            }
            entries = {name: self._entry(name) for name in new}
            changed = [name for name, weight in new.items() if weight != entries[name].step_weight]
            for name in changed:
                entries[name].step_weight = new[name]
            self._apply(changed)

    def set_component_weights(self, name: str, weights: Mapping[str, float]) -> None:
        """Multipliers per component ("unet", "text_encoder", "text_encoder_2"); default 1."""
        unknown = sorted(set(weights) - set(COMPONENTS))
        if unknown:
            raise SdloraError(f"unknown component {unknown[0]!r}; expected one of {COMPONENTS}")
        with self.lock:
            self._entry(name).component_weights = {
                key: _finite(value, f"{key} weight of {name!r}") for key, value in weights.items()
            }
            self._apply([name])

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
            self._apply([name])

    def set_mode(self, mode: MixMode) -> None:
        """Combine the adapters' updates by `mode` (sdlora.mix.modes) from now on; only modules
        that several adapters touch can change, and are re-fused once."""
        with self.lock:
            mode = check_mix_mode(mode)
            if mode != self._mode:
                self._mode = mode
                self._refuse([path for path, m in self._modules.items() if len(m.contributions) > 1])

    @property
    def mode(self) -> MixMode:
        return self._mode

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
            for path, module in self._modules.items():
                if not module.fused:
                    continue
                terms = [
                    (self._entries[adapter].layers[path], coefficient)
                    for adapter, coefficient in module.fused.items()
                ]
                up, down, kept, dropped = _merge_module(terms, rank)
                layers[path] = _shaped_layer(up, down, tuple(module.weight.shape))
                kept_squared += kept
                dropped_squared += dropped
            total = kept_squared + dropped_squared
            error = math.sqrt(dropped_squared / total) if total > 0 else 0.0
            metadata = {
                "sdlora.mix.mixer": json.dumps(self._mix_description(), sort_keys=True),
                "sdlora.mix.mode": self._mode,
            }
            return Adapter(name=name, layers=layers, family=self.family, metadata=metadata), error

    # -- internals -------------------------------------------------------------------------

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            loaded = ", ".join(self._entries) or "none"
            raise SdloraError(f"no adapter named {name!r} is loaded (loaded: {loaded})") from None

    def _module(self, path: str) -> FusedModule:
        if path not in self._modules:
            component, module_name = split_path(path)
            module = getattr(self.pipeline, component).get_submodule(module_name)
            self._modules[path] = FusedModule(module.weight)
        return self._modules[path]

    def _apply(self, names: Iterable[str]) -> None:
        """Bring the adapters `names` to their current coefficients: every module where one of
        them changed is re-fused once, from its base copy."""
        changed = set()
        for name in names:
            entry = self._entries[name]
            for path in entry.layers:
                module = self._modules[path]
                coefficient = entry.coefficient(path)
                if coefficient != module.contributions.get(name, 0.0):
                    if coefficient == 0.0:
                        del module.contributions[name]
                    else:
                        module.contributions[name] = coefficient
                    changed.add(path)
        self._refuse(changed)

    def _refuse(self, paths: Iterable[str]) -> None:
        """Re-fuse each module of `paths` with its contributions as the mode combines them,
        shared out over torch's threads (sdlora.mix.fuse.refuse_all)."""
        with one_thread_per_op() as threads:
            refuses = []
            for path in paths:
                module = self._modules[path]
                layers = {name: self._entries[name].layers[path] for name in module.contributions}
                if self._mode != "add":
                    for first in layers:
                        for second in layers:
                            if (first, second) not in module.gram:
                                module.gram[first, second] = inner_product(
                                    layers[first], layers[second]
                                )
                coefficients = mixed_coefficients(self._mode, module.contributions, module.gram)
                refuses.append((module, functools.partial(module.refuse, layers, coefficients)))
                if module.weight.device.type != "cpu":
                    threads = 1  # a GPU queues the ops: nothing to share out
            refuse_all(refuses, threads)

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
                **({"step_weight": entry.step_weight} if entry.step_weight is not None else {}),
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
