"""Random adapters for the tiny pipelines, shaped exactly like what a trainer would produce."""

from __future__ import annotations

import torch

from sdlora.adapters.core import Adapter, LoraLayer

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_CONVS = ("conv1", "conv2")


def random_adapter(
    pipeline,
    name: str = "random",
    rank: int = 4,
    alpha: float = 2.0,
    text_encoder: bool = True,
    convs: bool = False,
    seed: int = 0,
    family: str | None = None,
) -> Adapter:
    """LoRA on UNet attention (and resnet convs, and text-encoder attention) with random A and B.

    B is non-zero (unlike a fresh LoRA) so that the update changes the model measurably.
    """
    generator = torch.Generator().manual_seed(seed)
    components = {"unet": (UNET_ATTENTION + (UNET_CONVS if convs else ()))}
    if text_encoder:
        components["text_encoder"] = TEXT_ATTENTION
        if getattr(pipeline, "text_encoder_2", None) is not None:
            components["text_encoder_2"] = TEXT_ATTENTION
    layers = {}
    for component, suffixes in components.items():
        for module_name, module in getattr(pipeline, component).named_modules():
            if not module_name.endswith(suffixes):
                continue
            if isinstance(module, torch.nn.Linear):
                down = torch.randn(rank, module.in_features, generator=generator) * 0.1
                up = torch.randn(module.out_features, rank, generator=generator) * 0.1
            elif isinstance(module, torch.nn.Conv2d):
                kh, kw = module.kernel_size
                down = torch.randn(rank, module.in_channels, kh, kw, generator=generator) * 0.1
                up = torch.randn(module.out_channels, rank, 1, 1, generator=generator) * 0.1
            else:
                continue
            layers[f"{component}.{module_name}"] = LoraLayer(down=down, up=up, alpha=alpha)
    if family is None:
        family = "sdxl" if getattr(pipeline, "text_encoder_2", None) is not None else "sd1"
    return Adapter(name=name, layers=layers, family=family)
