"""The mixer on in-memory adapters: fused weights, incremental re-weighting, exact restore."""

from __future__ import annotations

import copy
import gc
import random
import threading
import time
import weakref

import pytest
import torch
from factories import random_adapter

from sdlora.adapters.core import Adapter, LohaLayer, LokrLayer
from sdlora.base.tiny import build_tiny_pipeline
from sdlora.errors import SdloraError
from sdlora.mix.mixer import Mixer

COMPONENT_NAMES = ("unet", "text_encoder", "text_encoder_2")


def snapshot(pipeline) -> dict[str, torch.Tensor]:
    """Every parameter of the mixable components, keyed "component.name"."""
    return {
        f"{component}.{name}": tensor.detach().clone()
        for component in COMPONENT_NAMES
        if getattr(pipeline, component, None) is not None
        for name, tensor in getattr(pipeline, component).state_dict().items()
    }


def block_factor(module_name: str, blocks: dict[str, float]) -> float:
    parts = module_name.split(".")
    if parts[0] == "mid_block":
        return blocks.get("mid", 1.0)
    if parts[0] in ("down_blocks", "up_blocks"):
        kind = parts[0][: -len("_blocks")]
        return blocks.get(f"{kind}.{parts[1]}", blocks.get(kind, 1.0))
    return 1.0


def expected_fuse(base: dict, adapters: list[Adapter], settings: dict) -> dict[str, torch.Tensor]:
    """base + sum of coefficient * dense delta, written independently of the mixer."""
    expected = {key: value.clone() for key, value in base.items()}
    for adapter in adapters:
        weight, components, blocks = settings[adapter.name]
        for path, layer in adapter.layers.items():
            component, module_name = path.split(".", 1)
            coefficient = weight * components.get(component, 1.0)
            if component == "unet":
                coefficient *= block_factor(module_name, blocks)
            key = f"{path}.weight"
            expected[key] = expected[key] + coefficient * layer.delta(torch.float32).reshape(
                expected[key].shape
            )
    return expected


def assert_close(actual: dict, expected: dict, rtol: float = 1e-5) -> None:
    for key, value in expected.items():
        error = (actual[key].float() - value.float()).norm() / max(value.float().norm(), 1e-12)
        assert error <= rtol, f"{key}: relative error {error:.2e}"


@pytest.fixture(scope="module")
def pristine_sd1():
    return build_tiny_pipeline("sd1")


@pytest.fixture()
def sd1(pristine_sd1):
    """A fresh tiny SD1 pipeline per test (a copy: building one takes seconds)."""
    return copy.deepcopy(pristine_sd1)


def test_fused_weights_equal_base_plus_weighted_deltas(sd1):
    base = snapshot(sd1)
    first = random_adapter(sd1, "first", convs=True, seed=1)
    second = random_adapter(sd1, "second", rank=2, seed=2)
    mixer = Mixer(sd1)
    mixer.add(first, 0.7)
    mixer.add(second, -0.4)
    settings = {"first": (0.7, {}, {}), "second": (-0.4, {}, {})}
    assert_close(snapshot(sd1), expected_fuse(base, [first, second], settings))
    assert mixer.weights == {"first": 0.7, "second": -0.4}


def test_random_changes_match_a_fresh_fuse_and_zero_restores_base_exactly(sd1):
    base = snapshot(sd1)
    adapters = [
        random_adapter(sd1, f"a{i}", rank=2 + i, convs=i % 2 == 0, seed=i) for i in range(3)
    ]
    mixer = Mixer(sd1)
    for adapter in adapters:
        mixer.add(adapter)
    settings = {adapter.name: [0.0, {}, {}] for adapter in adapters}
    rng = random.Random(0)
    for step in range(30):
        name = rng.choice(adapters).name
        kind = step % 3
        if kind == 0:
            settings[name][0] = rng.uniform(-1.5, 1.5)
            mixer.set_weights({name: settings[name][0]})
        elif kind == 1:
            settings[name][1] = {"unet": rng.uniform(-1, 1), "text_encoder": rng.uniform(0, 2)}
            mixer.set_component_weights(name, settings[name][1])
        else:
            settings[name][2] = {"down": rng.uniform(0, 1), "up.1": rng.uniform(-1, 1), "mid": 0.0}
            mixer.set_block_weights(name, settings[name][2])
    assert_close(
        snapshot(sd1), expected_fuse(base, adapters, {k: tuple(v) for k, v in settings.items()})
    )

    mixer.set_weights({adapter.name: 0.0 for adapter in adapters})
    after = snapshot(sd1)
    for key, value in base.items():
        assert torch.equal(after[key], value), key


