"""Read an adapter file in any common layout into the normalized `Adapter`, and fit it to a base.

    file.safetensors -> (key, tensor) pairs -> grouped by module (keys.split_key); bundled
        textual-inversion embeddings (`bundle_emb.*`) -> adapter.embeddings
        -> module paths in diffusers names (keys.module_key_to_path)
        -> LoraLayer / LohaLayer / LokrLayer per module -> family from metadata, keys or widths
    Adapter + pipeline -> match_to_base -> MatchReport (or an error naming what does not fit)

Reading needs no base model, so `sdlora info` and `sdlora convert` work on any machine.
Pickle files are refused by their name, before anything opens them.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlora.adapters import keys
from sdlora.adapters.build import LayerTensors, build_layer, check_tensor, metadata_alpha
from sdlora.adapters.core import COMPONENTS, Adapter, Layer, LoraLayer
from sdlora.adapters.embeddings import BUNDLE_PREFIX, split_bundle
from sdlora.adapters.metadata import family_from_metadata, family_from_model_name
from sdlora.errors import SdloraError
from sdlora.files import PICKLE_SUFFIXES

logger = logging.getLogger(__name__)

PEFT_CONFIG_KEY = "lora_adapter_metadata"  # diffusers' JSON of each component's LoraConfig
FOLDED_ALPHA_KEY = "sdlora.folded_alpha"  # written by save_adapter's diffusers layout
# Cross-attention width of the full-size UNets (attn2.to_k input), and text-encoder widths.
_FAMILY_BY_CROSS_ATTENTION = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_FAMILY_BY_TEXT_WIDTH = {1024: "sd2"}  # 768 is both SD 1.x and SDXL's first encoder


@dataclass
class AdapterFile:
    """What a file holds: the adapter, the key layout it was written in, keys no format uses."""

    adapter: Adapter
    layout: str  # "kohya", "diffusers" or "diffusers (legacy)"
    ignored_keys: list[str]


def load_adapter(path: str | Path, name: str | None = None) -> Adapter:
    """Read a LoRA/LoCon/LoHa/LoKr .safetensors file; `name` defaults to the file stem."""
    return read_adapter_file(path, name).adapter


def read_adapter_file(path: str | Path, name: str | None = None) -> AdapterFile:
    """Read `path` and also tell its layout and the keys that hold no LoRA weights."""
    path = Path(path)
    with open_safetensors(path) as handle:
        metadata = dict(handle.metadata() or {})
        bundled = [key for key in handle.keys() if key.startswith(BUNDLE_PREFIX)]
        grouped, ignored = _group_keys([key for key in handle.keys() if key not in bundled])
        if not grouped:
            example = next(iter(handle.keys()), "none")
            raise SdloraError(
                f"not a LoRA adapter: {path} has no LoRA, LoHa or LoKr weights "
                f"(first key: {example!r})"
            )
        # Only LoRA tensors are loaded: a checkpoint passed by mistake is refused before that.
        tensors = {
            layer_path: LayerTensors(
                layer_path,
                {parameter: _load(handle, key, path) for parameter, key in names.items()},
                names,
            )
            for layer_path, names in grouped.items()
        }
        embeddings = split_bundle({key: handle.get_tensor(key) for key in bundled}, str(path))
    try:
        peft_alphas = _PeftAlphas(metadata.get(PEFT_CONFIG_KEY))
        layers = {
            layer_path: build_layer(params, peft_alphas.alpha(layer_path, params))
            for layer_path, params in tensors.items()
        }
        file_keys = [key for params in grouped.values() for key in params.values()]
        layout = _layout(file_keys)
        if layout != "kohya":
            _unfold_alphas(layers, metadata.get(FOLDED_ALPHA_KEY))
    except SdloraError as error:
        raise SdloraError(f"cannot use {path}: {error}") from None
    if ignored:
        logger.warning(
            "%s: ignored %d keys that hold no LoRA weights, e.g. %s", path, len(ignored), ignored[0]
        )
    adapter = Adapter(
        name=name or path.stem,
        layers=layers,
        family=detect_family(layers, metadata, file_keys),
        metadata=metadata,
        embeddings=embeddings,
    )
    return AdapterFile(adapter=adapter, layout=layout, ignored_keys=ignored)


def _load(handle, key: str, path: Path) -> torch.Tensor:
    tensor = handle.get_tensor(key)
    try:
        check_tensor(key, tensor)
    except SdloraError as error:
        raise SdloraError(f"cannot use {path}: {error}") from None
    return tensor


def _group_keys(names: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """File keys -> {layer path: {parameter: key}}, and the keys that belong to no layer."""
    by_module: dict[str, dict[str, str]] = defaultdict(dict)
    ignored = []
    for key in names:
        split = keys.split_key(key)
        if split is None:
            ignored.append(key)
        else:
            by_module[split[0]][split[1]] = key
    grouped = {}
    for module_key, params in by_module.items():
        path = keys.module_key_to_path(module_key)
        if path is None or not _holds_weights(params):
            ignored.extend(params.values())  # e.g. an alpha whose weights were pruned
        else:
            grouped[path] = params
    return grouped, ignored


@contextmanager
def open_safetensors(path: Path, kind: str = "adapter"):
    """safe_open, with pickle files refused by name and damaged files as one-line errors;
    `kind` names the file in them ("adapter", "embedding")."""
    from safetensors import SafetensorError, safe_open

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SdloraError(
            f"{path} is a pickle file, which sdlora never opens (unpickling can run code); "
            f"use the .safetensors version of this {kind}"
        )
    if not path.is_file():
        raise SdloraError(f"{kind} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except (SafetensorError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SdloraError(
            f"cannot read {path}: not a complete safetensors file ({reason}); "
            "download it again or re-export it"
        ) from error


def _holds_weights(params: dict[str, torch.Tensor]) -> bool:
    return any(parameter != "alpha" for parameter in params)


def _layout(file_keys: list[str]) -> str:
    if any(key.startswith("lora_") for key in file_keys):
        return "kohya"
    if any(".lora_A." in key for key in file_keys):
        return "diffusers"
    return "diffusers (legacy)"


class _PeftAlphas:
    """Per-module alpha from diffusers' `lora_adapter_metadata` (each component's LoraConfig).

    The JSON holds "<component>.lora_alpha", ".alpha_pattern", ".use_rslora"; without it a
    peft-layout layer has alpha == rank (scale 1), the diffusers convention. A value that is
    there but unreadable is an error: guessing alpha would silently scale the whole adapter.
    """

    def __init__(self, raw: str | None):
        self.config = _metadata_json(PEFT_CONFIG_KEY, raw) if raw else {}
        if not isinstance(self.config, dict):
            raise SdloraError(
                f"metadata {PEFT_CONFIG_KEY} is not a JSON object; the file is damaged"
            )

    def alpha(self, path: str, params: LayerTensors) -> float | None:
        component, module = path.split(".", 1)
        alpha = self.config.get(f"{component}.lora_alpha")
        if alpha is None or "down" not in params:
            return None
        alpha = metadata_alpha(alpha, PEFT_CONFIG_KEY, f"{component}.lora_alpha")
        patterns = self.config.get(f"{component}.alpha_pattern") or {}
        if not isinstance(patterns, dict):
            raise SdloraError(
                f"metadata {PEFT_CONFIG_KEY} {component}.alpha_pattern is not a JSON object"
            )
        for pattern, value in patterns.items():
            regex = pattern[1:] if pattern.startswith("^") else rf"(.*\.)?(?:{pattern})"
            try:
                matches = re.fullmatch(regex, module)
            except re.error as error:
                raise SdloraError(
                    f"metadata {PEFT_CONFIG_KEY} alpha_pattern {pattern!r} is not a valid "
                    f"regular expression ({error})"
                ) from None
            if matches:
                alpha = metadata_alpha(value, PEFT_CONFIG_KEY, f"alpha_pattern {pattern!r}")
                break
        if self.config.get(f"{component}.use_rslora"):
            # rsLoRA scales by alpha / sqrt(rank); as alpha / rank that is alpha * sqrt(rank).
            alpha = alpha * math.sqrt(params.tensors["down"].shape[0])
        return alpha


def _unfold_alphas(layers: dict[str, Layer], folded: str | None) -> None:
    """Undo save_adapter's diffusers layout, which folds alpha / rank into `up`.

    The metadata holds one alpha for all layers, or {layer path: alpha}.
    """
    if not folded:
        return
    recorded = _metadata_json(FOLDED_ALPHA_KEY, folded)
    if not isinstance(recorded, (dict, int, float)) or isinstance(recorded, bool):
        raise SdloraError(
            f"metadata {FOLDED_ALPHA_KEY} is {folded[:40]!r}: neither a number nor "
            "{layer: alpha}; the file is damaged"
        )
    for path, layer in layers.items():
        alpha = recorded.get(path) if isinstance(recorded, dict) else recorded
        if isinstance(layer, LoraLayer) and alpha is not None:
            alpha = metadata_alpha(alpha, FOLDED_ALPHA_KEY, f"for {path}")
            if alpha == 0:  # the folded scale alpha / rank was 0: the update cannot be restored
                raise SdloraError(
                    f"metadata {FOLDED_ALPHA_KEY} for {path} is 0; the file is damaged"
                )
            layer.up = layer.up.float() / (alpha / layer.rank)
            layer.alpha = alpha


def _metadata_json(key: str, raw: str) -> object:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise SdloraError(
            f"metadata {key} is not valid JSON ({raw[:40]!r}); the file is damaged"
        ) from None


# ---- family ------------------------------------------------------------------------------


def detect_family(
    layers: dict[str, Layer], metadata: dict[str, str], file_keys: list[str]
) -> str | None:
    """sd1 / sd2 / sdxl from the metadata, else the keys, else the layer widths; None if unknown."""
    family = family_from_metadata(metadata)
    if family:
        return family
    second_text_encoder = any(path.startswith("text_encoder_2.") for path in layers)
    if second_text_encoder or any(key.startswith("lora_te1_") for key in file_keys):
        return "sdxl"
    for path, layer in layers.items():
        width = _in_features(layer)
        if path.startswith("unet.") and path.endswith("attn2.to_k"):
            family = _FAMILY_BY_CROSS_ATTENTION.get(width)
        elif path.startswith("text_encoder.") and path.endswith("q_proj"):
            family = _FAMILY_BY_TEXT_WIDTH.get(width)
        if family:
            return family
    return family_from_model_name(metadata)


def _in_features(layer: Layer) -> int:
    return layer.down.shape[1] if isinstance(layer, LoraLayer) else layer.weight_shape[1]


def layer_shape(layer: Layer) -> tuple[int, ...]:
    """The shape of the weight the layer updates, from its tensors alone."""
    if isinstance(layer, LoraLayer):
        return (layer.up.shape[0], *layer.down.shape[1:])
    return tuple(layer.weight_shape)


# ---- fitting an adapter to a base --------------------------------------------------------


@dataclass
class MatchReport:
    """How an adapter's layers line up with a base pipeline's modules."""

    matched: list[str]
    unmatched: list[str]  # layer paths that name no module of the base; they are not applied

    @property
    def num_unmatched(self) -> int:
        return len(self.unmatched)

    def describe(self) -> str:
        text = f"{len(self.matched)} layers match the base"
        if self.unmatched:
            text += f", {self.num_unmatched} match no module (e.g. {self.unmatched[0]})"
        return text


def match_to_base(adapter: Adapter, pipeline, family_name: str | None) -> MatchReport:
    """Check that `adapter` fits `pipeline` (of family `family_name`) and make its layers fit.

    Raises SdloraError when the families differ, when any layer's shape differs from its
    module's, or when more than half the layers match no module. Tolerated differences are
    fixed in place: layers are re-keyed to the base's own module names (text encoders with or
    without "text_model.", modules found only by their flattened kohya name), and LoRA on a 1x1
    conv stored as Linear (or the reverse), or a LoHa/LoKr stored flat, takes the module's shape.
    """
    if adapter.family and family_name and adapter.family != family_name:
        raise SdloraError(
            f"adapter {adapter.name!r} is for {adapter.family} but the base is {family_name}"
        )
    modules = {
        component: dict(getattr(pipeline, component).named_modules())
        for component in COMPONENTS
        if getattr(pipeline, component, None) is not None
    }
    by_flat_name = {
        f"{component}.{keys.flatten(name)}": f"{component}.{name}"
        for component, named in modules.items()
        for name in named
    }
    matched, unmatched = [], []
    for path in list(adapter.layers):
        found = _find_module(modules, by_flat_name, path)
        if found is None:
            unmatched.append(path)
            continue
        if found != path:
            adapter.layers[found] = adapter.layers.pop(path)
            path = found
        component, module_name = path.split(".", 1)
        module = modules[component][module_name]
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            unmatched.append(path)
            continue
        _fit_shape(adapter, path, tuple(weight.shape), family_name)
        matched.append(path)
    if len(unmatched) * 2 > len(adapter.layers):
        raise SdloraError(
            f"adapter {adapter.name!r} does not fit the {family_name or 'given'} base: "
            f"{len(unmatched)} of {len(adapter.layers)} layers match no module "
            f"(e.g. {unmatched[0]}); it was probably made for another model"
        )
    if unmatched:
        logger.warning(
            "adapter %r: %d layers match no module of the base and are skipped, e.g. %s",
            adapter.name,
            len(unmatched),
            unmatched[0],
        )
    return MatchReport(matched=matched, unmatched=unmatched)


def _find_module(modules: dict[str, dict], by_flat_name: dict[str, str], path: str) -> str | None:
    """The base's own path for a layer path: as is, with/without text_model, or by flat name."""
    component, module_name = path.split(".", 1)
    named = modules.get(component, {})
    for variant in keys.module_name_variants(module_name):
        if variant in named:
            return f"{component}.{variant}"
    return by_flat_name.get(f"{component}.{keys.flatten(module_name)}")


def _fit_shape(
    adapter: Adapter, path: str, weight_shape: tuple[int, ...], family_name: str | None
) -> None:
    layer = adapter.layers[path]
    shape = layer_shape(layer)
    if shape == weight_shape:
        return
    if math.prod(shape) == math.prod(weight_shape) and shape[0] == weight_shape[0]:
        if isinstance(layer, LoraLayer) and shape[1] == weight_shape[1]:
            # A 1x1 conv and a Linear hold the same matrix; give the LoRA the module's rank-2/4 form.
            rank = layer.rank
            layer.down = layer.down.reshape(rank, *weight_shape[1:])
            layer.up = layer.up.reshape(weight_shape[0], rank, *([1] * (len(weight_shape) - 2)))
            return
        if not isinstance(layer, LoraLayer):
            layer.weight_shape = weight_shape
            return
    raise SdloraError(
        f"adapter {adapter.name!r} does not fit the {family_name or 'given'} base: {path} has "
        f"shape {tuple(weight_shape)} in the base but {tuple(shape)} in the adapter; "
        "the adapter was probably made for another model family"
    )
