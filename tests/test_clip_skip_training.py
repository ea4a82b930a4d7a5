"""train.clip_skip: the UNet is conditioned on the chosen text-encoder layer, and the file says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import adapter_tensors, tiny_config

from sdlora.errors import SdloraError
from sdlora.train import loop


def train_recording_conditioning(config, monkeypatch) -> tuple[torch.Tensor, Path]:
    """Train `config`; return the text states the UNet was conditioned on at the first step,
    and the adapter file."""
    seen = []

    def recording(text, *args, **kwargs):
        seen.append(text.hidden.detach().clone())
        return unet_conditioning(text, *args, **kwargs)

    unet_conditioning = loop.unet_conditioning
    monkeypatch.setattr(loop, "unet_conditioning", recording)
    path = loop.train(config)
    return seen[0], path


@pytest.mark.parametrize("text_encoder", [False, True], ids=["cached-embeddings", "trained-encoder"])
def test_clip_skip_2_conditions_on_other_embeddings_and_is_recorded(
    tiny_sd1, tmp_path, monkeypatch, text_encoder
):
    runs = {}
    for clip_skip in (1, 2):
        config = tiny_config(tiny_sd1, tmp_path / str(clip_skip), lora={"text_encoder": text_encoder},
                             train={"steps": 1, "clip_skip": clip_skip})
        runs[clip_skip] = train_recording_conditioning(config, monkeypatch)
    assert not torch.allclose(runs[1][0], runs[2][0])
    for clip_skip, (_, path) in runs.items():
        assert adapter_tensors(path)[1]["ss_clip_skip"] == str(clip_skip)


def test_clip_skip_beyond_the_encoders_layers_is_refused_before_training(tiny_sd1, tmp_path):
    config = tiny_config(tiny_sd1, tmp_path, train={"clip_skip": 3})  # the tiny encoder has 2
    with pytest.raises(SdloraError, match=r"train.clip_skip must be a whole number from 1 to 2"):
        loop.train(config)


@pytest.mark.parametrize("clip_skip", [0, 13])
def test_config_checks_the_clip_skip_range(tiny_sd1, tmp_path, clip_skip):
    with pytest.raises(SdloraError, match=r"train.clip_skip must be from 1 .* to 12, got"):
        tiny_config(tiny_sd1, tmp_path, train={"clip_skip": clip_skip})
