"""Files written by save_adapter load in diffusers, the reference consumer, with every key used.

The adapter covers every Linear and Conv2d of the UNet (attention, feed-forward, projections,
resnet convs, time embedding, down/upsamplers, conv_in/out) with mixed ranks and alpha != rank,
so each naming rule (SD1 flattened names, SDXL LDM names, lora_te/te1/te2) is exercised, and
fusing at a scale proves alpha and scale survive the trip.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings

import pytest
import torch

from sdlora.adapters.core import Adapter, LoraLayer
from sdlora.adapters.write import save_adapter

LORA_SCALE = 0.7


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: one thread is faster, and avoids oversubscribing a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@contextlib.contextmanager
def collected_warnings():
    """Warnings from diffusers/peft/transformers loggers and from `warnings.warn`."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(warning.message) for warning in caught)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


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
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipeline = copy.deepcopy(pipelines[family])
    adapter = every_module_adapter(pipeline, family, text_encoder)
    path = save_adapter(
        adapter, tmp_path / "adapter.safetensors", layout=layout, dtype=torch.float32
    )
    components = ["unet", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    base_weights = {
        f"{component}.{name}": module.weight.detach().clone()
        for component in components
        for name, module in getattr(pipeline, component).named_modules()
        if f"{component}.{name}" in adapter.layers
    }

    with collected_warnings() as messages:
        pipeline.load_lora_weights(str(path))
    # diffusers notes each text encoder that gets no LoRA; any other note is a key it did not use.
    absent = [c for c in components if not adapter.component_layers(c)]
    expected = [
        f"No LoRA keys associated to {type(getattr(pipeline, c)).__name__} found with the prefix='{c}'"
        for c in absent
    ]
    unexpected = [m for m in messages if not m.startswith(tuple(expected))]
    assert not [m for m in unexpected if "key" in m.lower() or "lora" in m.lower()], unexpected

    for component in components:
        injected = [
            m for m in getattr(pipeline, component).modules() if isinstance(m, BaseTunerLayer)
        ]
        assert len(injected) == len(adapter.component_layers(component)), component

    pipeline.fuse_lora(components=components, lora_scale=LORA_SCALE)
    names = list(base_weights)
    fused = [pipeline_module(pipeline, name).weight.detach().flatten() for name in names]
    expected = [
        (base_weights[name] + LORA_SCALE * adapter.layers[name].delta()).flatten() for name in names
    ]
    # One comparison over all modules (per-module calls cost seconds on a busy 2-core machine).
    torch.testing.assert_close(torch.cat(fused), torch.cat(expected), atol=1e-4, rtol=1e-4)


def pipeline_module(pipeline, path: str) -> torch.nn.Module:
    component, name = path.split(".", 1)
    return getattr(pipeline, component).get_submodule(name)