def test_long_slider_sessions_stay_exact_and_reproducible_mode_ignores_history(sd1, pristine_sd1):
    base = snapshot(sd1)
    first, second = random_adapter(sd1, "first", seed=12), random_adapter(sd1, "second", seed=13)
    mixer = Mixer(sd1)
    mixer.add(first, 0.3)
    mixer.add(second)
    for step in range(70):  # past the periodic refresh from the base copy
        mixer.set_weights({"second": (step % 7) / 7 - 0.5})
    mixer.set_weights({"first": 0.0, "second": 0.0})
    assert all(torch.equal(snapshot(sd1)[key], value) for key, value in base.items())

    def fused_after(history):
        pipeline = copy.deepcopy(pristine_sd1)
        mixer = Mixer(pipeline, reproducible=True)
        mixer.add(first)
        mixer.add(second)
        for weights in history:
            mixer.set_weights(weights)
        return snapshot(pipeline)

    direct = fused_after([{"first": 0.4}])
    roundabout = fused_after([{"second": 0.7}, {"first": -1.0}, {"first": 0.4, "second": 0.0}])
    assert all(torch.equal(direct[key], roundabout[key]) for key in direct)


def test_half_precision_weights_are_recomputed_without_drift(sd1):
    pipeline = sd1.to(torch.bfloat16)
    base = snapshot(pipeline)
    adapter = random_adapter(pipeline, "half", seed=3)
    mixer = Mixer(pipeline)
    mixer.add(adapter)
    for weight in [0.3, -0.8, 1.1, 0.25, 0.5]:
        mixer.set_weights({"half": weight})
    fused = snapshot(pipeline)
    base32 = {key: value.float() for key, value in base.items()}
    expected = expected_fuse(base32, [adapter], {"half": (0.5, {}, {})})
    for path in adapter.layers:
        key = f"{path}.weight"
        assert torch.equal(fused[key], expected[key].to(torch.bfloat16)), key
    mixer.set_weights({"half": 0.0})
    assert all(torch.equal(snapshot(pipeline)[key], value) for key, value in base.items())


def test_zero_weight_adapters_cost_nothing_and_remove_frees(sd1):
    base = snapshot(sd1)
    mixer = Mixer(sd1)
    kept = random_adapter(sd1, "kept", text_encoder=False, seed=4)
    mixer.add(kept, 0.0)
    assert all(state.base is None for state in mixer._modules.values())

    gone = random_adapter(sd1, "gone", convs=True, seed=5)
    reference = weakref.ref(gone)
    mixer.add(gone, 1.0)
    mixer.set_weights({"kept": 0.5})
    del gone
    mixer.remove("gone")
    gc.collect()
    assert reference() is None
    assert set(mixer._modules) == set(kept.layers)
    assert_close(snapshot(sd1), expected_fuse(base, [kept], {"kept": (0.5, {}, {})}))
    assert [entry.name for entry in mixer.adapters] == ["kept"]


