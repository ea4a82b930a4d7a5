"""Key spellings: how adapter files name a module, and how sdlora names it.

sdlora names a module by its pipeline path, "unet.down_blocks.1.attentions.0.proj_in" (the
diffusers module name after the component). Files spell the same module in several ways:

    kohya, SD 1.x/2.x   lora_unet_down_blocks_1_attentions_0_proj_in     (diffusers name, "_" joined)
    kohya, SDXL         lora_unet_input_blocks_4_1_proj_in               (LDM name, "_" joined)
    kohya, text         lora_te_ / lora_te1_ / lora_te2_ + text_model_encoder_layers_0_self_attn_q_proj
    diffusers / peft    unet.down_blocks.1.attentions.0.proj_in.lora_A.weight
    old diffusers       ...attn1.processor.to_q_lora.down.weight, ...q_proj.lora_linear_layer.up.weight

Everything here is pure string work, so files can be read without a base model. The flattened
kohya names are split back at "_" except inside the known multi-word names below; the LDM UNet
layout maps to diffusers' with two layers per block, which holds for every SD family.
"""

from __future__ import annotations

import re

from sdlora.adapters.core import COMPONENTS

# Multi-word parts of diffusers, LDM and CLIP module names; every other "_" separates two parts.
_COMPOUND_NAMES = (
    # diffusers UNet
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v",
    "to_out", "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out",
    "conv_norm_out", "time_embedding", "linear_1", "linear_2", "add_embedding", "class_embedding",
    # LDM (sgm) UNet
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
    "skip_connection", "time_embed", "label_emb",
    # CLIP text encoders
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1",
    "layer_norm2", "final_layer_norm", "token_embedding", "position_embedding", "text_projection",
)  # fmt: skip
_COMPOUNDS_LONGEST_FIRST = sorted(
    (tuple(name.split("_")) for name in _COMPOUND_NAMES), key=len, reverse=True
)

KOHYA_UNET_PREFIX = "lora_unet_"
# kohya prefix -> component; SDXL files use te1/te2, SD 1.x/2.x files te.
KOHYA_TEXT_PREFIXES = {
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}

# Inside an LDM resnet block (sgm ResBlock) -> diffusers ResnetBlock2D.
_LDM_RESNET_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_DIFFUSERS_RESNET_PARTS = {value: key for key, value in _LDM_RESNET_PARTS.items()}
# UNet modules outside the block structure, LDM name -> diffusers name.
_LDM_TOP_LEVEL = {
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
}
_DIFFUSERS_TOP_LEVEL = {value: key for key, value in _LDM_TOP_LEVEL.items()}
_MID_BLOCK_PARTS = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_LDM_MID_PARTS = {value: key for key, value in _MID_BLOCK_PARTS.items()}
_LAYERS_PER_BLOCK = 2
_SLOTS_PER_BLOCK = _LAYERS_PER_BLOCK + 1  # each LDM block also holds its down/upsampler


def unflatten(name: str) -> str:
    """The dotted module name of a flattened one: "ff_net_0_proj" -> "ff.net.0.proj"."""
    tokens = name.split("_")
    parts: list[str] = []
    position = 0
    while position < len(tokens):
        for compound in _COMPOUNDS_LONGEST_FIRST:
            if tuple(tokens[position : position + len(compound)]) == compound:
                parts.append("_".join(compound))
                position += len(compound)
                break
        else:
            parts.append(tokens[position])
            position += 1
    return ".".join(parts)


def flatten(module_name: str) -> str:
    return module_name.replace(".", "_")


def is_ldm_unet_name(module_name: str) -> bool:
    return module_name.split(".", 1)[0] in {
        "input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out",
    }  # fmt: skip


