"""The Generate tab's engine: each request gets its own mix, even when requests overlap."""

from __future__ import annotations

import shlex
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from factories import random_adapter
from PIL import Image

from sdlora.adapters.write import save_adapter
from sdlora.base.models import load_base
from sdlora.cli import main
from sdlora.errors import SdloraError
from sdlora.render.png import read_png_texts
from sdlora.ui.folders import Folders
from sdlora.ui.studio import GenerationRequest, Studio, render_command


@pytest.fixture(scope="module")
def pipeline(tiny_sd1):
    """The tiny base, to shape adapters for it."""
    return load_base(str(tiny_sd1)).pipeline


@pytest.fixture(scope="module")
def folders(tiny_sd1, pipeline, tmp_path_factory):
    adapters = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(("oil", "ink"), start=1):
        save_adapter(random_adapter(pipeline, name, seed=seed), adapters / f"{name}.safetensors")
    return Folders(adapters=adapters, configs=Path("configs"), default_base=str(tiny_sd1),
                   outputs=tmp_path_factory.mktemp("outputs"))


@pytest.fixture(scope="module")
def studio(folders):
    return Studio(folders)


def request(**changes) -> GenerationRequest:
    settings = {"prompt": "a red circle", "steps": 3, "width": 64, "height": 64, "seed": 5}
    return GenerationRequest(**{**settings, **changes})


def pixels(studio: Studio, generation: GenerationRequest) -> np.ndarray:
    (image,) = studio.generate(generation)
    with Image.open(image.path) as png:
        return np.asarray(png.convert("RGB"))


MIXES = {
    "oil": request(weights={"oil": 1.0}),
    "ink minus oil": request(weights={"oil": -0.5, "ink": 1.5}),
    "oil without up blocks": request(weights={"oil": 1.0}, block_weights={"oil": {"up": 0.0}}),
}


def test_overlapping_requests_each_get_exactly_their_solo_image(studio):
    solo = {name: pixels(studio, mix) for name, mix in MIXES.items()}
    assert len({image.tobytes() for image in solo.values()}) == len(MIXES)

    # Every UNet call must run on the calling request's weights: a hook checks it per step.
    expected = threading.local()
    wrong_weights = []

    def check_weights(module, args):
        weights = {name: w for name, w in studio._session.mixer.weights.items() if w}
        if weights != expected.weights:
            wrong_weights.append((expected.weights, weights))

    hook = studio._session.base.pipeline.unet.register_forward_pre_hook(check_weights)
    order = list(MIXES)
    start_together = threading.Barrier(len(order))

    def generate(name):
        expected.weights = {n: w for n, w in MIXES[name].weights.items() if w}
        start_together.wait()
        return pixels(studio, MIXES[name])

    try:
        with ThreadPoolExecutor(len(order)) as pool:
            results = list(pool.map(generate, order))
    finally:
        hook.remove()
    assert wrong_weights == []
    for name, image in zip(order, results):
        assert np.array_equal(image, solo[name]), name


def test_weight_zero_is_the_base_and_a_new_weight_needs_no_reload(studio):
    base = pixels(studio, request())
    loaded = studio._session
    assert np.array_equal(pixels(studio, request(weights={"oil": 0.0})), base)
    assert not np.array_equal(pixels(studio, request(weights={"oil": 1.0})), base)
    assert studio._session is loaded  # same pipeline, re-weighted in place


def test_render_command_renders_the_same_image(studio, folders, tmp_path):
    generation = request(
        weights={"oil": 0.75, "ink": -0.25},
        negative="blurry",
        cfg=5.0,
        scheduler="dpm++_2m_karras",
        seed=11,
    )
    (image,) = studio.generate(generation)
    words = shlex.split(render_command(generation, folders))
    assert words[:2] == ["sdlora", "render"]
    words[words.index("--out") + 1] = str(tmp_path)
    assert main(words[1:]) == 0
    (rendered,) = tmp_path.glob("*.png")
    with Image.open(rendered) as cli_png, Image.open(image.path) as ui_png:
        assert np.array_equal(np.asarray(cli_png), np.asarray(ui_png))
    assert read_png_texts(rendered)["parameters"] == read_png_texts(image.path)["parameters"]
    assert "<lora:oil:0.75> <lora:ink:-0.25>" in image.caption


def test_render_command_spells_out_the_bases_own_size(studio):
    studio.generate(request(width=None, height=None))
    command = studio.render_command(request(width=None, height=None))
    assert "--width 64 --height 64" in command  # the tiny base's size, not sd1's 512


