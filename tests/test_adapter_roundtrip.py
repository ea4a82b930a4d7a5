"""save_adapter -> load_adapter keeps every update, in both layouts, for SD1 and SDXL."""

from __future__ import annotations

import pytest
import torch
from factories import random_adapter
from safetensors import safe_open

from sdlora.adapters.core import Adapter, LohaLayer, LokrLayer, LoraLayer
from sdlora.adapters.read import load_adapter, match_to_base
from sdlora.adapters.write import save_adapter
from sdlora.base.tiny import build_tiny_pipeline
from sdlora.errors import SdloraError


@pytest.fixture(scope="module")
def pipelines():
    return {family: build_tiny_pipeline(family) for family in ("sd1", "sdxl")}


def file_keys(path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def file_metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def assert_same_updates(loaded: Adapter, original: Adapter, atol: float) -> None:
    assert sorted(loaded.layers) == sorted(original.layers)
    paths = list(original.layers)
    # One comparison over all layers: per-layer calls cost seconds on a busy 2-core machine.
    torch.testing.assert_close(
        torch.cat([loaded.layers[path].delta().flatten() for path in paths]),
        torch.cat([original.layers[path].delta().flatten() for path in paths]),
        atol=atol,
        rtol=1e-2,
    )


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_round_trip_keeps_every_update_including_convs(pipelines, tmp_path, family, layout):
    pipeline = pipelines[family]
    original = random_adapter(pipeline, rank=4, alpha=2.0, convs=True)
    assert any(layer.down.dim() == 4 for layer in original.layers.values())
    path = save_adapter(
        original, tmp_path / "a.safetensors", layout=layout, metadata={"note": "hi"}
    )

    loaded = load_adapter(path)
    assert loaded.name == "a"
    assert loaded.family == family
    assert loaded.metadata["note"] == "hi"
    report = match_to_base(loaded, pipeline, family)
    assert report.unmatched == []
    assert_same_updates(loaded, original, atol=2e-3)  # fp16 storage


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_float32_round_trip_is_exact_and_restores_alpha(pipelines, tmp_path, layout):
    original = random_adapter(pipelines["sd1"], rank=4, alpha=6.0)
    path = save_adapter(original, tmp_path / "a.safetensors", layout=layout, dtype=torch.float32)
    loaded = load_adapter(path)
    match_to_base(loaded, pipelines["sd1"], "sd1")
    assert_same_updates(loaded, original, atol=1e-6)
    assert {layer.alpha for layer in loaded.layers.values()} == {6.0}


def test_kohya_sd1_names_are_flattened_diffusers_names(pipelines, tmp_path):
    path = save_adapter(random_adapter(pipelines["sd1"], alpha=3.0), tmp_path / "a.safetensors")
    names = file_keys(path)
    assert (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
        in names
    )
    assert "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0.alpha" in names
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in names
    with safe_open(str(path), framework="pt") as handle:
        alpha = handle.get_tensor("lora_te_text_model_encoder_layers_1_self_attn_out_proj.alpha")
    assert alpha.dim() == 0 and alpha.item() == 3.0


def test_kohya_sdxl_names_are_ldm_names_with_te1_te2(pipelines, tmp_path):
    adapter = random_adapter(pipelines["sdxl"], convs=True)
    names = file_keys(save_adapter(adapter, tmp_path / "a.safetensors"))
    # tiny SDXL: down block 1 has attention -> input_blocks 4 and 5; up block 0 -> output_blocks 0-2
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in names
    assert "lora_unet_output_blocks_2_1_transformer_blocks_1_attn2_to_k.lora_up.weight" in names
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_v.alpha" in names
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in names  # resnet conv1
    assert "lora_unet_output_blocks_5_0_out_layers_3.lora_down.weight" in names  # resnet conv2
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in names
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in names
    assert not any("down_blocks" in name or "up_blocks" in name for name in names)


def test_diffusers_layout_folds_alpha_into_lora_b(pipelines, tmp_path):
    original = random_adapter(pipelines["sd1"], rank=4, alpha=2.0, text_encoder=False)
    path = save_adapter(
        original, tmp_path / "a.safetensors", layout="diffusers", dtype=torch.float32
    )
    names = file_keys(path)
    assert not [name for name in names if name.endswith(".alpha")]
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    with safe_open(str(path), framework="pt") as handle:
        lora_b = handle.get_tensor(f"{module}.lora_B.weight")
    torch.testing.assert_close(lora_b, original.layers[module].up * 0.5)
    assert file_metadata(path)["sdlora.folded_alpha"] == "2.0"


def test_kohya_file_carries_one_alpha_even_when_layers_differ(pipelines, tmp_path):
    original = random_adapter(pipelines["sd1"], rank=4, alpha=2.0, text_encoder=False)
    odd = next(iter(original.layers))
    original.layers[odd].alpha = 7.0
    path = save_adapter(original, tmp_path / "a.safetensors", dtype=torch.float32)
    with safe_open(str(path), framework="pt") as handle:
        alphas = {handle.get_tensor(k).item() for k in handle.keys() if k.endswith(".alpha")}
    assert alphas == {2.0}
    assert_same_updates(load_adapter(path), original, atol=1e-6)


def test_loha_and_lokr_round_trip_through_kohya_and_refuse_diffusers(tmp_path):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    original = Adapter(
        name="lyco",
        layers={
            "unet.mid_block.attentions.0.proj_in": LohaLayer(
                randn(8, 2), randn(2, 8), randn(8, 2), randn(2, 8), alpha=1.0, weight_shape=(8, 8)
            ),
            "unet.mid_block.attentions.0.proj_out": LokrLayer(
                randn(2, 2), randn(4, 4), scale=0.25, weight_shape=(8, 8)
            ),
            "unet.mid_block.resnets.0.conv1": LoraLayer(randn(2, 8, 3, 3), randn(8, 2, 1, 1), 1.0),
        },
    )
    path = save_adapter(original, tmp_path / "lyco.safetensors", dtype=torch.float32)
    assert "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a" in file_keys(path)
    assert_same_updates(load_adapter(path), original, atol=1e-5)
    with pytest.raises(SdloraError, match="LoHa layers"):
        save_adapter(original, tmp_path / "d.safetensors", layout="diffusers")
    assert not (tmp_path / "d.safetensors").exists()


def test_save_is_atomic_and_never_leaves_a_partial_file(pipelines, tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "a.safetensors"
    path.write_bytes(b"previous adapter")

    def fail_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(random_adapter(pipelines["sd1"]), path)
    assert path.read_bytes() == b"previous adapter"
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_save_rejects_unknown_layout_and_non_string_metadata(pipelines, tmp_path):
    adapter = random_adapter(pipelines["sd1"])
    with pytest.raises(SdloraError, match="unknown adapter layout 'webui'"):
        save_adapter(adapter, tmp_path / "a.safetensors", layout="webui")
    with pytest.raises(ValueError, match="ss_network_dim"):
        save_adapter(adapter, tmp_path / "a.safetensors", metadata={"ss_network_dim": 4})
    assert not list(tmp_path.iterdir())