def ldm_to_diffusers_unet(module_name: str) -> str | None:
    """LDM UNet name -> diffusers name ("input_blocks.4.1.proj_in" -> "down_blocks.1.attentions.0
    .proj_in"); None when the name is not one of a UNet module.
    """
    for ldm, diffusers in _LDM_TOP_LEVEL.items():
        if module_name == ldm or module_name.startswith(ldm + "."):
            return diffusers + module_name[len(ldm) :]
    match = re.fullmatch(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)(?:\.(.+))?", module_name)
    if match:
        kind, block, slot, rest = match[1], int(match[2]), match[3], match[4] or ""
        if kind == "input_blocks":
            block_index, layer = divmod(block - 1, _SLOTS_PER_BLOCK)
            if layer == _LAYERS_PER_BLOCK:
                # The third slot of a down block is its downsampler, whose conv LDM calls "op".
                return f"down_blocks.{block_index}.downsamplers.0.conv" if rest == "op" else None
            return _block_member("down_blocks", block_index, slot, layer, rest)
        block_index, layer = divmod(block, _SLOTS_PER_BLOCK)
        # The upsampler follows the last layer: slot 2 after an attention, slot 1 in a block
        # without attention. Attention modules never have a bare "conv", so that tells them apart.
        if slot == "2" or (slot == "1" and rest == "conv"):
            return f"up_blocks.{block_index}.upsamplers.0.conv" if rest == "conv" else None
        return _block_member("up_blocks", block_index, slot, layer, rest)
    match = re.fullmatch(r"middle_block\.(\d)(?:\.(.+))?", module_name)
    if match and match[1] in _MID_BLOCK_PARTS:
        member = _MID_BLOCK_PARTS[match[1]]
        rest = match[2] or ""
        if member.startswith("resnets"):
            rest = _rename_resnet_part(rest, _LDM_RESNET_PARTS)
        return f"mid_block.{member}" + (f".{rest}" if rest else "")
    return None


def _block_member(blocks: str, block_index: int, slot: str, layer: int, rest: str) -> str | None:
    if slot == "0":
        rest = _rename_resnet_part(rest, _LDM_RESNET_PARTS)
        member = f"resnets.{layer}"
    elif slot == "1":
        member = f"attentions.{layer}"
    else:
        return None
    return f"{blocks}.{block_index}.{member}" + (f".{rest}" if rest else "")


def diffusers_to_ldm_unet(module_name: str) -> str | None:
    """The inverse of `ldm_to_diffusers_unet`, as kohya's SDXL trainer names UNet modules.

    Upsamplers are written in slot 2 (after an attention): true for every SDXL up block that has
    one. None when the module has no LDM name.
    """
    for diffusers, ldm in _DIFFUSERS_TOP_LEVEL.items():
        if module_name == diffusers or module_name.startswith(diffusers + "."):
            return ldm + module_name[len(diffusers) :]
    match = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(\w+)\.(\d+)(?:\.(.+))?", module_name)
    if match:
        down = match[1] == "down_blocks"
        block_index, member, layer, rest = int(match[2]), match[3], int(match[4]), match[5] or ""
        first_block = _SLOTS_PER_BLOCK * block_index + (1 if down else 0)
        if member in ("downsamplers", "upsamplers"):
            sampler = (
                f"input_blocks.{first_block + 2}.0.op"
                if down
                else f"output_blocks.{first_block + 2}.2.conv"
            )
            return sampler if rest == "conv" else None
        if member not in ("resnets", "attentions"):
            return None
        slot = 0 if member == "resnets" else 1
        if slot == 0:
            rest = _rename_resnet_part(rest, _DIFFUSERS_RESNET_PARTS)
        prefix = "input_blocks" if down else "output_blocks"
        return f"{prefix}.{first_block + layer}.{slot}" + (f".{rest}" if rest else "")
    match = re.fullmatch(r"mid_block\.(resnets\.\d|attentions\.0)(?:\.(.+))?", module_name)
    if match and match[1] in _LDM_MID_PARTS:
        rest = match[2] or ""
        if match[1].startswith("resnets"):
            rest = _rename_resnet_part(rest, _DIFFUSERS_RESNET_PARTS)
        return f"middle_block.{_LDM_MID_PARTS[match[1]]}" + (f".{rest}" if rest else "")
    return None