@pytest.mark.parametrize(
    "generation",
    [
        request(weights={"oil": 1.0}, block_weights={"oil": {"mid": 0.5, "up.1": 0.0}}),
        request(weights={"oil": 0.8}, component_weights={"oil": {"text_encoder": 0.0}}),
        request(weights={"oil": 0.5}, prompt="a red circle <lora:ink:0.7>", clip_skip=2),
        request(weights={"oil": 1.0}, prompt="a red circle <lora:ink:1@0.5-1>",
                mix_mode="orthogonal"),
    ],
    ids=["blocks", "components", "tag", "schedule-and-mode"],
)
def test_render_command_and_png_reproduce_every_weight(studio, folders, tmp_path, generation):
    """The UI's picture, its "render command" and its own PNG settings give the same pixels."""
    (image,) = studio.generate(generation)
    words = shlex.split(render_command(generation, folders))
    words[words.index("--out") + 1] = str(tmp_path / "command")
    assert main(words[1:]) == 0
    (rendered,) = (tmp_path / "command").glob("*.png")
    assert main(["render", "--base", generation_base(folders), "--prompts", str(image.path),
                 "--adapters-dir", str(folders.adapters), "--out", str(tmp_path / "png")]) == 0
    (from_png,) = (tmp_path / "png").glob("*.png")
    with Image.open(image.path) as ui_png:
        expected = np.asarray(ui_png)
    for path in (rendered, from_png):
        with Image.open(path) as png:
            assert np.array_equal(np.asarray(png), expected), path
    for name in generation.weights:
        assert f"<lora:{name}:" in image.caption
    if "@" in generation.prompt:  # the schedule and the mode reach the picture and its PNG
        assert image.settings["lora_schedules"] == {"ink": "@0.5-1"}
        assert image.settings["mix_mode"] == "orthogonal"
        unscheduled = pixels(studio, request(weights=generation.weights,
                                             prompt="a red circle <lora:ink:1>"))
        assert not np.array_equal(unscheduled, expected)
    parts = generation.block_weights or generation.component_weights
    if parts:
        assert "--block-weights" in words
        base_image = pixels(studio, request(weights=generation.weights))
        assert not np.array_equal(base_image, expected)  # the parts changed the picture


def generation_base(folders) -> str:
    return folders.default_base


def test_batch_count_uses_consecutive_seeds_like_render(studio):
    images = studio.generate(request(batch=2, seed=40))
    assert [image.settings["seed"] for image in images] == [40, 41]
    assert "Seed: 41" in images[1].caption


def test_a_retrained_adapter_file_is_loaded_again(studio, folders, pipeline):
    path = folders.adapters / "retrained.safetensors"
    save_adapter(random_adapter(pipeline, "retrained", seed=3), path)
    first = pixels(studio, request(weights={"retrained": 1.0}))
    save_adapter(random_adapter(pipeline, "retrained", seed=4), path)
    second = pixels(studio, request(weights={"retrained": 1.0}))
    assert not np.array_equal(first, second)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"weights": {"../oil": 1.0}}, "no adapter named"),
        ({"weights": {"missing": 1.0}}, "no adapter named 'missing'"),
        ({"steps": 0}, "steps must be"),
        ({"batch": 100}, "batch count"),
        ({"width": 60}, "not a positive multiple of 8"),
        ({"width": 4096}, "limited to"),
        ({"scheduler": "nope"}, "unknown scheduler"),
        ({"base": "../somewhere"}, "not offered here"),
        ({"base": "someone/any-repo"}, "not offered here"),
    ],
)
def test_bad_requests_are_refused_before_generating(studio, changes, message):
    with pytest.raises(SdloraError, match=message):
        studio.generate(request(**changes))


def test_images_are_numbered_a1111_style_and_the_count_goes_on_after_a_restart(folders):
    first = Studio(folders).generate(request(seed=3, batch=2))
    restarted = Studio(folders).generate(request(seed=9))
    numbers = [int(image.path.name.split("-")[0]) for image in [*first, *restarted]]
    assert numbers == [numbers[0], numbers[0] + 1, numbers[0] + 2]
    assert [image.path.name.split("-", 1)[1] for image in first] == ["3.png", "4.png"]
    assert first[0].path.parent.parent == folders.outputs  # a date folder in the outputs
    assert restarted[0].path in Studio(folders).history(None).recent(10)


def test_each_user_writes_and_sees_only_their_own_images(folders, pipeline):
    studio = Studio(folders)
    (ann,) = studio.generate(request(seed=1), user="ann")
    (bob,) = studio.generate(request(seed=2), user="bob")
    assert ann.path.is_relative_to(folders.outputs / "ann")
    assert studio.history("ann").recent(100) == [ann.path]
    assert bob.path not in studio.history(None).recent(100)
    own = folders.adapters / "bob" / "bobs.safetensors"
    save_adapter(random_adapter(pipeline, "bobs", seed=9), own)
    assert "bobs" in [info.name for info in folders.list_adapters("bob")]
    assert "bobs" not in [info.name for info in folders.list_adapters("ann")]
    with pytest.raises(SdloraError, match="no adapter named 'bobs'"):
        studio.generate(request(weights={"bobs": 1.0}), user="ann")


def test_img2img_and_inpainting_from_saved_inputs_match_the_cli(studio, tmp_path):
    history = studio.history(None)
    init = history.save_input(Image.new("RGB", (64, 64), (200, 30, 30)))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask_path = history.save_input(mask)
    generation = request(init_image=str(init), mask=str(mask_path), strength=0.6)
    (image,) = studio.generate(generation)
    assert "Denoising strength: 0.6" in image.caption
    words = shlex.split(studio.render_command(generation))
    assert words[words.index("--init-image") + 1] == str(init)
    words[words.index("--out") + 1] = str(tmp_path)
    assert main(words[1:]) == 0
    (rendered,) = tmp_path.glob("*.png")
    with Image.open(rendered) as cli_png, Image.open(image.path) as ui_png:
        assert np.array_equal(np.asarray(cli_png), np.asarray(ui_png))


def test_an_init_image_outside_the_users_folder_is_refused(studio, tmp_path):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (64, 64)).save(outside)
    with pytest.raises(SdloraError, match="not in your outputs folder"):
        studio.generate(request(init_image=str(outside), strength=0.5))
