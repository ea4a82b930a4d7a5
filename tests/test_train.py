"""End-to-end training on the tiny models: files that load, exact resume, clean failures."""

from __future__ import annotations

import errno
import os
import platform
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from sdlora.adapters.read import load_adapter
from sdlora.base.models import load_base
from sdlora.cli import main
from sdlora.errors import SdloraError
from sdlora.train.checkpoints import list_checkpoints
from sdlora.train.config import from_dict, validate
from sdlora.train.loop import train


def make_images(folder, count=3, size=(64, 64), captions=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image{index}.png")
        if captions:
            (folder / f"image{index}.txt").write_text(f"sks, red, circle{index}, blue")
    return folder


def tiny_config(base, tmp_path, **sections):
    raw = {
        "base": str(base),
        "data": {"instance_dir": str(make_images(tmp_path / "images")),
                 "instance_prompt": "a painting in sks style", "resolution": 64},
        "lora": {"rank": 4, "alpha": 2},
        "train": {"steps": 3, "learning_rate": 1e-3},
        "checkpoint": {"every": 0},
        "output": {"dir": str(tmp_path / "out"), "name": "style", "tensorboard": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    config = from_dict(raw)
    validate(config)
    return config


def adapter_tensors(path):
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def test_sd1_training_writes_a_kohya_adapter_with_metadata(tiny_sd1, tmp_path):
    config = tiny_config(tiny_sd1, tmp_path, data={"trigger_word": "sks"})
    path = train(config)
    assert path == tmp_path / "out" / "style.safetensors"
    tensors, metadata = adapter_tensors(path)
    assert all(key.startswith("lora_unet_") for key in tensors)
    assert tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"] == 2
    assert all(t.dtype == torch.float16 for k, t in tensors.items() if not k.endswith(".alpha"))
    assert metadata["ss_network_dim"] == "4" and metadata["sdlora.family"] == "sd1"
    assert metadata["ss_max_train_steps"] == "3"
    saved = yaml.safe_load((tmp_path / "out" / "style.config.yaml").read_text())
    assert saved["lora"]["rank"] == 4 and saved["base"] == str(tiny_sd1)
    # training moved the up matrices away from their zero initialisation
    assert any(t.abs().max() > 0 for k, t in tensors.items() if "lora_up" in k)


def test_sdxl_text_encoder_training_writes_ldm_names_for_both_encoders(tiny_sdxl, tmp_path):
    config = tiny_config(tiny_sdxl, tmp_path, lora={"text_encoder": True})
    tensors, metadata = adapter_tensors(train(config))
    prefixes = {key.split("_")[1] if key.startswith("lora_unet") else key.split("_")[1]
                for key in tensors}
    assert {"unet", "te1", "te2"} <= prefixes
    assert any(key.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0") for key in tensors)
    assert metadata["sdlora.family"] == "sdxl"


def test_frozen_text_encoder_and_vae_are_freed_once_cached(tiny_sd1, tmp_path, monkeypatch):
    """Their memory goes back while the UNet trains: that is where our peak RSS beats diffusers'."""
    import gc
    import weakref

    import sdlora.train.loop as loop

    watched = {}

    def load_and_watch(*args, **kwargs):
        base = load_base(*args, **kwargs)
        watched.update(text_encoder=weakref.ref(base.pipeline.text_encoder), vae=base.pipeline.vae)
        return base

    during_training = []

    def on_step(step, loss):
        gc.collect()
        during_training.append((watched["text_encoder"]() is None,
                                all(p.is_meta for p in watched["vae"].parameters())))

    monkeypatch.setattr(loop, "load_base", load_and_watch)
    train(tiny_config(tiny_sd1, tmp_path), on_step=on_step)
    assert during_training == [(True, True)] * 3


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_reaches_the_trained_text_encoder(tiny_sd1, tmp_path, monkeypatch,
                                                                 checkpointing):
    """train.gradient_checkpointing, and only it, checkpoints the UNet and a trained text
    encoder; without it the UNet's feed-forwards are recomputed instead."""
    import sdlora.train.loop as loop

    loaded = []

    def load_and_keep(*args, **kwargs):
        loaded.append(load_base(*args, **kwargs))
        return loaded[-1]

    seen = []

    def on_step(step, loss):
        pipeline = loaded[0].pipeline
        seen.append((pipeline.unet.is_gradient_checkpointing,
                     pipeline.text_encoder.is_gradient_checkpointing))

    monkeypatch.setattr(loop, "load_base", load_and_keep)
    train(tiny_config(tiny_sd1, tmp_path, lora={"text_encoder": True},
                      train={"gradient_checkpointing": checkpointing}), on_step=on_step)
    assert seen == [(checkpointing, checkpointing)] * 3


def test_cpu_training_uses_native_conv_and_restores_onednn_after(tiny_sd1, tmp_path):
    """oneDNN is off only while the loop runs: the web UI renders with it after training."""
    during = []
    train(tiny_config(tiny_sd1, tmp_path), on_step=lambda step, loss: during.append(
        torch.backends.mkldnn.enabled))
    assert during == [False] * 3 and torch.backends.mkldnn.enabled


FREE_A_BLOCK_WHILE_TUNED = """
import os, torch
from sdlora.train.cpu_tuning import tuned_for_cpu

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

larger = torch.ones(24 << 20, dtype=torch.uint8)
del larger  # raises glibc's own mmap and trim thresholds above 8 MiB
with tuned_for_cpu(torch.device("cpu")):
    block = torch.ones(8 << 20, dtype=torch.uint8)
    holding = resident()
    del block
    print((holding - resident()) / (8 << 20))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_cpu_training_gives_freed_blocks_back_to_the_os():
    """An 8 MiB block freed while training leaves resident memory at once (a fresh process:
    glibc's thresholds depend on everything the process freed before)."""
    env = {name: value for name, value in os.environ.items() if name != "MALLOC_MMAP_THRESHOLD_"}
    returned = subprocess.run([sys.executable, "-c", FREE_A_BLOCK_WHILE_TUNED], env=env,
                              capture_output=True, text=True, check=True).stdout
    assert float(returned) > 0.75, returned


def interrupt_at(step_to_stop):
    def on_step(step, loss):
        if step == step_to_stop:
            raise KeyboardInterrupt

    return on_step


def test_resumed_run_equals_uninterrupted_run(tiny_sd1, tmp_path):
    settings = dict(
        lora={"text_encoder": True, "dropout": 0.1},
        data={"caption_dropout": 0.3, "shuffle_tags": True},
        train={"steps": 10, "lr_scheduler": "cosine", "lr_warmup_steps": 2, "batch_size": 2},
        output={"dtype": "fp32"},
    )
    straight = train(tiny_config(tiny_sd1, tmp_path / "a", **settings))

    resumed_config = tiny_config(tiny_sd1, tmp_path / "b", **settings)
    with pytest.raises(KeyboardInterrupt):
        train(resumed_config, on_step=interrupt_at(5))
    assert [step for step, _ in list_checkpoints(resumed_config.output.dir)] == [5]
    resumed = train(resumed_config, resume="latest")

    first, second = load_adapter(straight), load_adapter(resumed)
    assert first.layers.keys() == second.layers.keys()
    worst = max((first.layers[k].delta() - second.layers[k].delta()).abs().max().item()
                for k in first.layers)
    assert worst <= 1e-6


def test_checkpoints_are_pruned_and_validation_grids_written(tiny_sd1, tmp_path):
    config = tiny_config(
        tiny_sd1, tmp_path,
        train={"steps": 4},
        checkpoint={"every": 1, "keep": 2},
        validation={"prompts": ["a red circle", "a blue square"], "every": 2, "steps": 2},
    )
    train(config)
    assert [step for step, _ in list_checkpoints(config.output.dir)] == [2, 3]
    grids = sorted((tmp_path / "out" / "validation").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-000002.png", "step-000004.png"]
    assert Image.open(grids[0]).width > 2 * 64  # two prompt columns and a label column


def test_v_prediction_and_prior_preservation(tiny_sd1_v, tmp_path):
    config = tiny_config(
        tiny_sd1_v, tmp_path,
        data={"class_dir": str(tmp_path / "class"), "class_prompt": "a painting",
              "num_class_images": 2, "bucket": False},
        train={"steps": 2, "min_snr_gamma": 5.0, "noise_offset": 0.05},
    )
    _, metadata = adapter_tensors(train(config))
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    assert metadata["ss_base_model_version"] == "sd_v1_v"


def test_diffusers_layout_and_caption_dropout_over_epochs(tiny_sd1, tmp_path):
    # Frozen text encoders are freed once every caption is cached; dropout must not hide one.
    config = tiny_config(tiny_sd1, tmp_path, output={"format": "diffusers"},
                         data={"caption_dropout": 0.5}, train={"steps": 9})
    tensors, _ = adapter_tensors(train(config))
    assert all(key.startswith("unet.") and ".lora_" in key for key in tensors)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_sd1, tmp_path, monkeypatch):
    config = tiny_config(tiny_sd1, tmp_path, train={"steps": 6}, checkpoint={"every": 2})
    import sdlora.train.loop as loop

    real_mse = loop.F.mse_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_mse(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(loop.F, "mse_loss", poisoned)
    with pytest.raises(SdloraError, match="loss became nan at step 4.*step-000002.pt"):
        train(config)
    assert not (tmp_path / "out" / "style.safetensors").exists()


def run_cli(*args):
    return main(list(args))


def test_cli_errors_are_one_line(tiny_sd1, tmp_path, capsys):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({
        "base": str(tiny_sd1),
        "data": {"instance_dir": str(tmp_path / "empty"), "instance_prompt": "x", "resolution": 64},
        "output": {"dir": str(tmp_path / "out")},
    }))
    (tmp_path / "empty").mkdir()
    assert run_cli("train", str(config_path)) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("sdlora train: error: no usable images") and "\n" not in error

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert run_cli("train", str(config_path), "--set", f"output.dir={blocker}/out") == 2
    assert "not writable" in capsys.readouterr().err

    assert run_cli("train", str(config_path), "--set", "lora.rank=0") == 2
    assert "lora.rank must be at least 1" in capsys.readouterr().err

    assert run_cli("train", str(config_path), "--resume", "latest") == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_train_one_adapter_written_once(tiny_sd1, tmp_path):
    import os
    import subprocess
    import sys

    config = tiny_config(tiny_sd1, tmp_path, train={"steps": 4}, checkpoint={"every": 2})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    # --multi_gpu is accelerate's torchrun path; on a CPU-only machine it starts CPU processes,
    # which the trainer then joins with gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "sdlora", "train", str(config_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 process(es)" in result.stderr + result.stdout
    assert (result.stderr + result.stdout).count("adapter written") == 1
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "style.config.yaml",
                                                     "style.safetensors"]
    assert not list(out.rglob("*.tmp"))
    assert len(load_adapter(out / "style.safetensors").layers) > 0


@pytest.mark.parametrize(
    ("targets", "train_options", "expected_key"),
    [
        ("transformer", {"mixed_precision": "bf16"}, "lora_unet_down_blocks_0_attentions_0_proj_in"),
        ("full", {"gradient_checkpointing": True, "gradient_accumulation": 2},
         "lora_unet_down_blocks_0_resnets_0_conv1"),
    ],
)
def test_target_presets_and_loop_options(tiny_sd1, tmp_path, targets, train_options, expected_key):
    config = tiny_config(tiny_sd1, tmp_path, lora={"targets": targets, "text_encoder": True},
                         train={"steps": 2, **train_options})
    tensors, _ = adapter_tensors(train(config))
    assert f"{expected_key}.lora_down.weight" in tensors
    if targets == "full":  # LoCon: 3x3 convs keep their kernel in the down matrix
        assert tensors[f"{expected_key}.lora_down.weight"].shape[-2:] == (3, 3)


def test_loraplus_and_text_encoder_learning_rates():
    from sdlora.train.lora import parameter_groups

    unet, text = torch.nn.Module(), torch.nn.Module()
    unet.lora_A = torch.nn.Parameter(torch.zeros(1))
    unet.lora_B = torch.nn.Parameter(torch.zeros(1))
    text.lora_A = torch.nn.Parameter(torch.zeros(1))
    groups = parameter_groups({"unet": unet, "text_encoder": text}, 1e-4, 5e-5, 16.0)
    rates = sorted(group["lr"] for group in groups)
    assert rates == pytest.approx([5e-5, 1e-4, 1.6e-3])


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(without_bitsandbytes):
    from sdlora.train.loop import make_optimizer

    config = from_dict({"base": "x", "data": {"instance_dir": "d", "instance_prompt": "p"},
                        "train": {"optimizer": "adamw8bit"}})
    with pytest.raises(SdloraError, match="pip install bitsandbytes"):
        make_optimizer(config, [{"params": [torch.nn.Parameter(torch.zeros(1))]}])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_trained_adapter_loads_in_diffusers_with_every_key_used(family, tiny_sd1, tiny_sdxl,
                                                                tmp_path):
    from consumers import assert_diffusers_fuses_every_layer
    from diffusers import DiffusionPipeline

    from sdlora.adapters.read import match_to_base

    base = tiny_sd1 if family == "sd1" else tiny_sdxl
    config = tiny_config(base, tmp_path, lora={"text_encoder": True, "rank": 4, "alpha": 3},
                         train={"steps": 2, "learning_rate": 1e-2})
    path = train(config)
    pipeline = DiffusionPipeline.from_pretrained(base)
    adapter = load_adapter(path)
    match_to_base(adapter, pipeline, family)
    assert {p.split(".")[0] for p in adapter.layers} >= {"unet", "text_encoder"}
    assert_diffusers_fuses_every_layer(pipeline, path, adapter, scale=0.8)


class FullDisk:
    """A file on a disk that fills up after a few writes."""

    def __init__(self, stream):
        self.stream = stream
        self.writes = 0

    def write(self, data):
        self.writes += 1
        if self.writes > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.stream.write(data)

    def flush(self):
        pass


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(tiny_sd1, tmp_path, monkeypatch,
                                                                 capsys):
    """torch.save reports the full disk as a RuntimeError about "unexpected pos": the trainer
    still says "disk full" and where, in one line, and keeps the last good checkpoint."""
    import sdlora.train.checkpoints as checkpoints

    config = tiny_config(tiny_sd1, tmp_path, train={"steps": 4}, checkpoint={"every": 2},
                         output={"tensorboard": True})
    real_save = checkpoints.torch.save

    def save_then_fill_disk(state, stream):
        if state["step"] != 2:
            stream.stream = FullDisk(stream.stream)
        return real_save(state, stream)  # torch wraps the failed write in its own RuntimeError

    monkeypatch.setattr(checkpoints.torch, "save", save_then_fill_disk)
    train(config)  # step 4 is the last step: no checkpoint, the adapter is written
    assert list((tmp_path / "out" / "logs").glob("events.out.tfevents.*"))

    config = tiny_config(tiny_sd1, tmp_path / "again", train={"steps": 6},
                         checkpoint={"every": 2})
    config_path = tmp_path / "again" / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    assert run_cli("train", str(config_path)) == 2
    error = capsys.readouterr().err.split("\n")[-2]
    assert re.fullmatch(r"sdlora train: error: disk full writing .*step-000004\.pt .*"
                        r"the last good checkpoint is .*step-000002\.pt", error), error
    folder = tmp_path / "again" / "out" / "checkpoints"
    assert [p.name for p in folder.glob("step-*.pt")] == ["step-000002.pt"]
    assert not list(folder.glob(".*.tmp"))
    assert checkpoints.load_checkpoint(folder / "step-000002.pt")["step"] == 2
