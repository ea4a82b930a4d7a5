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
from torch.overrides import TorchFunctionMode

from sdlora.adapters.core import Adapter, LohaLayer, LokrLayer
from sdlora.errors import SdloraError
from sdlora.mix import fuse
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


def test_long_slider_sessions_return_to_base_exactly(sd1):
    base = snapshot(sd1)
    first, second = random_adapter(sd1, "first", seed=12), random_adapter(sd1, "second", seed=13)
    mixer = Mixer(sd1)
    mixer.add(first, 0.3)
    mixer.add(second)
    for step in range(70):
        mixer.set_weights({"second": (step % 7) / 7 - 0.5})
    mixer.set_weights({"first": 0.0, "second": 0.0})
    assert all(torch.equal(snapshot(sd1)[key], value) for key, value in base.items())


def mixed_adapters(pipeline) -> list[Adapter]:
    """LoRA adapters of several ranks (one with convs) and one LoKr adapter."""
    loras = [
        random_adapter(pipeline, f"lora{i}", rank=2 + i, convs=i == 0, seed=20 + i)
        for i in range(3)
    ]
    to_k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    kron = LokrLayer(
        w1=torch.randn(4, 4, generator=torch.Generator().manual_seed(24)),
        w2=torch.randn(8, 8, generator=torch.Generator().manual_seed(25)),
        scale=0.05,
        weight_shape=(32, 32),
    )
    return [*loras, Adapter(name="lokr", layers={to_k: kron}, family="sd1")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_after_any_history_equal_a_fresh_mixers_bit_for_bit(
    pristine_sd1, dtype, monkeypatch
):
    """The image is a pure function of the mix: random weight, component and block changes
    (adapters removed and added back too) leave exactly the bits a fresh Mixer fuses."""
    monkeypatch.setattr(fuse, "TILE_ELEMENTS", 64)  # several row tiles even in the tiny model
    pipeline = copy.deepcopy(pristine_sd1).to(dtype)
    base = snapshot(pipeline)
    adapters = {adapter.name: adapter for adapter in mixed_adapters(pipeline)}
    mixer = Mixer(pipeline)
    for adapter in adapters.values():
        mixer.add(adapter)
    rng = random.Random(1)
    fresh_comparisons = 0
    for step in range(60):
        name = rng.choice(list(adapters))
        kind = rng.randrange(5)
        if kind < 2:
            mixer.set_weights({name: rng.choice([0.0, rng.uniform(-1.5, 1.5)])})
        elif kind == 2:
            mixer.set_component_weights(
                name, {"unet": rng.uniform(-1, 1), "text_encoder": rng.choice([0.0, 1.3])}
            )
        elif kind == 3:
            mixer.set_block_weights(name, {"down": rng.uniform(0, 1), "up.1": rng.uniform(-1, 1)})
        else:
            mixer.remove(name)
            mixer.add(adapters[name], rng.uniform(-1, 1))
        if step % 15 == 14:
            expected = fresh_mix(pristine_sd1, dtype, adapters, mixer.adapters)
            fused = snapshot(pipeline)
            assert all(torch.equal(fused[key], value) for key, value in expected.items())
            fresh_comparisons += 1
    assert fresh_comparisons == 4
    settings = {
        entry.name: (entry.weight, entry.component_weights, entry.block_weights)
        for entry in mixer.adapters
    }
    if dtype == torch.float32:  # and the tiled fuse is the right sum
        assert_close(snapshot(pipeline), expected_fuse(base, list(adapters.values()), settings))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_bits_do_not_depend_on_the_thread_count(pristine_sd1, dtype, monkeypatch):
    """Modules are shared out over torch's threads, each fused by one thread: the same mix gives
    the same bits on 1 and 3 threads, and torch's thread count is restored afterwards."""
    monkeypatch.setattr(fuse, "TILE_ELEMENTS", 64)
    threads_before = torch.get_num_threads()
    fused = []
    for threads in (1, 3):
        pipeline = copy.deepcopy(pristine_sd1).to(dtype)
        mixer = Mixer(pipeline)
        for weight, adapter in zip((0.7, -0.4, 1.2), mixed_adapters(pipeline)):
            mixer.add(adapter, weight)
        torch.set_num_threads(threads)
        try:
            mixer.set_weights({"lora1": 0.3})
            mixer.set_block_weights("lora2", {"up": 0.5})
            assert torch.get_num_threads() == threads
        finally:
            torch.set_num_threads(threads_before)
        fused.append(snapshot(pipeline))
    assert all(torch.equal(fused[0][key], fused[1][key]) for key in fused[0])


def test_channels_last_conv_weights_fuse_as_contiguous_ones(pristine_sd1):
    """Conv weights in channels_last (a common speed setting) are fused whole and copied back in
    their own layout: the same values as contiguous weights, and zero restores the base."""
    fused = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        pipeline = copy.deepcopy(pristine_sd1)
        pipeline.unet.to(memory_format=memory_format)
        base = snapshot(pipeline)
        mixer = Mixer(pipeline)
        adapters = mixed_adapters(pipeline)
        for weight, adapter in zip((0.7, -0.4, 1.2, 0.5), adapters):
            mixer.add(adapter, weight)
        fused.append(snapshot(pipeline))
        conv = next(m.weight for m in mixer._modules.values() if m.weight.dim() == 4)
        assert conv.is_contiguous(memory_format=memory_format)
        mixer.set_weights({adapter.name: 0.0 for adapter in adapters})
        assert all(torch.equal(snapshot(pipeline)[key], value) for key, value in base.items())
    assert all(torch.equal(fused[0][key], fused[1][key]) for key in fused[0])


def test_changes_inside_and_outside_inference_mode_mix_freely(pristine_sd1):
    """A schedule re-weights inside the pipeline's inference mode, a slider outside it, and
    the fuse threads run in neither: the kept tensors must take writes from all of them."""
    threads_before = torch.get_num_threads()
    pipeline = copy.deepcopy(pristine_sd1)
    mixer = Mixer(pipeline)
    adapters = mixed_adapters(pipeline)
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            for adapter in adapters:
                mixer.add(adapter, 0.5)
            mixer.set_step_weights({"lora1": 0.2})
        mixer.set_weights({adapter.name: 0.9 for adapter in adapters})
        with torch.inference_mode():
            mixer.set_step_weights({"lora1": None})
            mixer.set_weights({"lora2": -0.3})
    finally:
        torch.set_num_threads(threads_before)
    expected = fresh_mix(pristine_sd1, torch.float32, {a.name: a for a in adapters}, mixer.adapters)
    assert all(torch.equal(snapshot(pipeline)[key], value) for key, value in expected.items())


def fresh_mix(pristine, dtype, adapters: dict[str, Adapter], mix) -> dict[str, torch.Tensor]:
    """The weights a fresh Mixer on a fresh pipeline fuses for `mix`, adapters loaded in
    reverse order."""
    pipeline = copy.deepcopy(pristine).to(dtype)
    mixer = Mixer(pipeline)
    for entry in reversed(mix):
        mixer.add(adapters[entry.name])
        mixer.set_component_weights(entry.name, entry.component_weights)
        mixer.set_block_weights(entry.name, entry.block_weights)
    mixer.set_weights({entry.name: entry.weight for entry in mix})
    return snapshot(pipeline)


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


class CrossDeviceSpy(TorchFunctionMode):
    """Records every torch call whose tensors (arguments or result) span devices: any copy
    between host and device shows up here."""

    def __init__(self):
        super().__init__()
        self.crossings: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        tensors = [t for t in (*args, *kwargs.values(), result) if isinstance(t, torch.Tensor)]
        if len({tensor.device for tensor in tensors}) > 1:
            self.crossings.append(getattr(func, "__name__", str(func)))
        return result


# "meta" stands in for a GPU on machines without one: its tensors live off the host, so a copy
# from or to the host is a call the spy sees, and the fuse runs (shapes only).
@pytest.mark.parametrize("device", ["meta"] + (["cuda"] if torch.cuda.is_available() else []))
def test_half_precision_changes_copy_nothing_between_host_and_device(sd1, device):
    for component in (sd1.unet, sd1.text_encoder):
        component.to(device, torch.float16)
    first, second = random_adapter(sd1, "first", seed=14), random_adapter(sd1, "second", seed=15)
    mixer = Mixer(sd1)
    mixer.add(first, 0.5)
    with CrossDeviceSpy() as spy:
        mixer.add(second, 0.2)
    assert spy.crossings  # the adapter's factors go to the device, once

    with CrossDeviceSpy() as spy:
        for weight in (-0.3, 0.9, 0.25):
            mixer.set_weights({"first": weight, "second": 1 - weight})
        mixer.set_block_weights("second", {"up": 0.5})
    assert spy.crossings == []
    for module in mixer._modules.values():
        assert module.base.device == module.weight.device and module.base.dtype == torch.float16


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
