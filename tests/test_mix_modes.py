"""Mix modes (sdlora.mix.modes) and weight schedules over the steps (sdlora.mix.schedules)."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
from factories import random_adapter

from sdlora.base.tiny import build_tiny_pipeline
from sdlora.errors import SdloraError
from sdlora.mix.mixer import Mixer
from sdlora.mix.schedules import WeightSchedule, format_schedule, parse_weight_text
from sdlora.render.prompts import prompt_row


@pytest.fixture()
def sd1(pristine_sd1):
    return copy.deepcopy(pristine_sd1)


def weights(pipeline) -> dict[str, torch.Tensor]:
    return {
        f"{component}.{name}": tensor.detach().clone()
        for component in ("unet", "text_encoder")
        for name, tensor in getattr(pipeline, component).state_dict().items()
    }


def twin(adapter, name):
    return dataclasses.replace(adapter, name=name)


# --- mix modes ------------------------------------------------------------------------------

def test_orthogonal_counts_what_two_adapters_share_once(sd1, pristine_sd1):
    """Two copies of one adapter at 1 + 1: `add` fuses it twice, `orthogonal` once."""
    style = random_adapter(sd1, "style", seed=1)
    alone = copy.deepcopy(pristine_sd1)
    Mixer(alone).add(style, 1.0)
    mixer = Mixer(sd1, mode="orthogonal")
    mixer.add(style, 1.0)
    mixer.add(twin(style, "copy"), 1.0)
    expected, actual = weights(alone), weights(sd1)
    for key in expected:
        assert torch.allclose(actual[key], expected[key], atol=1e-6), key
    mixer.set_mode("add")
    doubled = weights(sd1)
    changed = [key for key in expected if not torch.equal(doubled[key], expected[key])]
    assert changed  # add really does count it twice, so the test above measures the mode


def test_orthogonal_leaves_a_lone_adapter_and_unrelated_modules_as_add(sd1, pristine_sd1):
    style = random_adapter(sd1, "style", seed=1)
    ink = random_adapter(sd1, "ink", seed=2, text_encoder=False)
    added = copy.deepcopy(pristine_sd1)
    reference = Mixer(added)
    reference.add(style, 0.7)
    mixer = Mixer(sd1, mode="orthogonal")
    mixer.add(style, 0.7)
    assert all(torch.equal(a, b) for a, b in zip(weights(sd1).values(), weights(added).values()))
    reference.add(ink, 1.0)
    mixer.add(ink, 1.0)
    ours, theirs = weights(sd1), weights(added)
    # the text encoder only `style` touches: bit for bit `add`; the UNet both touch: not
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k.startswith("text_encoder"))
    assert any(not torch.equal(ours[k], theirs[k]) for k in ours if k.startswith("unet"))


def test_every_mode_is_a_pure_function_of_the_mix(sd1, pristine_sd1):
    """After any history of weights, step weights and mode changes, the weights are bit for
    bit those of a fresh Mixer given the final mix."""
    adapters = [random_adapter(sd1, name, seed=seed) for seed, name in enumerate("abc")]
    mixer = Mixer(sd1)
    for adapter in adapters:
        mixer.add(adapter)
    rng = random.Random(0)
    for _ in range(30):
        choice = rng.random()
        if choice < 0.2:
            mixer.set_mode(rng.choice(["add", "orthogonal"]))
        elif choice < 0.4:
            mixer.set_step_weights({rng.choice("abc"): rng.choice([None, rng.uniform(-1, 1)])})
        else:
            mixer.set_weights({rng.choice("abc"): rng.choice([0.0, rng.uniform(-1, 1.5)])})
    mixer.set_step_weights(dict.fromkeys("abc"))
    fresh_pipeline = copy.deepcopy(pristine_sd1)
    fresh = Mixer(fresh_pipeline, mode=mixer.mode)
    for adapter in adapters:
        fresh.add(adapter, mixer.weights[adapter.name])
    assert all(torch.equal(a, b) for a, b in
               zip(weights(sd1).values(), weights(fresh_pipeline).values()))


def test_merged_adapter_is_the_orthogonal_mix(sd1, pristine_sd1):
    style = random_adapter(sd1, "style", seed=1)
    mixer = Mixer(sd1, mode="orthogonal")
    mixer.add(style, 1.0)
    mixer.add(random_adapter(sd1, "ink", seed=2), 0.8)
    merged, error = mixer.merged_adapter()
    assert error == 0.0 and merged.metadata["sdlora.mix.mode"] == "orthogonal"
    rebuilt = copy.deepcopy(pristine_sd1)
    Mixer(rebuilt).add(merged, 1.0)
    expected, actual = weights(sd1), weights(rebuilt)
    for key in expected:
        assert torch.allclose(actual[key], expected[key], atol=1e-5), key


def test_unknown_mode_is_a_one_line_error(sd1):
    with pytest.raises(SdloraError, match="unknown mix mode 'ties'; expected one of add, orthogonal"):
        Mixer(sd1, mode="ties")
    with pytest.raises(SdloraError, match="unknown mix mode"):
        Mixer(sd1).set_mode("sum")


# --- step weights -----------------------------------------------------------------------------

def test_step_weights_move_the_unet_only(sd1, pristine_sd1):
    style = random_adapter(sd1, "style", seed=1)
    mixer = Mixer(sd1)
    mixer.add(style, 1.0)
    before = weights(sd1)
    mixer.set_step_weights({"style": 0.0})
    after = weights(sd1)
    base = weights(pristine_sd1)
    for key in after:
        if key.startswith("unet"):
            assert torch.equal(after[key], base[key]), key
        else:
            assert torch.equal(after[key], before[key]), key
    mixer.set_step_weights({"style": None})
    assert all(torch.equal(a, b) for a, b in zip(weights(sd1).values(), before.values()))


# --- schedules --------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "weight", "schedule"), [
    ("0.8", 0.8, None),
    ("1@0.5-1", 1.0, WeightSchedule(0.5, 1.0)),
    ("0.2~1", 0.2, WeightSchedule(to=1.0)),
    ("-0.5~1@0.25-0.75", -0.5, WeightSchedule(0.25, 0.75, 1.0)),
])
def test_weight_text_forms(text, weight, schedule):
    assert parse_weight_text(text, "here") == (weight, schedule)
    if schedule is not None:
        assert parse_weight_text(f"{weight:g}{format_schedule(schedule)}", "here") == (weight, schedule)


@pytest.mark.parametrize("text", ["1@0.5", "1@0.6-0.4", "1@0-1.5", "1~", "abc", "1@-0.1-1"])
def test_bad_weight_text_is_a_one_line_error(text):
    with pytest.raises(SdloraError, match="here"):
        parse_weight_text(text, "here")


def test_a_window_takes_its_steps_and_a_ramp_ends_on_its_weights():
    late = WeightSchedule(0.5, 1.0)
    assert [late.weight(1.0, i, 20) for i in range(20)] == [0.0] * 10 + [1.0] * 10
    early = WeightSchedule(0.0, 0.5)
    assert [early.weight(0.7, i, 20) for i in range(20)] == [0.7] * 10 + [0.0] * 10
    ramp = [WeightSchedule(to=1.0).weight(0.2, i, 5) for i in range(5)]
    assert ramp == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_tags_carry_schedules_into_the_row():
    row = prompt_row("a cat <lora:stripes:1@0.5-1> <lora:sepia:0.2~1> <lora:ink:0.5>")
    assert row.prompt == "a cat"
    assert row.loras == {"stripes": 1.0, "sepia": 0.2, "ink": 0.5}
    assert row.lora_schedules == {"stripes": "@0.5-1", "sepia": "~1"}
    with pytest.raises(SdloraError, match="--prompt: in '<lora:stripes:1@0.7-0.2>'"):
        prompt_row("a cat <lora:stripes:1@0.7-0.2>")


# --- through `sdlora render` --------------------------------------------------------------------

def test_render_schedules_and_modes_are_drawn_recorded_and_redrawn(tiny_sd1, tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from sdlora.adapters.write import save_adapter
    from sdlora.cli import main
    from sdlora.render.png import read_png_texts

    for seed, name in ((1, "style"), (2, "ink")):
        save_adapter(random_adapter(build_tiny_pipeline("sd1"), name, seed=seed),
                     tmp_path / f"{name}.safetensors")

    def render(out, prompt, *extra):
        source = ["--prompts", prompt] if prompt.endswith(".png") else ["--prompt", prompt]
        assert main(["render", "--base", str(tiny_sd1), "--adapters-dir", str(tmp_path),
                     "--steps", "4", "--width", "64", "--height", "64", "--out",
                     str(tmp_path / out), *source, *extra]) == 0
        path = tmp_path / out / "00000-0.png"
        return np.asarray(Image.open(path).convert("RGB")), read_png_texts(path)

    plain, _ = render("plain", "a cat <lora:style:1>")
    whole, _ = render("whole", "a cat <lora:style:1@0-1>")
    off, _ = render("off", "a cat")
    late, texts = render("late", "a cat <lora:style:1@0.5-1>")
    assert np.array_equal(plain, whole)  # a window of every step is the plain weight
    assert not np.array_equal(late, plain) and not np.array_equal(late, off)
    record = json.loads(texts["sdlora"])
    assert record["lora_schedules"] == {"style": "@0.5-1"} and record["mix_mode"] == "add"
    assert "<lora:style:1@0.5-1>" in texts["parameters"]
    redrawn, _ = render("redrawn", str(tmp_path / "late" / "00000-0.png"))
    assert np.array_equal(redrawn, late)

    added, _ = render("added", "a cat <lora:style:1> <lora:ink:1>")
    orthogonal, texts = render("orthogonal", "a cat <lora:style:1> <lora:ink:1>",
                               "--mix-mode", "orthogonal")
    assert not np.array_equal(added, orthogonal)
    assert json.loads(texts["sdlora"])["mix_mode"] == "orthogonal"
    assert "Mix mode: orthogonal" in texts["parameters"]
    redrawn, _ = render("redrawn-orthogonal", str(tmp_path / "orthogonal" / "00000-0.png"))
    assert np.array_equal(redrawn, orthogonal)
