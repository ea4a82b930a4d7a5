"""Class images for prior preservation: generated once, resumable, identical when redone."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.base.models import load_base
from sdlora.train.class_images import ensure_class_images

SMALL = dict(resolution=64, num_inference_steps=2, show_progress=False)


@pytest.fixture(scope="module")
def sd1_pipeline(tiny_sd1):
    return load_base(str(tiny_sd1)).pipeline


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generates_missing_images_and_redoes_a_lost_one_identically(sd1_pipeline, tmp_path):
    folder = tmp_path / "class"
    paths = ensure_class_images(sd1_pipeline, folder, "a photo of a dog", 3, batch_size=2, **SMALL)
    assert [p.name for p in paths] == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert sorted(p.name for p in folder.iterdir()) == [p.name for p in paths]  # no temp files
    before = {p.name: pixels(p) for p in paths}
    assert Image.open(paths[0]).size == (64, 64)
    assert not np.array_equal(before["class_00000.png"], before["class_00001.png"])
    stamps = {p.name: p.stat().st_mtime_ns for p in paths}

    paths[1].unlink()
    (folder / ".class_00001.png.x1y2z3.tmp").write_bytes(b"left by a killed run")
    again = ensure_class_images(sd1_pipeline, folder, "a photo of a dog", 3, batch_size=2, **SMALL)
    assert again == paths
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)
    for name in ("class_00000.png", "class_00002.png"):
        assert (folder / name).stat().st_mtime_ns == stamps[name]  # untouched
    assert np.array_equal(pixels(folder / "class_00001.png"), before["class_00001.png"])


class BatchSensitivePipeline:
    """Stands in for GPU/CPU kernels whose results depend slightly on the batch size: each
    image's colour comes from its generator's first draw and the size of its batch."""

    def __init__(self):
        self.batches = []

    def set_progress_bar_config(self, **config):
        self._progress_bar_config = config

    def __call__(self, prompt, generator, height, width, **settings):
        self.batches.append(len(prompt))
        images = []
        for noise in generator:
            value = int(torch.rand((), generator=noise) * 200) + len(prompt)
            images.append(Image.new("RGB", (width, height), (value, value, value)))
        return types.SimpleNamespace(images=images)


def test_a_lost_image_is_redone_in_its_original_batch(tmp_path):
    pipeline = BatchSensitivePipeline()
    paths = ensure_class_images(pipeline, tmp_path, "a dog", 5, batch_size=3, **SMALL)
    assert pipeline.batches == [3, 2]
    before = [pixels(path) for path in paths]
    paths[4].unlink()
    paths[1].unlink()
    ensure_class_images(pipeline, tmp_path, "a dog", 5, batch_size=3, **SMALL)
    assert pipeline.batches == [3, 2, 3, 2]  # each hole's whole batch, once
    assert all(np.array_equal(pixels(path), image) for path, image in zip(paths, before, strict=True))


def test_own_images_count_and_enough_means_nothing_is_generated(sd1_pipeline, tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    for name in ("dog-a.jpg", "dog-b.png"):
        Image.new("RGB", (64, 64), (90, 60, 30)).save(folder / name)
    paths = ensure_class_images(sd1_pipeline, folder, "a dog", 3, batch_size=4, **SMALL)
    assert [p.name for p in paths] == ["class_00000.png", "dog-a.jpg", "dog-b.png"]
    assert ensure_class_images(None, folder, "a dog", 2, **SMALL) == paths[:2]  # no pipeline needed


def test_sdxl_pipeline_generates_class_images(tiny_sdxl, tmp_path):
    pipeline = load_base(str(tiny_sdxl)).pipeline
    paths = ensure_class_images(pipeline, tmp_path / "class", "a dog", 2, batch_size=2, **SMALL)
    assert len(paths) == 2 and Image.open(paths[1]).size == (64, 64)
