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
rows, the product and the weight rows meet in the cache. `refuse_all` shares the modules a
change touches out over torch's threads, each module fused by one thread: small GEMMs split
across threads wait on each other (with sleeping OpenMP waiters, slower than one thread),
whole modules per thread do not, and a module's bits do not depend on the thread count
(bench/RESULTS-mix.md has the numbers).

Memory: the base copy lives on the weight's device in the weight's dtype, so a change copies
nothing between host and device; it costs one copy of every fused module (SD1.5 attention:
122 M parameters, 244 MB in fp16), made tile by tile by the first fuse, in the same pass.
Each adapter's factors are kept on that device in float32 (a few MB per adapter).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from sdlora.adapters.core import Layer, LoraLayer

# 128 Ki floats = 512 KiB per tile: base rows and weight rows fit in L2 together.
TILE_ELEMENTS = 1 << 17


@dataclasses.dataclass
class _Factors:
    """One module's factors for one set of contributing adapters, in name order."""

    names: tuple[str, ...]
    down: torch.Tensor  # (sum of ranks, columns): the LoRA downs, concatenated
    # (adapter, scale, up, its columns of scaled_up) of each LoRA layer
    lora: list[tuple[str, float, torch.Tensor, torch.Tensor]]
    dense: list[tuple[str, torch.Tensor]]  # (adapter, delta) of the other layers
    scaled_up: torch.Tensor  # (rows, sum of ranks): each up x coefficient x scale
    scaled_by: list[float | None]  # the coefficient each LoRA layer's columns hold now
    tiles: list | None = None  # FusedModule._tiles, made at the first fuse
    tiles_of: int = 0  # the data pointer of the weight they view


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
        self._factors: _Factors | None = None  # of the adapters fused last

    def forget(self, name: str) -> None:
        """Drop adapter `name`'s device copy and inner products (after its contribution went
        to 0)."""
        self._device_layers.pop(name, None)
        self._factors = None
        self.gram = {pair: value for pair, value in self.gram.items() if name not in pair}

    # Outside inference mode whatever the caller's: the tensors kept here (base copy, factors,
    # views) are then normal ones, which later changes from any thread or mode may write.
    @torch.inference_mode(False)
    @torch.no_grad()
    def refuse(self, layers: Mapping[str, Layer], coefficients: Mapping[str, float]) -> None:
        """Set the weight to base + sum of coefficient * delta over `coefficients` (adapter ->
        coefficient as fused), and remember them as `fused`.

        `layers` maps each contributing adapter to its layer on this module. Safe to run on
        another thread beside other modules' refuses (`refuse_all`).
        """
        self.fused = dict(coefficients)
        weight = self.weight.data
        if not self.fused:
            if self.base is not None:
                weight.copy_(self.base)
            return
        copy_base = self.base is None  # copied tile by tile below, while the rows are in cache
        if copy_base:
            self.base = torch.empty_like(weight, memory_format=torch.contiguous_format)
        down, dense = self._terms(layers)
        fp32 = self.base.dtype == torch.float32
        if copy_base and not weight.is_contiguous():
            self.base.copy_(weight)  # its one tile views the base only
        for rows, base_rows, up_rows, weight_rows in self._tiles():
            if copy_base and weight_rows is not None:
                base_rows.copy_(weight_rows)
            # in place in fp32; else fused in fp32, then cast, or copied back in its own layout
            out = weight_rows if fp32 and weight_rows is not None else None
            fused = torch.addmm(base_rows if fp32 else base_rows.float(), up_rows, down, out=out)
            for coefficient, delta in dense:
                fused.add_(delta[rows], alpha=coefficient)
            if weight_rows is None:
                weight.copy_(fused.view(weight.shape))
            elif not fp32:
                weight_rows.copy_(fused)

    def _tiles(self) -> list[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """(rows, base rows, scaled up rows, weight rows or None) per row tile of the current
        factors; kept with them, since making a view costs as much as a small tile's GEMM."""
        factors, weight = self._factors, self.weight.data
        if factors.tiles is None or factors.tiles_of != weight.data_ptr():  # moved: views anew
            factors.tiles_of = weight.data_ptr()
            rows = weight.shape[0]
            base = self.base.view(rows, -1)
            if weight.is_contiguous():
                target = weight.view(rows, -1)
                factors.tiles = [
                    (tile, base[tile], factors.scaled_up[tile], target[tile])
                    for tile in _row_tiles(rows, base.shape[1], weight.device)
                ]
            else:
                factors.tiles = [(slice(0, rows), base, factors.scaled_up, None)]
        return factors.tiles

    def _terms(self, layers: Mapping[str, Layer]):
        """The LoRA layers' down, concatenated in name order, and (coefficient, dense delta) of
        the other layers; the ups, concatenated alike, are written into the factors' scaled_up
        with each adapter's coefficient and scale.

        The concatenated factors are kept while the same adapters contribute: a slider change
        allocates nothing.
        """
        names = tuple(sorted(self.fused))
        if self._factors is None or self._factors.names != names:
            self._factors = self._gather(names, layers)
        factors = self._factors
        for index, (name, scale, up, scaled_up) in enumerate(factors.lora):
            if factors.scaled_by[index] != self.fused[name]:  # the others' columns are as they were
                torch.mul(up, self.fused[name] * scale, out=scaled_up)
                factors.scaled_by[index] = self.fused[name]
        return factors.down, [(self.fused[name], delta) for name, delta in factors.dense]

    def _gather(self, names: tuple[str, ...], layers: Mapping[str, Layer]) -> _Factors:
        rows = self.weight.shape[0]
        columns = self.weight.numel() // rows
        device = self.weight.device
        loras, dense = [], []  # (name, LoraLayer), (name, dense delta)
        for name in names:
            layer = self._on_device(name, layers[name])
            if isinstance(layer, LoraLayer):
                loras.append((name, layer))
            else:
                dense.append((name, layer.delta(torch.float32).reshape(rows, -1)))
        downs = [layer.down.flatten(1) for _, layer in loras]
        down = torch.cat(downs, dim=0) if downs else torch.zeros(0, columns, device=device)
        scaled_up = torch.empty(rows, down.shape[0], device=device)
        lora, start = [], 0
        for name, layer in loras:
            up = layer.up.flatten(1)
            lora.append((name, layer.scale, up, scaled_up[:, start:start + up.shape[1]]))
            start += up.shape[1]
        return _Factors(names, down, lora, dense, scaled_up, [None] * len(lora))

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


_workers: dict[int, ThreadPoolExecutor] = {}  # thread count -> its pool, made once


def refuse_all(refuses: list[tuple[FusedModule, Callable[[], None]]], threads: int) -> None:
    """Run each module's refuse, shared out over `threads` threads by the modules' sizes.

    Call it inside `one_thread_per_op`: each module is then fused by one thread, so its bits do
    not depend on the thread count, and the threads never wait on each other mid-module.
    """
    threads = min(threads, len(refuses))
    if threads <= 1:
        _run_in_order([refuse for _, refuse in refuses])
        return
    shares: list[list[Callable[[], None]]] = [[] for _ in range(threads)]
    loads = [0] * threads
    for module, refuse in sorted(refuses, key=lambda item: -item[0].weight.numel()):
        emptiest = loads.index(min(loads))
        shares[emptiest].append(refuse)
        loads[emptiest] += module.weight.numel()
    if threads not in _workers:
        _workers[threads] = ThreadPoolExecutor(threads, thread_name_prefix="sdlora-fuse")
    for _ in _workers[threads].map(_run_in_order, shares):  # re-raises a refuse's error here
        pass


def _run_in_order(refuses: list[Callable[[], None]]) -> None:
    for refuse in refuses:
        refuse()


@contextlib.contextmanager
def one_thread_per_op() -> Iterator[int]:
    """Torch ops on one thread inside; yields the thread count torch had, for `refuse_all`.

    Small ops split across threads wait on each other: with sleeping OpenMP waiters, a fuse's
    many small GEMMs ran slower on two threads than on one.
    """
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield threads
    finally:
        if threads > 1:
            torch.set_num_threads(threads)
