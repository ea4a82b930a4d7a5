"""Training failures end in one line and never in a broken or misleading file."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from safetensors import SafetensorError, safe_open
from test_train import make_images, tiny_config

from sdlora.base.models import load_base
from sdlora.cli import main
from sdlora.train import checkpoints
from sdlora.train.cache import LatentCache, encode_latents
from sdlora.train.dataset import TrainingDataset


def run_cli(config, tmp_path, *args) -> int:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return main(["train", str(path), *args])


def error_line(capsys) -> str:
    """The error must start a line of its own, not follow a progress bar's last state."""
    lines = capsys.readouterr().err.split("\n")
    errors = [line for line in lines if "sdlora train: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("sdlora train: error:"), lines[-3:]
    assert not any("Traceback" in line for line in lines)
    return errors[0]


def test_overflowing_weights_are_never_saved(tiny_sd1, tmp_path, capsys):
    """At learning rate 1e6 one step puts weights near 1e6: finite in fp32, inf in fp16."""
    config = tiny_config(tiny_sd1, tmp_path, train={"steps": 1, "learning_rate": 1e6})
    assert run_cli(config, tmp_path) == 2
    error = error_line(capsys)
    assert "weights overflow fp16 at step 1" in error and "lower train.learning_rate" in error
    assert "output.dtype=fp32" in error and "no good checkpoint was written yet" in error
    assert not config.adapter_path.exists()

    checkpointed = tiny_config(tiny_sd1, tmp_path, train={"steps": 3, "learning_rate": 1e6},
                               checkpoint={"every": 1})
    assert run_cli(checkpointed, tmp_path, "--overwrite") == 2
    assert "weights overflow fp16 at step 1" in error_line(capsys)
    assert checkpoints.list_checkpoints(checkpointed.output.dir) == []


def test_the_last_good_checkpoint_is_one_whose_weights_are_finite(tmp_path):
    folder = checkpoints.checkpoint_dir(tmp_path)
    folder.mkdir()
    for step, value in ((2, 1.0), (4, 1e6), (6, float("nan"))):
        torch.save({"step": step, "lora": {"unet": {"w": torch.full((2,), value)}}},
                   folder / f"step-{step:06d}.pt")
    assert checkpoints.last_good_checkpoint(tmp_path).name == "step-000004.pt"
    assert checkpoints.last_good_checkpoint(tmp_path, torch.float16).name == "step-000002.pt"


def test_disk_full_writing_the_adapter_keeps_the_old_one(tiny_sd1, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    config = tiny_config(tiny_sd1, tmp_path, train={"steps": 1})
    assert run_cli(config, tmp_path) == 0
    before = config.adapter_path.read_bytes()

    def full_disk(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"half")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                              "StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    capsys.readouterr()
    assert run_cli(config, tmp_path, "--overwrite") == 2
    error = error_line(capsys)
    assert f"disk full writing {config.adapter_path} (files written before are kept)" in error
    assert config.adapter_path.read_bytes() == before
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_loss_error_is_printed_on_its_own_line(tiny_sd1, tmp_path, capsys, monkeypatch):
    import sdlora.train.loop as loop

    real_mse = loop.F.mse_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_mse(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setattr(loop.F, "mse_loss", poisoned)
    assert run_cli(tiny_config(tiny_sd1, tmp_path, train={"steps": 4}), tmp_path) == 2
    assert "loss became nan at step 3" in error_line(capsys)


def test_caption_file_that_is_not_utf8_is_one_line(tiny_sd1, tmp_path, capsys):
    config = tiny_config(tiny_sd1, tmp_path, train={"steps": 1})
    (tmp_path / "images" / "image0.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert run_cli(config, tmp_path) == 2
    assert "image0.txt is not UTF-8 text" in error_line(capsys)


def test_adapter_metadata_records_no_local_paths(tiny_sd1, tmp_path):
    from sdlora.train.loop import train

    path = train(tiny_config(tiny_sd1, tmp_path, train={"steps": 1}))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert str(tmp_path) not in json.dumps(metadata)
    recorded = json.loads(metadata["sdlora.config"])
    assert recorded["data"]["instance_dir"] == "images" and recorded["output"]["dir"] == "out"
    assert recorded["base"] == tiny_sd1.name == metadata["ss_sd_model_name"]


@pytest.fixture
def dataset_and_vae(tiny_sd1, tmp_path):
    dataset = TrainingDataset(make_images(tmp_path / "images", count=2), "x", resolution=64)
    return dataset, load_base(str(tiny_sd1)).pipeline.vae


def test_disk_latent_cache_is_keyed_by_the_vae(dataset_and_vae, tmp_path):
    dataset, vae = dataset_and_vae
    folder = tmp_path / "cache"
    first = LatentCache(vae, dataset, "disk", folder, show_progress=False)
    other_vae = copy.deepcopy(vae)
    with torch.no_grad():
        other_vae.encoder.conv_in.weight.mul_(1.5)
    second = LatentCache(other_vae, dataset, "disk", folder, show_progress=False)
    expected = encode_latents(other_vae, dataset.image(0)["pixel_values"][None])[0]
    assert torch.equal(second.batch([0])[0], expected)
    assert not torch.equal(first.batch([0]), second.batch([0]))
    assert len(list(folder.glob("*.safetensors"))) == 4


def test_truncated_latent_cache_file_is_recomputed(dataset_and_vae, tmp_path, capsys):
    dataset, vae = dataset_and_vae
    folder = tmp_path / "cache"
    first = LatentCache(vae, dataset, "disk", folder, show_progress=False)
    for path in folder.glob("*.safetensors"):
        path.write_bytes(path.read_bytes()[:20])
    again = LatentCache(vae, dataset, "disk", folder, show_progress=False)
    assert torch.equal(first.batch([0, 1]), again.batch([0, 1]))
    assert capsys.readouterr().out.count("is unreadable") == 2
    for path in folder.glob("*.safetensors"):  # rewritten whole
        with safe_open(str(path), framework="pt") as handle:
            assert handle.keys() == ["latent"]

