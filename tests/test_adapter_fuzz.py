"""Fuzz the adapter reader with damaged versions of files sdlora itself writes.

Seeds: kohya and diffusers layouts of SD1 and SDXL adapters (LoRA + LoCon), and a kohya file
with LoHa and LoKr layers. Each case damages one seed (bytes cut or overwritten, the header's
length, JSON, offsets, dtypes or shapes edited, tensors deleted, retyped, reshaped or poisoned
with nan, metadata replaced by junk) and must end in one of two ways: a one-line SdloraError,
or an adapter of finite float tensors that `describe` prints and that either fits the base or is refused with an
SdloraError; a fitted layer's update has its module's shape. Any other exception, or a case
slower than CASE_SECONDS (a hang in the making), fails the test and names the case.
"""

from __future__ import annotations

import json
import random
import struct
import time
from pathlib import Path

import pytest
import torch
from factories import random_adapter
from safetensors.torch import load, save

from sdlora.adapters.command import describe
from sdlora.adapters.core import Adapter, LohaLayer, LokrLayer
from sdlora.adapters.read import match_to_base, read_adapter_file
from sdlora.adapters.write import save_adapter
from sdlora.base.tiny import build_tiny_pipeline
from sdlora.errors import SdloraError

CASES_PER_SEED = 60
CASE_SECONDS = 5.0
DTYPES = ["F16", "BF16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "F8_E4M3", "XX"]
TORCH_DTYPES = [torch.int32, torch.int8, torch.uint8, torch.bool, torch.float64, torch.bfloat16]
JUNK = ["", "{", "[]", "[1, 2]", '"text"', "NaN", "Infinity", "0", "-1", "{}", '{"a": {"b": "c"}}',
        "[" * 5000, "\x00\xff", "sdxl", "sd1", "1e400"]  # fmt: skip
METADATA_KEYS = [
    "sdlora.folded_alpha", "lora_adapter_metadata", "sdlora.family", "sdlora.trigger_words",
    "sdlora.config", "ss_tag_frequency", "ss_base_model_version", "modelspec.architecture",
    "ss_sd_model_name", "ss_training_comment",
]  # fmt: skip


@pytest.fixture(scope="module")
def pipelines():
    return {"sd1": build_tiny_pipeline("sd1"), "sdxl": build_tiny_pipeline("sdxl")}


@pytest.fixture(scope="module")
def seed_files(pipelines, tmp_path_factory) -> dict[str, tuple[bytes, str]]:
    """{seed name: (file bytes, family)} for every file sdlora writes."""
    folder = tmp_path_factory.mktemp("fuzz-seeds")
    seeds = {}
    for family, pipeline in pipelines.items():
        adapter = random_adapter(pipeline, convs=True, alpha=3.0, family=family)
        for layout in ("kohya", "diffusers"):
            path = save_adapter(adapter, folder / f"{family}-{layout}.safetensors", layout=layout)
            seeds[f"{family}-{layout}"] = (path.read_bytes(), family)
    path = save_adapter(lycoris_adapter(pipelines["sd1"]), folder / "lyco.safetensors")
    seeds["sd1-lycoris"] = (path.read_bytes(), "sd1")
    return seeds


def lycoris_adapter(pipeline) -> Adapter:
    """LoHa and LoKr layers on the tiny UNet's attention projections."""
    generator = torch.Generator().manual_seed(0)
    layers = {}
    for name, module in pipeline.unet.named_modules():
        if not isinstance(module, torch.nn.Linear) or "attn1" not in name:
            continue
        out, inp = module.out_features, module.in_features
        if name.endswith(("to_q", "to_k")):
            factors = [torch.randn(*shape, generator=generator) for shape in ((out, 2), (2, inp))]
            layers[f"unet.{name}"] = LohaLayer(
                *factors, *factors, alpha=1.0, weight_shape=(out, inp)
            )
        elif name.endswith("to_v"):
            w1, w2 = torch.randn(2, 2, generator=generator), torch.randn(out // 2, inp // 2)
            layers[f"unet.{name}"] = LokrLayer(w1, w2, scale=0.5, weight_shape=(out, inp))
    return Adapter(name="lyco", layers=layers, family="sd1")


# ---- the safetensors container: u64 header length, JSON header, data ----------------------


def split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def tensor_names(header: dict) -> list[str]:
    return sorted(key for key in header if key != "__metadata__")


# ---- mutations: each takes (rng, file bytes) and returns damaged bytes ---------------------


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def header_length(rng: random.Random, data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    value = rng.choice([0, 1, 2**63, 2**64 - 1, 2**40, length - 1, length + 1, len(data)])
    return struct.pack("<Q", value) + data[8:]


def header_bytes(rng: random.Random, data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    changed = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        changed[8 + rng.randrange(length)] = rng.choice(b'{}[]",:0123456789-eE. ax\x00\xff')
    return bytes(changed)


def body_bytes(rng: random.Random, data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    changed = bytearray(data)
    for _ in range(rng.randint(1, 64)):
        changed[8 + length + rng.randrange(len(data) - 8 - length)] = rng.randrange(256)
    return bytes(changed)


def offsets(rng: random.Random, data: bytes) -> bytes:
    header, body = split(data)
    entry = header[rng.choice(tensor_names(header))]
    begin, end = entry["data_offsets"]
    entry["data_offsets"] = rng.choice(
        [[end, begin], [begin, end + 2], [begin + 2, end], [0, len(body) + 8], [begin, 2**60]]
    )
    return join(header, body)


def header_dtype(rng: random.Random, data: bytes) -> bytes:
    header, body = split(data)
    header[rng.choice(tensor_names(header))]["dtype"] = rng.choice(DTYPES)
    return join(header, body)


def header_shape(rng: random.Random, data: bytes) -> bytes:
    header, body = split(data)
    entry = header[rng.choice(tensor_names(header))]
    shape = entry["shape"]
    entry["shape"] = rng.choice(
        [shape[::-1], shape + [1], shape[1:], [0] + shape[1:], [-1], [2**40], ["x"], []]
    )
    return join(header, body)


def metadata_junk(rng: random.Random, data: bytes) -> bytes:
    header, body = split(data)
    metadata = header.setdefault("__metadata__", {})
    metadata[rng.choice(METADATA_KEYS)] = rng.choice(JUNK + [1, None, ["a"]])
    return join(header, body)


def tensors_edit(edit):
    """A mutation that loads the tensors, applies `edit(rng, tensors, metadata)`, saves again."""

    def mutate(rng: random.Random, data: bytes) -> bytes:
        header, _ = split(data)
        tensors = load_file_bytes(data)
        metadata = header.get("__metadata__", {})
        edit(rng, tensors, metadata)
        return save_file_bytes(tensors, metadata)

    mutate.__name__ = edit.__name__
    return mutate


def delete_keys(rng, tensors, metadata):
    for key in rng.sample(sorted(tensors), k=min(len(tensors) - 1, rng.randint(1, 3))):
        del tensors[key]


def retype(rng, tensors, metadata):
    key = rng.choice(sorted(tensors))
    tensors[key] = tensors[key].to(rng.choice(TORCH_DTYPES))


def reshape(rng, tensors, metadata):
    key = rng.choice(sorted(tensors))
    tensor = tensors[key]
    options = [tensor.reshape(-1), tensor.unsqueeze(0), tensor.reshape(1, 1, 1, -1)]
    if tensor.dim() == 0:
        options += [tensor.repeat(2), torch.zeros(())]
    else:
        options += [tensor[:0], tensor[:1], tensor.repeat(2, *([1] * (tensor.dim() - 1)))]
    if tensor.dim() >= 2:
        options += [tensor.transpose(0, 1), tensor[:, :1], tensor.flatten(1)]
    tensors[key] = rng.choice(options).contiguous()


def poison(rng, tensors, metadata):
    key = rng.choice(sorted(tensors))
    tensor = tensors[key].clone()
    tensor.view(-1)[rng.randrange(tensor.numel())] = rng.choice([float("nan"), float("inf")])
    tensors[key] = tensor


def rename(rng, tensors, metadata):
    key = rng.choice(sorted(tensors))
    replacements = [("lora_down", "lora_mid"), ("lora_up", "dora_scale"), ("unet", "vae"),
                    ("lora_A", "lora_B"), ("alpha", "lora_up.weight"), ("hada_w1_a", "hada_t1"),
                    ("lokr_w1", "lokr_w1_a"), (".", "_")]  # fmt: skip
    old, new = rng.choice(replacements)
    tensors[key.replace(old, new, 1)] = tensors.pop(key)


def load_file_bytes(data: bytes) -> dict[str, torch.Tensor]:
    return dict(load(data))


def save_file_bytes(tensors: dict[str, torch.Tensor], metadata: dict) -> bytes:
    return save(tensors, metadata=metadata or None)


MUTATIONS = [truncate, header_length, header_bytes, body_bytes, offsets, header_dtype,
             header_shape, metadata_junk] + [tensors_edit(edit) for edit in
             (delete_keys, retype, reshape, poison, rename)]  # fmt: skip


def check_case(path: Path, pipeline, family: str) -> str:
    """'refused' or 'loaded'; raises (failing the test) on anything but a clean outcome."""
    try:
        source = read_adapter_file(path)
    except SdloraError as error:
        assert "\n" not in str(error), str(error)
        return "refused"
    for layer in source.adapter.layers.values():  # what renders black must never load
        for tensor in vars(layer).values():
            if isinstance(tensor, torch.Tensor):
                assert tensor.is_floating_point() and torch.isfinite(tensor.float()).all()
    describe(source.adapter, source.layout, path.stat().st_size)
    try:
        report = match_to_base(source.adapter, pipeline, family)
    except SdloraError as error:
        assert "\n" not in str(error), str(error)
        return "loaded"
    for layer_path in report.matched:
        component, name = layer_path.split(".", 1)
        weight = getattr(pipeline, component).get_submodule(name).weight
        assert tuple(source.adapter.layers[layer_path].delta().shape) == tuple(weight.shape)
    return "loaded"


def test_damaged_files_are_refused_cleanly_or_load_correctly(seed_files, pipelines, tmp_path):
    rng = random.Random(1234)
    outcomes = {"refused": 0, "loaded": 0}
    for seed_name, (data, family) in seed_files.items():
        for index in range(CASES_PER_SEED):
            mutation = MUTATIONS[index % len(MUTATIONS)]
            case = f"{seed_name}/{mutation.__name__}/{index}"
            path = tmp_path / f"case-{index}.safetensors"
            started = time.monotonic()
            try:
                path.write_bytes(mutation(rng, data))
                outcomes[check_case(path, pipelines[family], family)] += 1
            except Exception as error:
                raise AssertionError(f"case {case}: {type(error).__name__}: {error}") from error
            assert time.monotonic() - started < CASE_SECONDS, f"case {case} took too long"
    # The mutations must exercise both outcomes, or the fuzzer tests nothing.
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 20, outcomes
