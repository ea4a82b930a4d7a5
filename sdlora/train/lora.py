"""LoRA layers for training, through peft: which modules get one, and how they come back out.

Target presets name sets of UNet modules:
  attention    to_q, to_k, to_v, to_out.0 of every attention (the default)
  transformer  every Linear and 1x1 conv inside the transformer blocks (kohya's default)
  full         transformer + the ResNet convs and resamplers (LoCon)
Text encoders get their attention projections, optionally the MLP too.
"""

from __future__ import annotations

import contextlib
import re

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer as PeftLoraLayer

from sdlora.adapters.core import Adapter, LoraLayer
from sdlora.errors import SdloraError

ADAPTER_NAME = "default"

_ATTENTION = r"attn\d\.(to_q|to_k|to_v|to_out\.0)"
_TRANSFORMER = (
    r"attentions\.\d+\.(proj_in|proj_out|"
    r"transformer_blocks\.\d+\.(attn\d\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))"
)
_RESNET = (
    r"(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|"
    r"(downsamplers|upsamplers)\.0\.conv)"
)
UNET_TARGETS = {
    "attention": re.compile(rf".*{_ATTENTION}"),
    "transformer": re.compile(rf".*{_TRANSFORMER}"),
    "full": re.compile(rf".*({_TRANSFORMER}|{_RESNET})"),
}
TEXT_ATTENTION = re.compile(r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)")
TEXT_ATTENTION_AND_MLP = re.compile(r".*(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])")


def target_modules(model: torch.nn.Module, pattern: re.Pattern) -> list[str]:
    """Full names of the Linear/Conv2d modules of `model` that `pattern` matches."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and pattern.fullmatch(name)
    ]


def add_lora(model: torch.nn.Module, pattern: re.Pattern, rank: int, alpha: float,
             dropout: float) -> list[str]:
    """Inject peft LoRA layers (B initialised to zero) into the matching modules; freeze the rest."""
    names = target_modules(model, pattern)
    if not names:
        raise SdloraError(f"no modules of {type(model).__name__} match the LoRA targets")
    model.requires_grad_(False)
    config = PeftLoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                            target_modules=names, init_lora_weights=True)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return names


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


@contextlib.contextmanager
def lora_strength(models, strength: float):
    """Run the LoRA layers of `models` at `strength` times their weight, as the Mixer's slider
    would; back at the strength they had afterwards (strengths nest)."""
    layers = [module for model in models for module in model.modules()
              if isinstance(module, PeftLoraLayer)]
    before = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        layer.set_scale(ADAPTER_NAME, strength)
    try:
        yield
    finally:
        for layer, scaling in zip(layers, before):
            layer.scaling.update(scaling)


def parameter_groups(models: dict[str, torch.nn.Module], learning_rate: float,
                     text_encoder_lr: float | None, loraplus_ratio: float | None) -> list[dict]:
    """Optimizer groups: text encoders may have their own lr; LoRA+ raises the lr of B."""
    groups = []
    for component, model in models.items():
        lr = learning_rate if component == "unet" else (text_encoder_lr or learning_rate)
        params = lora_parameters(model)
        up = [p for n, p in params.items() if "lora_B" in n]
        rest = [p for n, p in params.items() if "lora_B" not in n]
        if loraplus_ratio:
            groups += [{"params": rest, "lr": lr}, {"params": up, "lr": lr * loraplus_ratio}]
        else:
            groups.append({"params": rest + up, "lr": lr})
    return [group for group in groups if group["params"]]


def export_adapter(models: dict[str, torch.nn.Module], name: str, family: str) -> Adapter:
    """Read the trained peft layers back as an `Adapter` (detached fp32 copies)."""
    layers = {}
    for component, model in models.items():
        for module_name, module in model.named_modules():
            if not isinstance(module, PeftLoraLayer) or ADAPTER_NAME not in module.lora_A:
                continue
            module_name = _unwrap_module_name(module_name)
            layers[f"{component}.{module_name}"] = LoraLayer(
                down=module.lora_A[ADAPTER_NAME].weight.detach().float().cpu().clone(),
                up=module.lora_B[ADAPTER_NAME].weight.detach().float().cpu().clone(),
                alpha=float(module.lora_alpha[ADAPTER_NAME]),
            )
    return Adapter(name=name, layers=layers, family=family)


def _unwrap_module_name(name: str) -> str:
    """Module names as the plain model spells them (DDP wraps the model in `module.`)."""
    return name[len("module."):] if name.startswith("module.") else name
