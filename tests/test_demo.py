"""`sdlora demo` end to end, and the quality of its two style adapters.

An adapter at weight 1 moves its style statistic (saturation for sepia, stripe energy for
stripes) at least half of the way from the base's images to its training images, about half
as far at 0.5, not at all at 0, while `measure` still reads the prompt's shape and colours.
"""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora import demo, demo_base
from sdlora.cli import main

pytestmark = pytest.mark.slow

STATISTICS = {"sepia": demo_base.saturation, "stripes": demo_base.stripe_energy}
SEEDS = range(12)
COMBOS = [demo_base.training_combinations()[seed * 4 % 52] for seed in SEEDS]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def mixed(finished):
    adapters = {style: finished / style / f"{style}.safetensors" for style in demo.STYLES}
    pipeline, mixer = demo.demo_pipeline(adapters)
    return pipeline, mixer, demo.render(pipeline, mixer, {}, COMBOS, SEEDS)


def mean(statistic, images) -> float:
    return float(np.mean([statistic(image) for image in images]))


def test_demo_writes_two_adapters_and_one_grid(finished, capsys):
    for style in demo.STYLES:
        assert (finished / style / f"{style}.safetensors").is_file()
    grid = Image.open(finished / "demo-grid.png")
    assert grid.width > 4 * 128 and grid.height > 6 * 128


@pytest.mark.parametrize("style", demo.STYLES)
def test_style_moves_its_statistic_with_the_weight_and_keeps_the_content(mixed, style):
    pipeline, mixer, base_images = mixed
    statistic = STATISTICS[style]
    training = [Image.open(path) for path in sorted((demo.SAMPLES_DIR / style).glob("*.png"))]
    base = mean(statistic, base_images)
    distance = mean(statistic, training) - base
    full = demo.render(pipeline, mixer, {style: 1.0}, COMBOS, SEEDS)
    half = demo.render(pipeline, mixer, {style: 0.5}, COMBOS, SEEDS)
    off = demo.render(pipeline, mixer, {style: 0.0}, COMBOS, SEEDS)
    moved_full = (mean(statistic, full) - base) / distance
    moved_half = (mean(statistic, half) - base) / distance
    assert moved_full >= 0.5, f"{style} at 1 moved {moved_full:.2f} of the way"
    assert 0.2 * moved_full <= moved_half <= 0.8 * moved_full, (moved_half, moved_full)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(off, base_images))
    right_base = sum(demo_base.measure(i).matches(*c) for i, c in zip(base_images, COMBOS))
    right_full = sum(demo_base.measure(i).matches(*c) for i, c in zip(full, COMBOS))
    assert right_full >= min(right_base, 0.8 * len(COMBOS)) - 1, (right_full, right_base)


def test_training_images_differ_from_plain_ones_only_in_style():
    for style in demo.STYLES:
        for path in sorted((demo.SAMPLES_DIR / style).glob("*.png")):
            words = Path(path).with_suffix(".txt").read_text().split()
            assert demo_base.measure(Image.open(path)).matches(words[1], words[2], words[5])
