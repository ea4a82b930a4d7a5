"""Bad adapter files and mismatched bases end in one-line SdloraErrors; convert/info via the CLI."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from factories import random_adapter
from safetensors.torch import save_file

from sdlora.adapters.core import Adapter, LoraLayer
from sdlora.adapters.read import load_adapter, match_to_base
from sdlora.adapters.write import save_adapter
from sdlora.cli import main
from sdlora.errors import SdloraError


class MakesDirectoryWhenUnpickled:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_files_are_refused_without_being_opened(tmp_path, monkeypatch, suffix):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"adapter{suffix}"
    path.write_bytes(pickle.dumps(MakesDirectoryWhenUnpickled(str(marker))))

    def never(*args, **kwargs):
        raise AssertionError("a pickle loader was called")

    monkeypatch.setattr(torch, "load", never)
    monkeypatch.setattr(pickle, "load", never)
    monkeypatch.setattr(pickle, "loads", never)
    with pytest.raises(SdloraError) as error:
        load_adapter(path)
    assert "pickle" in one_line(error) and ".safetensors" in one_line(error)
    assert not marker.exists()


def test_a_pickle_named_safetensors_is_not_a_safetensors_file(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(pickle.dumps(MakesDirectoryWhenUnpickled(str(marker))))
    with pytest.raises(SdloraError, match="not a complete safetensors file"):
        load_adapter(path)
    assert not marker.exists()


def test_missing_file(tmp_path):
    with pytest.raises(SdloraError, match="adapter file not found"):
        load_adapter(tmp_path / "nowhere.safetensors")


def test_truncated_file(sd1, tmp_path):
    path = save_adapter(random_adapter(sd1), tmp_path / "a.safetensors")
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(SdloraError) as error:
        load_adapter(path)
    assert "not a complete safetensors file" in one_line(error)


def test_safetensors_without_lora_keys(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(SdloraError) as error:
        load_adapter(path)
    assert one_line(error).startswith("not a LoRA adapter")


def test_adapter_for_another_family_names_both(sd1, sdxl, tmp_path):
    path = save_adapter(random_adapter(sdxl, name="xl"), tmp_path / "xl.safetensors")
    with pytest.raises(SdloraError) as error:
        match_to_base(load_adapter(path), sd1, "sd1")
    assert one_line(error) == "adapter 'xl' is for sdxl but the base is sd1"


def test_unknown_family_with_wrong_shapes_names_module_and_shapes(sd1, sdxl):
    adapter = random_adapter(sdxl, text_encoder=False)
    adapter.family = None
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    adapter.layers = {module: LoraLayer(torch.zeros(2, 64), torch.zeros(64, 2), 1.0)}
    with pytest.raises(SdloraError) as error:
        match_to_base(adapter, sd1, "sd1")
    assert f"{module} has shape (32, 32) in the base but (64, 64)" in one_line(error)


def test_few_unmatched_keys_are_reported_most_unmatched_is_an_error(sd1):
    adapter = random_adapter(sd1, family="sd1")
    stray = "unet.down_blocks.9.attentions.0.proj_in"
    adapter.layers[stray] = LoraLayer(torch.zeros(2, 8), torch.zeros(8, 2), 1.0)
    report = match_to_base(adapter, sd1, "sd1")
    assert report.unmatched == [stray] and report.num_unmatched == 1
    assert len(report.matched) == len(adapter.layers) - 1

    strays = {
        f"unet.nowhere.{i}": LoraLayer(torch.zeros(2, 8), torch.zeros(8, 2), 1.0) for i in range(9)
    }
    mostly_wrong = Adapter(
        name="other", layers={**strays, **dict(list(adapter.layers.items())[:3])}
    )
    with pytest.raises(SdloraError, match="9 of 12 layers match no module"):
        match_to_base(mostly_wrong, sd1, "sd1")


def test_match_rekeys_text_encoder_paths_to_the_base_spelling(sd1, tmp_path):
    original = random_adapter(sd1)
    loaded = load_adapter(save_adapter(original, tmp_path / "a.safetensors"))
    # Files always spell text_model; this transformers' CLIPTextModel may not have that level.
    assert any(path.startswith("text_encoder.text_model.") for path in loaded.layers)
    match_to_base(loaded, sd1, "sd1")
    assert sorted(loaded.layers) == sorted(original.layers)


def test_cli_convert_keeps_updates_and_metadata(sdxl, tmp_path):
    original = random_adapter(sdxl, rank=4, alpha=2.0)
    source = save_adapter(original, tmp_path / "in.safetensors", metadata={"ss_output_name": "x"})
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(source), "--to", "diffusers", "--out", str(out)]) == 0
    before = out.read_bytes()
    assert main(["convert", str(source), "--to", "kohya", "--out", str(out)]) == 2
    assert out.read_bytes() == before  # never replaced without --overwrite
    assert main(["convert", str(source), "--to", "diffusers", "--out", str(out),
                 "--overwrite"]) == 0
    converted = load_adapter(out)
    assert converted.family == "sdxl" and converted.metadata["ss_output_name"] == "x"
    match_to_base(converted, sdxl, "sdxl")
    for path, layer in original.layers.items():
        torch.testing.assert_close(
            converted.layers[path].delta(), layer.delta(), atol=2e-3, rtol=1e-2
        )


def test_cli_info_prints_family_layout_rank_and_training_settings(sdxl, tmp_path, capsys):
    from sdlora.adapters.metadata import training_metadata

    metadata = training_metadata(
        family="sdxl",
        rank=4,
        alpha=2.0,
        resolution=1024,
        max_train_steps=500,
        base_model="stabilityai/stable-diffusion-xl-base-1.0",
        output_name="oil",
        trigger_words=["sks style"],
        tag_frequency={"oil": {"painting": 12, "sks style": 20}},
        config={"lora": {"rank": 4}},
    )
    path = save_adapter(
        random_adapter(sdxl, rank=4, alpha=2.0), tmp_path / "oil.safetensors", metadata=metadata
    )
    assert main(["info", str(path)]) == 0
    lines = dict(
        (part.strip() for part in line.split(":", 1))
        for line in capsys.readouterr().out.splitlines()
    )
    assert lines["family"] == "sdxl"
    assert lines["layout"] == "kohya"
    assert lines["rank"] == "4" and lines["alpha"] == "2"
    assert lines["trigger words"] == "sks style"
    assert lines["max train steps"] == "500"
    assert lines["top tags"] == "sks style (20), painting (12)"
    assert "attn1.to_q" in lines["targets"] and "self_attn.q_proj" in lines["targets"]


def test_cli_refuses_pickle_with_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "adapter.ckpt"
    path.write_bytes(b"not read")
    assert main(["info", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "pickle" in error
