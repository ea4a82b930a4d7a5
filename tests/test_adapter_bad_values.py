"""Files whose tensors or metadata are damaged: one-line errors naming the key, or marked fields.

Before these checks a nan/inf or integer adapter rendered an all-black picture with exit 0, a
rank-0 layer divided by zero, and odd metadata made `sdlora info` end in a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdlora.adapters.command import describe
from sdlora.adapters.read import load_adapter, read_adapter_file
from sdlora.cli import main
from sdlora.errors import SdloraError

REPO = Path(__file__).resolve().parents[1]
KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
PEFT = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def kohya_tensors(rank: int = 2) -> dict[str, torch.Tensor]:
    return {
        f"{KOHYA}.lora_down.weight": torch.ones(rank, 32),
        f"{KOHYA}.lora_up.weight": torch.ones(32, rank),
        f"{KOHYA}.alpha": torch.tensor(1.0),
    }


def write(tmp_path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    path = tmp_path / "adapter.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(SdloraError) as error:
        load_adapter(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_weights_are_refused_naming_the_key(tmp_path, value, dtype):
    tensors = kohya_tensors()
    up = tensors[f"{KOHYA}.lora_up.weight"].to(dtype)
    up[3, 1] = value
    tensors[f"{KOHYA}.lora_up.weight"] = up
    assert f"{KOHYA}.lora_up.weight contains nan or inf" in error_of(write(tmp_path, tensors))


def test_non_finite_alpha_is_refused(tmp_path):
    tensors = {**kohya_tensors(), f"{KOHYA}.alpha": torch.tensor(float("nan"))}
    assert f"{KOHYA}.alpha contains nan or inf" in error_of(write(tmp_path, tensors))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.bool])
def test_integer_and_bool_tensors_are_refused(tmp_path, dtype):
    tensors = kohya_tensors()
    tensors[f"{KOHYA}.lora_down.weight"] = torch.ones(2, 32, dtype=dtype)
    message = error_of(write(tmp_path, tensors))
    assert f"{KOHYA}.lora_down.weight holds {str(dtype).removeprefix('torch.')} values" in message


def test_alpha_of_two_values_is_refused(tmp_path):
    tensors = {**kohya_tensors(), f"{KOHYA}.alpha": torch.tensor([1.0, 2.0])}
    assert f"{KOHYA}.alpha holds 2 values" in error_of(write(tmp_path, tensors))


def test_rank_zero_is_refused(tmp_path):
    assert "is empty" in error_of(write(tmp_path, kohya_tensors(rank=0)))


def test_rank_mismatch_names_both_keys(tmp_path):
    tensors = {**kohya_tensors(), f"{KOHYA}.lora_up.weight": torch.ones(32, 3)}
    message = error_of(write(tmp_path, tensors))
    assert f"{KOHYA}.lora_down.weight (2, 32) and {KOHYA}.lora_up.weight (32, 3)" in message


@pytest.mark.parametrize("shape", [(2,), (2, 32, 1), (1, 2, 32, 1, 1)])
def test_wrong_dimensions_are_refused(tmp_path, shape):
    tensors = {**kohya_tensors(), f"{KOHYA}.lora_down.weight": torch.ones(shape)}
    assert f"{KOHYA}.lora_down.weight has {len(shape)} dimensions" in error_of(
        write(tmp_path, tensors)
    )


def test_conv_up_weight_must_be_one_by_one(tmp_path):
    tensors = kohya_tensors()
    tensors[f"{KOHYA}.lora_down.weight"] = torch.ones(2, 32, 3, 3)
    tensors[f"{KOHYA}.lora_up.weight"] = torch.ones(32, 2, 3, 3)
    assert "(out, rank, 1, 1)" in error_of(write(tmp_path, tensors))


def test_loha_factors_must_agree(tmp_path):
    name = KOHYA
    tensors = {
        f"{name}.hada_w1_a": torch.ones(32, 2),
        f"{name}.hada_w1_b": torch.ones(2, 32),
        f"{name}.hada_w2_a": torch.ones(16, 2),
        f"{name}.hada_w2_b": torch.ones(2, 32),
    }
    assert "disagree on the output size" in error_of(write(tmp_path, tensors))


def peft_tensors() -> dict[str, torch.Tensor]:
    return {f"{PEFT}.lora_A.weight": torch.ones(2, 32), f"{PEFT}.lora_B.weight": torch.ones(32, 2)}


@pytest.mark.parametrize("folded", ["{", "[1]", '"two"', "NaN", "0", json.dumps({PEFT: "x"})])
def test_bad_folded_alpha_names_the_metadata_key(tmp_path, folded):
    path = write(tmp_path, peft_tensors(), {"sdlora.folded_alpha": folded})
    assert "sdlora.folded_alpha" in error_of(path)


@pytest.mark.parametrize(
    "config",
    [
        "{",
        "[]",
        json.dumps({"unet.lora_alpha": "big"}),
        json.dumps({"unet.lora_alpha": 4, "unet.alpha_pattern": {"(": 2}}),
        json.dumps({"unet.lora_alpha": 4, "unet.alpha_pattern": [1]}),
    ],
)
def test_bad_peft_config_names_the_metadata_key(tmp_path, config):
    path = write(tmp_path, peft_tensors(), {"lora_adapter_metadata": config})
    assert "lora_adapter_metadata" in error_of(path)


def info_lines(path: Path, capsys) -> dict[str, str]:
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    return dict((part.strip() for part in line.split(":", 1)) for line in out.splitlines())


@pytest.mark.parametrize(
    ("key", "value", "label", "shown"),
    [
        (
            "ss_tag_frequency",
            '{"d": {"a": "many", "b": 3}}',
            "top tags",
            "b (3) (some (unreadable))",
        ),
        ("ss_tag_frequency", '{"d": [1, 2]}', "top tags", "(unreadable)"),
        ("ss_tag_frequency", "{not json", "top tags", "(unreadable)"),
        ("sdlora.trigger_words", '{"a": 1}', "trigger words", "(unreadable)"),
        ("sdlora.trigger_words", "5", "trigger words", "(unreadable)"),
        ("sdlora.trigger_words", "[" * 100000, "trigger words", "(unreadable)"),
        ("sdlora.config", "[1, 2", "sdlora config", "(unreadable)"),
    ],
)
def test_info_marks_unreadable_metadata_and_shows_the_rest(
    tmp_path, capsys, key, value, label, shown
):
    path = write(tmp_path, kohya_tensors(), {key: value, "ss_seed": "7"})
    lines = info_lines(path, capsys)
    assert lines[label] == shown
    assert lines["unreadable metadata"] == key
    assert lines["seed"] == "7" and lines["rank"] == "2"


def test_info_escapes_control_characters_in_metadata(tmp_path, capsys):
    path = write(tmp_path, kohya_tensors(), {"ss_training_comment": "two\nlines\x1b[31m"})
    assert info_lines(path, capsys)["comment"] == "two\\nlines\\x1b[31m"


def test_describe_works_on_every_layer_kind_without_metadata(tmp_path):
    source = read_adapter_file(write(tmp_path, kohya_tensors()))
    assert dict(describe(source.adapter, source.layout, 10))["alpha"] == "1"


@pytest.mark.parametrize("out", ["folder", "file.txt/adapter.safetensors"])
def test_convert_out_that_cannot_be_a_file_is_one_line(tmp_path, capsys, out):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    source = write(tmp_path, kohya_tensors())
    assert main(["convert", str(source), "--to", "diffusers", "--out", str(tmp_path / out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--out" in error


def test_convert_of_a_rank_zero_file_is_one_line(tmp_path, capsys):
    source = write(tmp_path, kohya_tensors(rank=0))
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(source), "--to", "diffusers", "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not out.exists()


def test_info_into_a_closed_pipe_exits_quietly(tmp_path):
    path = write(tmp_path, kohya_tensors(), {"ss_training_comment": "x" * 100_000})
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` that has already gone
    try:
        result = subprocess.run(
            [sys.executable, "-m", "sdlora", "info", str(path)],
            cwd=REPO,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
    assert result.returncode == 1