def _rename_resnet_part(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def kohya_name_to_path(kohya_name: str) -> str | None:
    """The pipeline path of a kohya name: "lora_te2_text_model_..." -> "text_encoder_2.text_model...".

    UNet names may be diffusers-style or LDM-style; both come back as diffusers paths. None when
    the name has no kohya prefix.
    """
    if kohya_name.startswith(KOHYA_UNET_PREFIX):
        module = unflatten(kohya_name[len(KOHYA_UNET_PREFIX) :])
        if is_ldm_unet_name(module):
            # An LDM name that maps to nothing stays as it is and later matches no module.
            module = ldm_to_diffusers_unet(module) or module
        return f"unet.{module}"
    for prefix, component in KOHYA_TEXT_PREFIXES.items():
        if kohya_name.startswith(prefix):
            return f"{component}.{unflatten(kohya_name[len(prefix) :])}"
    return None


def path_to_kohya_name(path: str, sdxl: bool, unet_names: dict[str, str] | None = None) -> str:
    """The kohya name of a pipeline path: "unet.down_blocks.1.attentions.0.proj_in" ->
    "lora_unet_down_blocks_1_attentions_0_proj_in".

    `unet_names` renames UNet modules first (kohya's SDXL files use LDM names, see
    `ldm_unet_names`); text encoders become lora_te1_/lora_te2_ for SDXL, lora_te_ otherwise.
    """
    component, _, module = path.partition(".")
    if component == "unet":
        return KOHYA_UNET_PREFIX + flatten((unet_names or {}).get(module, module))
    if component not in COMPONENTS:
        raise ValueError(f"{path!r} is not a pipeline component path")
    prefixes = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"} if sdxl else {}
    return prefixes.get(component, "lora_te_") + flatten(module)


def ldm_unet_names(modules: list[str]) -> dict[str, str] | None:
    """LDM names for all UNet `modules`, or None when one has none.

    diffusers' kohya loader drops every LDM key of a file that mixes both spellings, so a file is
    written either all LDM or all diffusers.
    """
    names = {}
    for module in modules:
        name = diffusers_to_ldm_unet(module)
        if name is None:
            return None
        names[module] = name
    return names


# ---- splitting a file key into (module key, parameter) ---------------------------------------

# File key suffix -> parameter name inside a layer.
PARAMETER_SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".alpha", "alpha"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_w1", "lokr_w1"),
    (".lokr_w2", "lokr_w2"),
    # Recognised so that the refusal can name them, never read.
    (".lora_mid.weight", "tucker"),
    (".hada_t1", "tucker"),
    (".hada_t2", "tucker"),
    (".lokr_t1", "tucker"),
    (".lokr_t2", "tucker"),
    (".dora_scale", "dora"),
    (".lora_magnitude_vector", "dora"),
    (".lora_magnitude_vector.weight", "dora"),
)

# Oldest diffusers form: the attention processor holds one LoRA per projection.
_PROCESSOR_KEY = re.compile(
    r"(?P<attention>.+?)(?:\.processor)?\.(?P<projection>to_q|to_k|to_v|to_out)_lora\.(?P<kind>down|up)\.weight"
)
_UNET_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_CLIP_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_PEFT_ADAPTER_NAME = re.compile(r"\.(lora_[AB])\.[^.]+\.weight$")  # lora_A.default.weight
_PEFT_WRAPPER = "base_model.model."


def split_key(key: str) -> tuple[str, str] | None:
    """A file key -> (module key, parameter name); None for keys that no known format uses.

    "lora_unet_x.lora_down.weight" -> ("lora_unet_x", "down"); "unet.x.lora_B.weight" ->
    ("unet.x", "up"); "x.attn1.processor.to_out_lora.up.weight" -> ("x.attn1.to_out.0", "up").
    """
    processor = _PROCESSOR_KEY.fullmatch(key)
    if processor:
        attention = processor["attention"]
        table = _CLIP_PROJECTIONS if attention.endswith("self_attn") else _UNET_PROJECTIONS
        return f"{attention}.{table[processor['projection']]}", processor["kind"]
    key = _PEFT_ADAPTER_NAME.sub(r".\1.weight", key)
    for suffix, parameter in PARAMETER_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], parameter
    return None


def module_key_to_path(module_key: str) -> str | None:
    """A file's module key (kohya name or dotted diffusers name) -> canonical pipeline path."""
    if module_key.startswith("lora_"):
        path = kohya_name_to_path(module_key)
        return canonical_path(path) if path else None
    key = module_key.removeprefix(_PEFT_WRAPPER)
    component, _, rest = key.partition(".")
    if component in COMPONENTS:
        return canonical_path(f"{component}.{rest.removeprefix(_PEFT_WRAPPER)}")
    # Keys without a component prefix: the text encoder's start at text_model, the rest are UNet.
    return f"text_encoder.{key}" if key.startswith("text_model.") else f"unet.{key}"


# Top-level parts of a CLIP text model; "text_projection" sits beside text_model, not inside.
_CLIP_TEXT_MODEL_PARTS = ("encoder.", "embeddings.", "final_layer_norm")


def canonical_path(path: str) -> str:
    """Text-encoder paths always spelled with "text_model.", as every adapter file spells them.

    transformers >= 5 builds CLIPTextModel without the text_model level (CLIPTextModelWithProjection
    keeps it), so a path taken from `named_modules()` may lack it; files and memory never do.
    """
    component, _, module = path.partition(".")
    if component.startswith("text_encoder") and module.startswith(_CLIP_TEXT_MODEL_PARTS):
        return f"{component}.text_model.{module}"
    return path


def module_name_variants(module: str) -> tuple[str, ...]:
    """The spellings a text-encoder module may have in a model: with and without text_model."""
    if module.startswith("text_model."):
        return (module, module.removeprefix("text_model."))
    return (module, f"text_model.{module}")
