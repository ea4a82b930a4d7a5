"""Third-party key spellings, built by hand, read into the right modules with the right update."""

from __future__ import annotations

import json

import pytest
import torch
from factories import random_adapter
from safetensors.torch import save_file

from sdlora.adapters import keys
from sdlora.adapters.core import LohaLayer, LokrLayer
from sdlora.adapters.metadata import family_from_metadata, training_metadata, trigger_words
from sdlora.adapters.read import load_adapter, match_to_base, read_adapter_file
from sdlora.base.tiny import build_tiny_pipeline
from sdlora.errors import SdloraError

ATTN1_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TEXT_Q = "text_model.encoder.layers.0.self_attn.q_proj"
generator = torch.Generator().manual_seed(0)


def randn(*shape) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def write(tmp_path, tensors, metadata=None, name="adapter.safetensors"):
    path = tmp_path / name
    save_file({key: value.clone() for key, value in tensors.items()}, str(path), metadata=metadata)
    return path


def test_old_diffusers_lora_down_up_and_lora_linear_layer(tmp_path):
    down, up, text_down, text_up = randn(4, 32), randn(32, 4), randn(2, 32), randn(32, 2)
    path = write(
        tmp_path,
        {
            f"unet.{ATTN1_Q}.lora.down.weight": down,
            f"unet.{ATTN1_Q}.lora.up.weight": up,
            f"text_encoder.{TEXT_Q}.lora_linear_layer.down.weight": text_down,
            f"text_encoder.{TEXT_Q}.lora_linear_layer.up.weight": text_up,
        },
    )
    source = read_adapter_file(path)
    assert source.layout == "diffusers (legacy)"
    layers = source.adapter.layers
    torch.testing.assert_close(layers[f"unet.{ATTN1_Q}"].delta(), up @ down)  # alpha = rank
    torch.testing.assert_close(layers[f"text_encoder.{TEXT_Q}"].delta(), text_up @ text_down)


def test_attention_processor_form_without_prefix(tmp_path):
    attention = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    down, up = randn(4, 32), randn(32, 4)
    path = write(
        tmp_path,
        {
            f"{attention}.processor.to_out_lora.down.weight": down,
            f"{attention}.processor.to_out_lora.up.weight": up,
            "text_encoder.text_model.encoder.layers.1.self_attn.to_k_lora.down.weight": down,
            "text_encoder.text_model.encoder.layers.1.self_attn.to_k_lora.up.weight": up,
        },
    )
    layers = load_adapter(path).layers
    assert sorted(layers) == [
        "text_encoder.text_model.encoder.layers.1.self_attn.k_proj",
        f"unet.{attention}.to_out.0",
    ]
    torch.testing.assert_close(layers[f"unet.{attention}.to_out.0"].delta(), up @ down)


def test_peft_keys_with_wrapper_prefix_adapter_name_and_alpha_key(tmp_path):
    down, up = randn(4, 32), randn(32, 4)
    path = write(
        tmp_path,
        {
            f"base_model.model.{ATTN1_Q}.lora_A.default.weight": down,
            f"base_model.model.{ATTN1_Q}.lora_B.default.weight": up,
            f"base_model.model.{ATTN1_Q}.alpha": torch.tensor(8.0),
        },
    )
    layer = load_adapter(path).layers[f"unet.{ATTN1_Q}"]
    torch.testing.assert_close(layer.delta(), up @ down * 2.0)


def test_peft_alpha_from_diffusers_lora_adapter_metadata(tmp_path):
    other = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    tensors = {}
    for module in (ATTN1_Q, other):
        tensors[f"unet.{module}.lora_A.weight"] = randn(4, 32)
        tensors[f"unet.{module}.lora_B.weight"] = randn(32, 4)
    config = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {f"^{other}": 2}}
    path = write(tmp_path, tensors, {"lora_adapter_metadata": json.dumps(config)})
    layers = load_adapter(path).layers
    assert layers[f"unet.{ATTN1_Q}"].alpha == 8
    assert layers[f"unet.{other}"].alpha == 2


