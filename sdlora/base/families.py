"""The model families sdlora serves, and everything that differs between them, in one table.

A family is detected from the model itself (see `sdlora.base.models`), never from a name: the UNet's
cross-attention width and the number of text encoders tell SD 1.x, SD 2.x and SDXL apart.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str  # diffusers pipeline class name
    text_encoders: tuple[str, ...]  # pipeline attribute names
    kohya_text_prefixes: tuple[str, ...]  # kohya key prefix per text encoder, same order
    kohya_unet_ldm_names: bool  # kohya writes LDM-style UNet names (input_blocks_4_1_...)
    cross_attention_dim: int  # of the full-size model
    kohya_base_version: str  # value of ss_base_model_version that kohya-aware tools read


FAMILIES: dict[str, Family] = {
    "sd1": Family(
        name="sd1",
        pipeline_class="StableDiffusionPipeline",
        text_encoders=("text_encoder",),
        kohya_text_prefixes=("lora_te",),
        kohya_unet_ldm_names=False,
        cross_attention_dim=768,
        kohya_base_version="sd_v1",
    ),
    "sd2": Family(
        name="sd2",
        pipeline_class="StableDiffusionPipeline",
        text_encoders=("text_encoder",),
        kohya_text_prefixes=("lora_te",),
        kohya_unet_ldm_names=False,
        cross_attention_dim=1024,
        kohya_base_version="sd_v2",
    ),
    "sdxl": Family(
        name="sdxl",
        pipeline_class="StableDiffusionXLPipeline",
        text_encoders=("text_encoder", "text_encoder_2"),
        kohya_text_prefixes=("lora_te1", "lora_te2"),
        kohya_unet_ldm_names=True,
        cross_attention_dim=2048,
        kohya_base_version="sdxl_base_v1-0",
    ),
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}") from None


def family_from_unet_config(unet_config, num_text_encoders: int) -> str:
    """Tell the family from a UNet config and the number of text encoders.

    Two text encoders or an `addition_embed_type` of "text_time" is SDXL. Otherwise a
    cross-attention width of 1024 is SD 2.x, and anything else is SD 1.x (tiny test models
    included, whose widths are small).
    """
    if num_text_encoders == 2 or unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("cross_attention_dim") == 1024:
        return "sd2"
    return "sd1"
