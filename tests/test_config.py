from pathlib import Path

import pytest
import yaml

from sdlora.errors import SdloraError
from sdlora.train.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


MINIMAL = """
base: some/model
data:
  instance_dir: data/x
  instance_prompt: a painting in sks style
"""


def test_minimal_config_gets_working_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.lora.rank == 16 and config.lora.targets == "attention"
    assert config.train.steps == 1000 and config.output.format == "kohya"
    assert config.data.resolution is None  # the family's own resolution


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_ready_configs_are_valid(path):
    config = load_config(path)
    assert config.base and config.data.instance_prompt


def test_overrides_set_nested_keys_with_yaml_types(tmp_path):
    config = load_config(write(tmp_path, MINIMAL),
                         ["train.steps=200", "lora.text_encoder=true", "train.learning_rate=3e-4"])
    assert config.train.steps == 200
    assert config.lora.text_encoder is True
    assert config.train.learning_rate == pytest.approx(3e-4)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stepz=5", "unknown config key train.stepz"),
        ("colour=red", "unknown config key colour"),
        ("lora.rank=0", "lora.rank must be at least 1"),
        ("lora.rank=big", "lora.rank must be int"),
        ("data.resolution=500", "multiple of 8"),
        ("train.optimizer=sgd", "choose one of adamw, adamw8bit"),
        ("lora.targets=everything", "choose one of attention, transformer, full"),
        ("data.class_dir=data/dogs", "class_prompt"),
        ("output.format=ckpt", "output.format"),
        ("train.steps", "key=value"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, message):
    with pytest.raises(SdloraError, match=message):
        load_config(write(tmp_path, MINIMAL), [override])


def test_missing_file_and_broken_yaml_are_one_line_errors(tmp_path):
    with pytest.raises(SdloraError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(SdloraError, match="not valid YAML"):
        load_config(write(tmp_path, "base: [unclosed"))


def test_resolved_config_round_trips(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["lora.alpha=8"])
    again = write(tmp_path, yaml.safe_dump(config.to_dict()))
    assert load_config(again) == config