def test_lycoris_layers_fuse_their_delta(sd1):
    base = snapshot(sd1)
    generator = torch.Generator().manual_seed(6)
    to_q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    conv = "unet.down_blocks.0.resnets.0.conv1"
    layers = {
        to_q: LohaLayer(
            *(
                torch.randn(shape, generator=generator)
                for shape in [(32, 2), (2, 32), (32, 2), (2, 32)]
            ),
            alpha=1.0,
            weight_shape=(32, 32),
        ),
        conv: LokrLayer(
            w1=torch.randn(4, 4, generator=generator),
            w2=torch.randn(8, 8, 3, 3, generator=generator),
            scale=0.1,
            weight_shape=(32, 32, 3, 3),
        ),
    }
    adapter = Adapter(name="lyco", layers=layers, family="sd1")
    mixer = Mixer(sd1)
    mixer.add(adapter, 0.6)
    assert_close(snapshot(sd1), expected_fuse(base, [adapter], {"lyco": (0.6, {}, {})}))
    merged, error = mixer.merged_adapter()  # LyCORIS deltas factored by SVD at numerical rank
    for path, layer in layers.items():
        expected = 0.6 * layer.delta()
        assert (merged.layers[path].delta() - expected).norm() / expected.norm() < 1e-5
    assert error < 1e-6


def test_validation_names_families_and_counts_unmatched(sd1):
    mixer = Mixer(sd1)
    with pytest.raises(SdloraError, match="sdxl.*sd1"):
        mixer.add(random_adapter(sd1, "xl", family="sdxl"))
    adapter = random_adapter(sd1, "partial", seed=7)
    adapter.layers["unet.no_such_block.to_q"] = next(iter(adapter.layers.values()))
    report = mixer.add(adapter, 1.0)
    assert report.unmatched == ["unet.no_such_block.to_q"]
    with pytest.raises(SdloraError, match="already loaded"):
        mixer.add(adapter)
    with pytest.raises(SdloraError, match="no adapter named 'missing'"):
        mixer.set_weights({"missing": 1.0})
    with pytest.raises(SdloraError, match="unknown block"):
        mixer.set_block_weights("partial", {"middle": 1.0})


def test_merged_adapter_exact_and_reduced(sd1):
    mixer = Mixer(sd1)
    first = random_adapter(sd1, "first", rank=4, convs=True, seed=8)
    second = random_adapter(sd1, "second", rank=3, seed=9)
    mixer.add(first, 0.8)
    mixer.add(second, -0.5)
    mixer.set_block_weights("first", {"up": 0.5})
    fused = snapshot(sd1)
    mixer.set_weights({"first": 0.0, "second": 0.0})
    base = snapshot(sd1)
    mixer.set_weights({"first": 0.8, "second": -0.5})

    merged, error = mixer.merged_adapter()
    assert error == 0.0
    for path, layer in merged.layers.items():
        key = f"{path}.weight"
        delta = layer.delta().reshape(base[key].shape)
        assert torch.allclose(base[key] + delta, fused[key], atol=1e-5), path

    reduced, error = mixer.merged_adapter(rank=4)
    assert all(layer.rank <= 4 for layer in reduced.layers.values())
    dropped = total = 0.0
    for path, layer in reduced.layers.items():
        exact = merged.layers[path].delta().flatten(1)
        dropped += (exact - layer.delta().flatten(1)).pow(2).sum().item()
        total += exact.pow(2).sum().item()
    assert 0 < error < 1
    assert error == pytest.approx((dropped / total) ** 0.5, rel=1e-3)


def test_using_holds_the_lock_while_the_caller_generates(sd1):
    mixer = Mixer(sd1)
    mixer.add(random_adapter(sd1, "style", seed=10))
    seen = []

    def other_request():
        with mixer.using({"style": -1.0}):
            seen.append(mixer.weights["style"])

    with mixer.using({"style": 0.5}):
        thread = threading.Thread(target=other_request)
        thread.start()
        time.sleep(0.05)
        seen.append(mixer.weights["style"])
    thread.join()
    assert seen == [0.5, -1.0]


def test_image_changes_only_when_the_weight_moves(sd1):
    def render():
        generator = torch.Generator().manual_seed(0)
        return sd1(
            "a red house",
            num_inference_steps=2,
            height=64,
            width=64,
            generator=generator,
            output_type="pt",
        ).images

    plain = render()
    mixer = Mixer(sd1)
    mixer.add(random_adapter(sd1, "style", seed=11, convs=True))
    assert torch.equal(render(), plain)
    mixer.set_weights({"style": 1.0})
    assert not torch.allclose(render(), plain, atol=1e-3)
    mixer.set_weights({"style": 0.0})
    assert torch.equal(render(), plain)
