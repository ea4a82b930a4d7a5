"""Training from before/after pairs (data.before_dir): the adapter's weight scales its style.

Each styled training image is paired with its unstyled original (same name, same size). At a
random strength s per step the LoRA layers run at s times their weight and learn the picture s of
the way from the original's latent to the styled one's; tests/test_demo.py shows the effect on
the sampled pictures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import interrupt_at, tiny_config

from sdlora.adapters.read import load_adapter
from sdlora.base.models import load_base
from sdlora.errors import SdloraError
from sdlora.train.cache import encode_latents
from sdlora.train.dataset import TrainingDataset
from sdlora.train.loop import train


def write_pairs(folder, count=3, size=(96, 64), suffix=".png"):
    """{folder}/after/imageN.png (noise) and {folder}/before/imageN{suffix} (the same, darker)."""
    rng = np.random.default_rng(1)
    (folder / "after").mkdir(parents=True)
    (folder / "before").mkdir()
    for index in range(count):
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "after" / f"image{index}.png")
        Image.fromarray(pixels // 3).save(folder / "before" / f"image{index}{suffix}", quality=100)
    return folder / "after", folder / "before"


def test_each_image_is_paired_by_name_and_cut_exactly_like_its_original(tmp_path):
    after, before = write_pairs(tmp_path)
    dataset = TrainingDataset(after, "a style", resolution=64, bucket=False, random_crop=True,
                              random_flip=True, before_dir=before, seed=3)
    assert "paired with their originals" in dataset.describe()
    for index in range(len(dataset)):
        item = dataset.image(index)
        assert item["before_path"].endswith(f"image{index}.png")
        # before = after // 3 in pixels: the same crop and flip keep that relation
        after_bytes = np.round((item["pixel_values"].numpy() + 1) * 127.5)
        before_bytes = np.round((item["before_pixel_values"].numpy() + 1) * 127.5)
        assert np.abs(before_bytes - after_bytes // 3).max() <= 1


def test_an_original_may_have_another_suffix(tmp_path):
    after, before = write_pairs(tmp_path, count=1, suffix=".jpg")
    dataset = TrainingDataset(after, "a style", resolution=64, before_dir=before)
    assert dataset.image(0)["before_path"].endswith("image0.jpg")


def test_a_missing_mismatched_or_doubled_original_is_a_one_line_error(tmp_path):
    after, before = write_pairs(tmp_path)
    (before / "image1.png").unlink()
    with pytest.raises(SdloraError, match=r"no original for 1 of the 3 .*first: image1.png") as error:
        TrainingDataset(after, "a style", resolution=64, before_dir=before)
    assert "\n" not in str(error.value)

    Image.new("RGB", (32, 32)).save(before / "image1.png")
    with pytest.raises(SdloraError, match=r"image1.png is 32x32 but .*image1.png is 96x64"):
        TrainingDataset(after, "a style", resolution=64, before_dir=before)
    Image.new("RGB", (96, 64)).save(before / "image1.jpg")
    with pytest.raises(SdloraError, match="both image1.jpg and image1.png: keep one"):
        TrainingDataset(after, "a style", resolution=64, before_dir=before)
    with pytest.raises(SdloraError, match="before_dir .*missing does not exist"):
        TrainingDataset(after, "a style", resolution=64, before_dir=tmp_path / "missing")


@pytest.mark.parametrize("family, cache_latents, text_encoder", [
    ("sd1", "memory", False), ("sd1", "disk", False), ("sd1", "none", False),
    ("sdxl", "memory", True),
])
def test_at_strength_s_the_lora_runs_at_s_and_sees_pictures_s_of_the_way(
        request, tmp_path, monkeypatch, family, cache_latents, text_encoder):
    base = request.getfixturevalue(f"tiny_{family}")
    after, before = write_pairs(tmp_path / "pairs", count=2, size=(64, 64))
    config = tiny_config(base, tmp_path, train={"steps": 6, "batch_size": 2},
                         lora={"text_encoder": text_encoder},
                         data={"instance_dir": str(after), "before_dir": str(before),
                               "bucket": False, "cache_latents": cache_latents})
    vae = load_base(str(base)).pipeline.vae
    dataset = TrainingDataset(after, "a style", resolution=64, bucket=False, before_dir=before)
    with torch.no_grad():
        styled = encode_latents(vae, torch.stack([dataset.image(i)["pixel_values"] for i in (0, 1)]))
        originals = encode_latents(vae, torch.stack([dataset.image(i)["before_pixel_values"]
                                                     for i in (0, 1)]))

    from diffusers import DDPMScheduler
    from peft.tuners.lora import LoraLayer

    seen = []  # per step: (the strengths every LoRA layer ran at, the clean latents noised)
    real_add_noise = DDPMScheduler.add_noise

    def add_noise(scheduler, clean, noise, timesteps):
        seen.append((set(), clean.clone()))
        return real_add_noise(scheduler, clean, noise, timesteps)

    def record_strength(layer, args):
        if seen:  # not the validation or caching passes before the first step
            strength = layer.scaling["default"] * layer.r["default"] / layer.lora_alpha["default"]
            seen[-1][0].add(round(strength, 6))

    monkeypatch.setattr(DDPMScheduler, "add_noise", add_noise)
    real_update_layer = LoraLayer.update_layer

    def update_layer(layer, *args, **kwargs):
        real_update_layer(layer, *args, **kwargs)
        layer.register_forward_pre_hook(record_strength)

    monkeypatch.setattr(LoraLayer, "update_layer", update_layer)
    train(config)

    assert len(seen) == 6
    assert all(len(strengths) == 1 for strengths, _ in seen)  # text encoders and UNet alike
    strengths = [strengths.pop() for strengths, _ in seen]
    assert len(set(strengths)) == 6 and all(0 <= s < 1 for s in strengths)
    for strength, (_, clean) in zip(strengths, seen):
        # the batch holds both images, in the order of the epoch
        expected = [originals + strength * (styled - originals),
                    (originals + strength * (styled - originals)).flip(0)]
        assert min((clean - e).abs().max().item() for e in expected) < 1e-4, strength


def test_learning_the_change_learns_nothing_from_pictures_equal_to_their_originals(tiny_sd1,
                                                                                   tmp_path):
    """train.paired_target=change keeps the base's own error on the original in the target, so
    pairs that do not change teach the adapter nothing, where the plain target ("picture")
    teaches it the pictures themselves (what two styles trained on the same pictures share)."""
    after, before = write_pairs(tmp_path / "pairs", count=2, size=(64, 64))
    for path in after.glob("*.png"):
        (before / path.name).write_bytes(path.read_bytes())

    def update_size(target: str) -> float:
        config = tiny_config(tiny_sd1, tmp_path / target, train={
            "steps": 4, "batch_size": 2, "paired_target": target},
            data={"instance_dir": str(after), "before_dir": str(before)})
        adapter = load_adapter(train(config))
        return max(float(layer.delta().abs().max()) for layer in adapter.layers.values())

    assert update_size("picture") > 1e-4
    assert update_size("change") == 0.0


def test_a_paired_run_resumes_exactly(tiny_sd1, tmp_path):
    after, before = write_pairs(tmp_path / "pairs", count=2, size=(64, 64))
    settings = dict(data={"instance_dir": str(after), "before_dir": str(before)},
                    train={"steps": 6, "batch_size": 2}, output={"dtype": "fp32"})
    straight = train(tiny_config(tiny_sd1, tmp_path / "a", **settings))
    resumed_config = tiny_config(tiny_sd1, tmp_path / "b", **settings)
    with pytest.raises(KeyboardInterrupt):
        train(resumed_config, on_step=interrupt_at(3))
    resumed = train(resumed_config, resume="latest")
    first, second = load_adapter(straight), load_adapter(resumed)
    worst = max((first.layers[k].delta() - second.layers[k].delta()).abs().max().item()
                for k in first.layers)
    assert worst <= 1e-6


@pytest.mark.parametrize("memory_saving", [{"recompute_feed_forward": True},
                                           {"gradient_checkpointing": True}])
def test_recomputed_activations_see_the_strength_of_their_forward(tiny_sd1, tmp_path, memory_saving):
    """Backward recomputes parts of the forward: at the step's strength, or the gradients are wrong."""
    after, before = write_pairs(tmp_path / "pairs", count=2, size=(64, 64))
    adapters = []
    for name, options in (("plain", {"recompute_feed_forward": False}), ("saving", memory_saving)):
        config = tiny_config(tiny_sd1, tmp_path / name, lora={"targets": "transformer"},
                             data={"instance_dir": str(after), "before_dir": str(before)},
                             train={"steps": 3, "batch_size": 2, **options},
                             output={"dtype": "fp32"})
        adapters.append(load_adapter(train(config)))
    plain, saving = adapters
    worst = max((plain.layers[k].delta() - saving.layers[k].delta()).abs().max().item()
                for k in plain.layers)
    assert worst <= 1e-6


def test_validation_grids_of_a_paired_run_add_a_row_at_half_strength(tiny_sd1, tmp_path):
    after, before = write_pairs(tmp_path / "pairs", count=2, size=(64, 64))
    settings = dict(train={"steps": 2, "learning_rate": 0.05},
                    validation={"prompts": ["a red circle"], "every": 2, "steps": 2})
    plain = tiny_config(tiny_sd1, tmp_path / "plain", data={"instance_dir": str(after)}, **settings)
    paired = tiny_config(tiny_sd1, tmp_path / "paired", **settings,
                         data={"instance_dir": str(after), "before_dir": str(before)})
    grids = []
    for config in (plain, paired):
        train(config)
        grids.append(np.asarray(Image.open(Path(config.output.dir) / "validation" / "step-000002.png")))
    # rows: base, half, full against base, full; each 64 pixels high
    assert grids[1].shape[0] - grids[0].shape[0] == 64
