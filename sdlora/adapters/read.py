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
from sdlora.adapters.core import COMPONENTS, Adapter, Layer, LohaLayer, LokrLayer, LoraLayer
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
            layer_path: {parameter: handle.get_tensor(key) for parameter, key in params.items()}
            for layer_path, params in grouped.items()
        }
        embeddings = split_bundle({key: handle.get_tensor(key) for key in bundled}, str(path))
    peft_alphas = _PeftAlphas(metadata.get(PEFT_CONFIG_KEY))
    layers = {
        layer_path: _build_layer(layer_path, params, peft_alphas.alpha(layer_path, params))
        for layer_path, params in tensors.items()
    }
    file_keys = [key for params in grouped.values() for key in params.values()]
    layout = _layout(file_keys)
    if layout != "kohya":
        _unfold_alphas(layers, metadata.get(FOLDED_ALPHA_KEY))
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


def _build_layer(path: str, params: dict[str, torch.Tensor], default_alpha: float | None) -> Layer:
    """One module's tensors -> its layer; the alpha key wins over `default_alpha`, then rank."""
    if "dora" in params:
        raise SdloraError(f"{path} is a DoRA layer, which sdlora cannot apply; use a plain LoRA")
    if "tucker" in params:
        raise SdloraError(
            f"{path} uses a Tucker/CP-decomposed conv (lora_mid, hada_t or lokr_t keys), which "
            "sdlora does not read; re-export the adapter without use_tucker/use_cp"
        )
    alpha = float(params["alpha"].float()) if "alpha" in params else default_alpha
    if "down" in params or "up" in params:
        down, up = _require(path, params, "down", "up")
        if down.shape[0] != up.shape[1]:
            raise SdloraError(
                f"{path}: down has rank {down.shape[0]} but up has rank {up.shape[1]}; the file is damaged"
            )
        return LoraLayer(down=down, up=up, alpha=alpha if alpha is not None else down.shape[0])
    if any(parameter.startswith("hada_") for parameter in params):
        w1a, w1b, w2a, w2b = _require(
            path, params, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"
        )
        return LohaLayer(
            w1a=w1a,
            w1b=w1b,
            w2a=w2a,
            w2b=w2b,
            alpha=alpha if alpha is not None else w1b.shape[0],
            # Conv LoHa stores (rank, in * kh * kw); match_to_base reshapes it to the module.
            weight_shape=(w1a.shape[0], w1b.shape[1]),
        )
    return _build_lokr(path, params, alpha)


def _build_lokr(path: str, params: dict[str, torch.Tensor], alpha: float | None) -> LokrLayer:
    """LoKr: each Kronecker factor is stored whole (lokr_wN) or as a low-rank pair (_a @ _b).

    As LyCORIS and AUTOMATIC1111 do, the scale is alpha / rank only when a factor is decomposed
    (rank of the second factor's pair, else the first's); with both factors whole it is 1.
    """
    factors = []
    for index in (1, 2):
        whole = params.get(f"lokr_w{index}")
        if whole is not None:
            factors.append(whole.float())
            continue
        first, second = _require(path, params, f"lokr_w{index}_a", f"lokr_w{index}_b")
        product = first.float() @ second.float().flatten(1)
        factors.append(product.reshape(first.shape[0], *second.shape[1:]))
    w1, w2 = factors
    decomposed_ranks = [params[f"lokr_w{i}_b"].shape[0] for i in (2, 1) if f"lokr_w{i}_b" in params]
    rank = decomposed_ranks[0] if decomposed_ranks else None
    scale = alpha / rank if rank and alpha is not None else 1.0
    weight_shape = (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:])
    return LokrLayer(w1=w1, w2=w2, scale=scale, weight_shape=weight_shape)


def _require(path: str, params: dict[str, torch.Tensor], *names: str) -> list[torch.Tensor]:
    missing = [name for name in names if name not in params]
    if missing:
        raise SdloraError(f"{path} has no {', '.join(missing)} weights; the file is damaged")
    return [params[name] for name in names]


class _PeftAlphas:
    """Per-module alpha from diffusers' `lora_adapter_metadata` (each component's LoraConfig).

    The JSON holds "<component>.lora_alpha", ".alpha_pattern", ".use_rslora"; without it a
    peft-layout layer has alpha == rank (scale 1), the diffusers convention.
    """

    def __init__(self, raw: str | None):
        try:
            self.config = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            self.config = {}

    def alpha(self, path: str, params: dict[str, torch.Tensor]) -> float | None:
        component, module = path.split(".", 1)
        alpha = self.config.get(f"{component}.lora_alpha")
        if alpha is None or "down" not in params:
            return None
        for pattern, value in (self.config.get(f"{component}.alpha_pattern") or {}).items():
            regex = pattern[1:] if pattern.startswith("^") else rf"(.*\.)?(?:{pattern})"
            if re.fullmatch(regex, module):
                alpha = value
                break
        if self.config.get(f"{component}.use_rslora"):
            # rsLoRA scales by alpha / sqrt(rank); as alpha / rank that is alpha * sqrt(rank).
            alpha = alpha * math.sqrt(params["down"].shape[0])
        return float(alpha)


def _unfold_alphas(layers: dict[str, Layer], folded: str | None) -> None:
    """Undo save_adapter's diffusers layout, which folds alpha / rank into `up`."""
    if not folded:
        return
    recorded = json.loads(folded)
    for path, layer in layers.items():
        alpha = recorded.get(path) if isinstance(recorded, dict) else recorded
        if isinstance(layer, LoraLayer) and alpha is not None:
            layer.up = layer.up.float() / (float(alpha) / layer.rank)
            layer.alpha = float(alpha)


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