def test_kohya_without_alpha_means_alpha_equals_rank(tmp_path):
    down, up = randn(4, 32), randn(32, 4)
    name = "lora_unet_" + keys.flatten(ATTN1_Q)
    path = write(tmp_path, {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
    source = read_adapter_file(path)
    assert source.layout == "kohya"
    layer = source.adapter.layers[f"unet.{ATTN1_Q}"]
    assert layer.alpha == 4
    torch.testing.assert_close(layer.delta(), up @ down)


@pytest.mark.parametrize(
    ("kohya_name", "module"),
    [
        ("input_blocks_4_1_transformer_blocks_0_attn1_to_q", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
        ("input_blocks_8_1_transformer_blocks_9_ff_net_0_proj", "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj"),
        ("input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1"),
        ("input_blocks_5_0_out_layers_3", "down_blocks.1.resnets.1.conv2"),
        ("input_blocks_4_0_emb_layers_1", "down_blocks.1.resnets.0.time_emb_proj"),
        ("input_blocks_4_0_skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
        ("input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
        ("middle_block_0_in_layers_2", "mid_block.resnets.0.conv1"),
        ("middle_block_1_proj_in", "mid_block.attentions.0.proj_in"),
        ("middle_block_2_emb_layers_1", "mid_block.resnets.1.time_emb_proj"),
        ("output_blocks_0_1_transformer_blocks_0_attn2_to_out_0", "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"),
        ("output_blocks_5_0_skip_connection", "up_blocks.1.resnets.2.conv_shortcut"),
        ("output_blocks_2_2_conv", "up_blocks.0.upsamplers.0.conv"),
        ("output_blocks_8_1_conv", "up_blocks.2.upsamplers.0.conv"),  # block without attention
        ("input_blocks_0_0", "conv_in"),
        ("out_2", "conv_out"),
        ("time_embed_0", "time_embedding.linear_1"),
        ("label_emb_0_2", "add_embedding.linear_2"),
    ],
)  # fmt: skip
def test_kohya_sdxl_ldm_names_map_to_diffusers_modules(kohya_name, module):
    assert keys.kohya_name_to_path("lora_unet_" + kohya_name) == f"unet.{module}"


def test_every_module_of_a_full_size_sdxl_unet_has_an_ldm_name_that_diffusers_agrees_with():
    """Our LDM names for the real SDXL UNet are the ones diffusers' kohya loader maps back."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128,
            cross_attention_dim=2048,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 2),  # SDXL has 10 in the last; names repeat
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    modules = [
        name
        for name, module in unet.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    ldm = keys.ldm_unet_names(modules)
    assert ldm is not None
    assert all(keys.ldm_to_diffusers_unet(ldm[name]) == name for name in modules)

    state_dict = {}
    for name in modules:
        kohya = "lora_unet_" + keys.flatten(ldm[name])
        state_dict[f"{kohya}.lora_down.weight"] = torch.zeros(1, 1)
        state_dict[f"{kohya}.lora_up.weight"] = torch.zeros(1, 1)
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(state_dict, unet_config=unet.config)
    peft = convert_unet_state_dict_to_peft(
        {key.removeprefix("unet."): value for key, value in converted.items()}
    )
    assert {key.rsplit(".lora_A.", 1)[0] for key in peft if ".lora_A." in key} == set(modules)


def test_loha_delta(tmp_path):
    w1a, w1b, w2a, w2b = randn(32, 4), randn(4, 32), randn(32, 4), randn(4, 32)
    name = "lora_unet_" + keys.flatten(ATTN1_Q)
    path = write(
        tmp_path,
        {
            f"{name}.hada_w1_a": w1a,
            f"{name}.hada_w1_b": w1b,
            f"{name}.hada_w2_a": w2a,
            f"{name}.hada_w2_b": w2b,
            f"{name}.alpha": torch.tensor(2.0),
        },
    )
    layer = load_adapter(path).layers[f"unet.{ATTN1_Q}"]
    assert isinstance(layer, LohaLayer)
    torch.testing.assert_close(layer.delta(), (w1a @ w1b) * (w2a @ w2b) * 2.0 / 4)


def test_lokr_whole_factors_have_scale_one_and_decomposed_alpha_over_rank(tmp_path):
    w1, w2 = randn(4, 4), randn(8, 8)
    w2a, w2b = randn(8, 2), randn(2, 8)
    whole = "lora_unet_" + keys.flatten(ATTN1_Q)
    split = "lora_te_" + keys.flatten(TEXT_Q)
    path = write(
        tmp_path,
        {
            f"{whole}.lokr_w1": w1,
            f"{whole}.lokr_w2": w2,
            f"{whole}.alpha": torch.tensor(3.0),  # ignored: nothing is decomposed
            f"{split}.lokr_w1": w1,
            f"{split}.lokr_w2_a": w2a,
            f"{split}.lokr_w2_b": w2b,
            f"{split}.alpha": torch.tensor(1.0),
        },
    )
    layers = load_adapter(path).layers
    assert isinstance(layers[f"unet.{ATTN1_Q}"], LokrLayer)
    torch.testing.assert_close(layers[f"unet.{ATTN1_Q}"].delta(), torch.kron(w1, w2))
    torch.testing.assert_close(
        layers[f"text_encoder.{TEXT_Q}"].delta(), torch.kron(w1, w2a @ w2b) * 0.5
    )


def test_flat_conv_loha_and_linear_lora_on_a_1x1_conv_take_the_module_shape(tmp_path):
    pipeline = build_tiny_pipeline("sd1")
    conv = "down_blocks.0.resnets.0.conv1"  # 32 -> 32, 3x3
    proj_in = "down_blocks.0.attentions.0.proj_in"  # SD1: a 1x1 Conv2d
    tensors = {
        f"lora_unet_{keys.flatten(conv)}.hada_w1_a": randn(32, 2),
        f"lora_unet_{keys.flatten(conv)}.hada_w1_b": randn(2, 32 * 9),
        f"lora_unet_{keys.flatten(conv)}.hada_w2_a": randn(32, 2),
        f"lora_unet_{keys.flatten(conv)}.hada_w2_b": randn(2, 32 * 9),
        f"lora_unet_{keys.flatten(proj_in)}.lora_down.weight": randn(2, 32),
        f"lora_unet_{keys.flatten(proj_in)}.lora_up.weight": randn(32, 2),
    }
    adapter = load_adapter(write(tmp_path, tensors))
    match_to_base(adapter, pipeline, "sd1")
    assert adapter.layers[f"unet.{conv}"].delta().shape == (32, 32, 3, 3)
    assert adapter.layers[f"unet.{proj_in}"].delta().shape == (32, 32, 1, 1)


@pytest.mark.parametrize(
    ("suffix", "message"),
    [("lora_mid.weight", "Tucker"), ("dora_scale", "DoRA")],
)
def test_tucker_and_dora_layers_are_refused_by_name(tmp_path, suffix, message):
    name = "lora_unet_" + keys.flatten(ATTN1_Q)
    tensors = {
        f"{name}.lora_down.weight": randn(4, 32),
        f"{name}.lora_up.weight": randn(32, 4),
        f"{name}.{suffix}": randn(4, 4),
    }
    with pytest.raises(SdloraError, match=message):
        load_adapter(write(tmp_path, tensors))


def lora_pair(name: str, in_features: int, out_features: int = 8) -> dict[str, torch.Tensor]:
    return {
        f"{name}.lora_down.weight": torch.zeros(2, in_features),
        f"{name}.lora_up.weight": torch.zeros(out_features, 2),
    }


@pytest.mark.parametrize(
    ("tensors", "metadata", "family"),
    [
        (lora_pair("lora_unet_x_attn2_to_k", 8), {"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
        (lora_pair("lora_unet_x_attn2_to_k", 8), {"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2"),
        (lora_pair("lora_unet_x_attn2_to_k", 8), {"sdlora.family": "sd1"}, "sd1"),
        (lora_pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 8), {}, "sdxl"),
        (lora_pair("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 768), {}, "sd1"),
        (lora_pair("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 1024), {}, "sd2"),
        (lora_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 2048), {}, "sdxl"),
        (lora_pair("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 32), {}, None),
    ],
)  # fmt: skip
def test_family_from_metadata_keys_or_widths(tmp_path, tensors, metadata, family):
    assert load_adapter(write(tmp_path, tensors, metadata)).family == family


def test_sdxl_kohya_file_with_diffusers_unet_names(tmp_path):
    """diffusers' SDXL training script writes kohya prefixes with diffusers UNet names."""
    pipeline = build_tiny_pipeline("sdxl")
    original = random_adapter(pipeline, rank=2, alpha=1.0, convs=True)
    tensors = {}
    for path, layer in original.layers.items():
        name = keys.path_to_kohya_name(keys.canonical_path(path), sdxl=True)
        tensors[f"{name}.lora_down.weight"] = layer.down
        tensors[f"{name}.lora_up.weight"] = layer.up
    assert any(key.startswith("lora_unet_down_blocks_") for key in tensors)
    adapter = load_adapter(write(tmp_path, tensors))
    assert adapter.family == "sdxl"
    assert match_to_base(adapter, pipeline, "sdxl").unmatched == []
    assert sorted(adapter.layers) == sorted(original.layers)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_training_metadata_is_strings_that_declare_the_family(family):
    config = {"lora": {"rank": 16, "alpha": 8}, "train": {"steps": 1000}}
    metadata = training_metadata(
        family=family,
        rank=16,
        alpha=8.0,
        resolution=512,
        max_train_steps=1000,
        base_model="some/base",
        output_name="oil",
        trigger_words=["sks"],
        tag_frequency={"data": {"sks": 3}},
        config=config,
    )
    assert all(isinstance(value, str) for value in metadata.values())
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("16", "8")
    assert json.loads(metadata["sdlora.config"]) == config
    assert json.loads(metadata["ss_tag_frequency"]) == {"data": {"sks": 3}}
    assert trigger_words(metadata) == ["sks"]
    assert family_from_metadata(metadata) == family
    # kohya-aware tools read ss_base_model_version alone
    assert (
        family_from_metadata({"ss_base_model_version": metadata["ss_base_model_version"]}) == family
    )
