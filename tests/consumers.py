"""Checks that diffusers, the reference consumer, uses every key of a file we wrote."""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch


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


def assert_diffusers_fuses_every_layer(pipeline, path, adapter, scale: float) -> None:
    """`load_lora_weights(path)` consumes every key (no warning about unused keys, one peft layer
    per adapter layer) and `fuse_lora(lora_scale=scale)` gives base + scale * delta per module."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    family = "sdxl" if getattr(pipeline, "text_encoder_2", None) is not None else "sd1"
    components = ["unet", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    base_weights = {
        f"{component}.{name}": module.weight.detach().clone()
        for component in components
        for name, module in getattr(pipeline, component).named_modules()
        if f"{component}.{name}" in adapter.layers
    }
    assert len(base_weights) == len(adapter.layers), "adapter paths must be the pipeline's names"

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

    pipeline.fuse_lora(components=components, lora_scale=scale)
    names = list(base_weights)
    fused = [pipeline_module(pipeline, name).weight.detach().flatten() for name in names]
    expected = [
        (base_weights[name] + scale * adapter.layers[name].delta()).flatten() for name in names
    ]
    # One comparison over all modules (per-module calls cost seconds on a busy 2-core machine).
    torch.testing.assert_close(torch.cat(fused), torch.cat(expected), atol=1e-4, rtol=1e-4)


def pipeline_module(pipeline, path: str) -> torch.nn.Module:
    component, name = path.split(".", 1)
    return getattr(pipeline, component).get_submodule(name)
