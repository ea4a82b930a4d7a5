"""Files written by save_adapter load in diffusers, the reference consumer, with every key used.

The adapter covers every Linear and Conv2d of the UNet (attention, feed-forward, projections,
resnet convs, time embedding, down/upsamplers, conv_in/out) with mixed ranks and alpha != rank,
so each naming rule (SD1 flattened names, SDXL LDM names, lora_te/te1/te2) is exercised, and
fusing at a scale proves alpha and scale survive the trip.
"""

from __future__ import annotations

import copy

import pytest
import torch
from consumers import assert_diffusers_fuses_every_layer

from sdlora.adapters.core import Adapter, LoraLayer
from sdlora.adapters.write import save_adapter

LORA_SCALE = 0.7


def every_module_adapter(pipeline, family: str, text_encoder: bool) -> Adapter:
    """LoRA on every Linear/Conv2d of the UNet (and text encoders), ranks 2-4, alphas != rank."""
    generator = torch.Generator().manual_seed(1)
    components = ["unet"]
    if text_encoder:
        components += [
            name for name in ("text_encoder", "text_encoder_2") if getattr(pipeline, name, None)
        ]
    layers = {}
    for component in components:
        for index, (name, module) in enumerate(getattr(pipeline, component).named_modules()):
            rank, alpha = 2 + index % 3, 1.5 * (1 + index % 2)
            if name == "text_projection":
                continue  # diffusers reads text-encoder ranks only of attention and MLP layers
            if isinstance(module, torch.nn.Linear):
                down = torch.randn(rank, module.in_features, generator=generator) * 0.1
                up = torch.randn(module.out_features, rank, generator=generator) * 0.1
            elif isinstance(module, torch.nn.Conv2d):
                down = (
                    torch.randn(rank, module.in_channels, *module.kernel_size, generator=generator)
                    * 0.1
                )
                up = torch.randn(module.out_channels, rank, 1, 1, generator=generator) * 0.1
            else:
                continue
            layers[f"{component}.{name}"] = LoraLayer(down=down, up=up, alpha=alpha)
    return Adapter(name="every-module", layers=layers, family=family)


@pytest.fixture(scope="module")
def pipelines(tiny_sd1, tiny_sdxl):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return {
        "sd1": StableDiffusionPipeline.from_pretrained(tiny_sd1),
        "sdxl": StableDiffusionXLPipeline.from_pretrained(tiny_sdxl),
    }


@pytest.mark.parametrize("text_encoder", [True, False], ids=["with-te", "unet-only"])
@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_loads_every_key_and_fuses_the_same_update(
    pipelines, tmp_path, family, layout, text_encoder
):

    pipeline = copy.deepcopy(pipelines[family])
    adapter = every_module_adapter(pipeline, family, text_encoder)
    path = save_adapter(
        adapter, tmp_path / "adapter.safetensors", layout=layout, dtype=torch.float32
    )
    assert_diffusers_fuses_every_layer(pipeline, path, adapter, LORA_SCALE)
