import re
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
        ("train.paired_target=change", "set data.before_dir"),
        ("train.paired_target=both", "choose one of picture, change"),
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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=[1", "train.steps: '\\[1' is not a YAML value"),
        ("train.steps=!!python/object:os.system ls", "is not a YAML value"),
        ("train.learning_rate=.nan", "train.learning_rate must be a finite number"),
        ("train.learning_rate=nan", "train.learning_rate must be a finite number"),
        ("lora.alpha=1e309", "lora.alpha must be a finite number"),
        ("lora.alpha=-.inf", "lora.alpha must be a finite number"),
        ("train.weight_decay=-1", "train.weight_decay must be 0 or more"),
        ("output.name=a/b", "output.name must be a plain file name"),
        ("output.name=a\\b", "output.name must be a plain file name"),
        ('output.name="a\\0b"', "output.name must be a plain file name"),  # YAML's NUL escape
        ("output.name=a\0b", "output.name: 'a.x00b' is not a YAML value"),
        ("output.name=..", "output.name must be a plain file name"),
        ('data.instance_dir="x\\0y"', "data.instance_dir contains a NUL byte"),
    ],
)
def test_bad_input_is_one_cli_line(tmp_path, capsys, override, message):
    from sdlora.cli import main

    assert main(["train", str(write(tmp_path, MINIMAL)), "--set", override]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    assert re.search(message, error), error


def test_config_file_that_is_not_utf8_is_one_cli_line(tmp_path, capsys):
    from sdlora.cli import main

    path = tmp_path / "config.yaml"
    path.write_bytes(MINIMAL.replace("sks", "s\xe9").encode("latin-1"))
    assert main(["train", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is not UTF-8 text" in error, error


def test_relative_paths_are_recorded_relative_to_the_config_folder(tmp_path, monkeypatch):
    from sdlora.train.config import portable_dict

    project = tmp_path / "project"
    (project / "images").mkdir(parents=True)
    monkeypatch.chdir(project)
    config = load_config(write(project, MINIMAL), [
        "data.instance_dir=images", f"output.dir={tmp_path / 'elsewhere' / 'run'}",
        f"base={project / 'models' / 'base.safetensors'}"])
    portable = portable_dict(config)
    assert portable["data"]["instance_dir"] == "images"
    assert portable["output"]["dir"] == "run"  # outside the config's folder: its name only
    assert str(tmp_path) not in repr(portable)
    assert config.data.instance_dir == "images"  # the run itself uses the paths as given
