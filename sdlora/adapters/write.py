"""Write an `Adapter` as a safetensors file, in the kohya or the diffusers (peft) layout.

    kohya      lora_unet_* / lora_te_* (SD 1.x/2.x) or lora_te1_*/lora_te2_* (SDXL), each with
               .lora_down.weight, .lora_up.weight and a 0-dim .alpha; SDXL UNet modules under
               the LDM names kohya's SDXL trainer uses. All LoRA layers share one alpha (the
               most common); a layer with another alpha has the ratio folded into lora_up.
               LoHa/LoKr layers get LyCORIS keys (hada_w1_a..., lokr_w1/lokr_w2) under the
               same names. AUTOMATIC1111, ComfyUI, Forge, InvokeAI and diffusers load it.
    diffusers  unet.<module>.lora_A.weight / lora_B.weight (and text_encoder., text_encoder_2.).
               alpha / rank is folded into lora_B, so alpha == rank on disk and every loader
               computes the same update; the original alpha is kept in metadata
               (sdlora.folded_alpha) so reading the file back restores it. LoRA layers only.

Bundled textual-inversion embeddings (adapter.embeddings) go into the kohya layout as A1111 reads
them from a LoRA file: bundle_emb.<name>.string_to_param.*, SDXL bundle_emb.<name>.clip_l/clip_g.
diffusers' load_lora_weights refuses any file with such keys, so the diffusers layout leaves
them out (sdlora.adapters.command writes them as embedding files of their own).
Text-encoder modules are always named with "text_model." (as every tool expects), whichever
spelling the adapter's paths use (see keys.canonical_path).
The file appears atomically: it is written to a temporary file beside the target and renamed,
so an interrupted or failed save never leaves a partial adapter behind.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from sdlora.adapters import keys
from sdlora.adapters.core import Adapter, Layer, LohaLayer, LokrLayer, LoraLayer
from sdlora.adapters.embeddings import bundle_tensors
from sdlora.adapters.metadata import FAMILY_KEY
from sdlora.adapters.read import FOLDED_ALPHA_KEY, PEFT_CONFIG_KEY
from sdlora.errors import SdloraError
from sdlora.files import atomic_write

LAYOUTS = ("kohya", "diffusers")


def save_adapter(
    adapter: Adapter,
    path: str | Path,
    layout: str = "kohya",
    dtype: torch.dtype = torch.float16,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write `adapter` to `path` in `layout`; `metadata` is merged over adapter.metadata.

    Weights are stored in `dtype`; alphas stay float32 so that any alpha is kept exactly.
    Returns the path written.
    """
    if layout not in LAYOUTS:
        raise SdloraError(
            f"unknown adapter layout {layout!r}; expected one of {', '.join(LAYOUTS)}"
        )
    if not adapter.layers:
        raise SdloraError(f"adapter {adapter.name!r} has no layers to save")
    merged = {**adapter.metadata, **(metadata or {})}
    # Keys that describe another file's tensors would be wrong for this one.
    for stale in (PEFT_CONFIG_KEY, FOLDED_ALPHA_KEY):
        merged.pop(stale, None)
    if adapter.family:
        merged[FAMILY_KEY] = adapter.family
    if layout == "kohya":
        tensors = kohya_state_dict(adapter, dtype)
        tensors.update(bundle_tensors(adapter.embeddings, dtype))
    else:
        tensors, folded_alpha = diffusers_state_dict(adapter, dtype)
        merged[FOLDED_ALPHA_KEY] = folded_alpha
    not_strings = [key for key, value in merged.items() if not isinstance(value, str)]
    if not_strings:
        raise ValueError(f"adapter metadata values must be strings; not for {not_strings}")
    from safetensors.torch import save_file

    atomic_write(path, lambda temp: save_file(tensors, temp, metadata=merged))
    return Path(path)


def kohya_state_dict(adapter: Adapter, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    sdxl = adapter.family == "sdxl" or "text_encoder_2" in adapter.components
    unet_modules = list(adapter.component_layers("unet"))
    # Without LDM names for every UNet module the file keeps diffusers names, which kohya's own
    # loader and diffusers both accept for SDXL too.
    unet_names = keys.ldm_unet_names(unet_modules) if sdxl else None
    common_alpha = _most_common_alpha(adapter)
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in adapter.layers.items():
        name = keys.path_to_kohya_name(keys.canonical_path(path), sdxl=sdxl, unet_names=unet_names)
        if isinstance(layer, LoraLayer) and layer.alpha != common_alpha:
            layer = _with_alpha(layer, common_alpha)
        for suffix, tensor in _kohya_tensors(layer).items():
            is_alpha = suffix == "alpha"
            tensors[f"{name}.{suffix}"] = _stored(tensor, torch.float32 if is_alpha else dtype)
    return tensors


def _most_common_alpha(adapter: Adapter) -> float:
    alphas = Counter(
        float(layer.alpha) for layer in adapter.layers.values() if isinstance(layer, LoraLayer)
    )
    nonzero = [alpha for alpha, _ in alphas.most_common() if alpha != 0]
    return nonzero[0] if nonzero else 0.0


def _with_alpha(layer: LoraLayer, alpha: float) -> LoraLayer:
    """The same update written with another alpha: the ratio moves into `up`.

    diffusers' kohya loader applies per-module alphas wrongly (it ignores them for attention and
    text-encoder layers), so a kohya file carries one alpha for all its LoRA layers.
    """
    return LoraLayer(down=layer.down, up=layer.up.float() * (layer.alpha / alpha), alpha=alpha)


def _kohya_tensors(layer: Layer) -> dict[str, torch.Tensor]:
    if isinstance(layer, LoraLayer):
        alpha = torch.tensor(float(layer.alpha))
        return {"lora_down.weight": layer.down, "lora_up.weight": layer.up, "alpha": alpha}
    if isinstance(layer, LohaLayer):
        return {
            "hada_w1_a": layer.w1a,
            "hada_w1_b": layer.w1b,
            "hada_w2_a": layer.w2a,
            "hada_w2_b": layer.w2b,
            "alpha": torch.tensor(float(layer.alpha)),
        }
    if isinstance(layer, LokrLayer):
        # Whole factors mean scale 1 to every LoKr reader, so the scale goes into the second.
        return {"lokr_w1": layer.w1, "lokr_w2": layer.w2.float() * layer.scale}
    raise TypeError(f"unknown layer type {type(layer).__name__}")


def diffusers_state_dict(
    adapter: Adapter, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], str]:
    """peft keys with alpha / rank folded into lora_B, and the folded alphas as JSON."""
    tensors: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for path, layer in adapter.layers.items():
        if not isinstance(layer, LoraLayer):
            kind = "LoHa" if isinstance(layer, LohaLayer) else "LoKr"
            raise SdloraError(
                f"adapter {adapter.name!r} has {kind} layers ({path}), which the diffusers layout "
                "cannot hold; save it in the kohya layout (LyCORIS keys) instead"
            )
        path = keys.canonical_path(path)
        tensors[f"{path}.lora_A.weight"] = _stored(layer.down, dtype)
        tensors[f"{path}.lora_B.weight"] = _stored(layer.up.float() * layer.scale, dtype)
        alphas[path] = float(layer.alpha)
    distinct = set(alphas.values())
    folded = json.dumps(distinct.pop() if len(distinct) == 1 else alphas)
    return tensors, folded


def _stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # safetensors needs contiguous tensors that own their memory (no shared storage).
    return tensor.detach().to("cpu", dtype).contiguous().clone()
