"""The training config: YAML sections mapped onto dataclasses, with defaults that work.

    config = load_config("configs/sd15-style.yaml", overrides=["train.steps=200"])

Every key is checked: an unknown key, a wrong type or an impossible value is a `SdloraError`
whose one line names the key and says what would be right.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sdlora.errors import SdloraError
from sdlora.numbers import is_number

TARGET_PRESETS = ("attention", "transformer", "full")
MAX_CLIP_SKIP = 12  # CLIP ViT-L's layers; a smaller test encoder is checked when the base loads
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                "polynomial")


@dataclass
class DataConfig:
    instance_dir: str = ""
    instance_prompt: str = ""
    trigger_word: str | None = None  # prepended to caption files that lack it
    # The same pictures without the style, same file names: the adapter learns, at weight w,
    # pictures w of the way from these to the styled ones, so its slider scales the style.
    before_dir: str | None = None
    class_dir: str | None = None
    class_prompt: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    resolution: int | None = None  # None: the base's native size (unet sample_size x 8)
    bucket: bool = True  # aspect-ratio buckets
    random_crop: bool = False
    random_flip: bool = False
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 1  # leading tags that shuffling leaves in place
    cache_latents: str = "memory"  # memory | disk | none


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "attention"  # attention | transformer | full
    text_encoder: bool = False
    text_encoder_mlp: bool = False
    text_encoder_lr: float | None = None  # None: train.learning_rate
    loraplus_ratio: float | None = None  # LoRA+: lr of the up matrices = ratio * lr


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 1
    gradient_accumulation: int = 1
    learning_rate: float = 1.0e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "adamw"  # adamw | adamw8bit
    weight_decay: float = 1.0e-2
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    recompute_feed_forward: bool = True  # a third less activation memory, ~10% more step time
    min_snr_gamma: float | None = None
    # Paired runs (data.before_dir): "picture" learns to denoise the styled pictures; "change"
    # learns only how they differ from their originals (the target keeps the base's own error on
    # the original, with the same noise), so the adapter does not also learn the pictures.
    paired_target: str = "picture"  # picture | change
    noise_offset: float = 0.0
    clip_skip: int = 1  # A1111's "Clip skip": 1 = last text-encoder layer, 2 = penultimate
    seed: int = 0


@dataclass
class EmbeddingsConfig:
    """New prompt words trained with the LoRA (sdlora.train.embeddings)."""

    tokens: list[str] = field(default_factory=list)  # e.g. ["<s1>"]; none: no embeddings
    init: list[str] = field(default_factory=list)  # per token: a word or "random"; none: random
    num_vectors: int = 1
    learning_rate: float = 5.0e-4
    pivot_steps: int = 0  # > 0: train the words alone first, then freeze them for the LoRA


@dataclass
class ValidationConfig:
    prompts: list[str] = field(default_factory=list)
    every: int = 0  # steps between validation grids; 0 turns validation off
    steps: int = 25
    guidance: float = 7.0
    seed: int = 0
    resolution: int | None = None


@dataclass
class CheckpointConfig:
    every: int = 500
    keep: int = 3


@dataclass
class OutputConfig:
    dir: str = "out/adapter"
    name: str = "adapter"
    format: str = "kohya"  # kohya | diffusers
    dtype: str = "fp16"  # fp16 | bf16 | fp32
    tensorboard: bool = True


@dataclass
class Config:
    base: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # The folder of the YAML file this config came from (None when built in code); not a key:
    # relative paths in the adapter's metadata are written relative to it.
    source_dir: typing.ClassVar[Path | None] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def adapter_path(self) -> Path:
        return Path(self.output.dir) / f"{self.output.name}.safetensors"


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides, check every key and value."""
    path = Path(path)
    if not path.is_file():
        raise SdloraError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise SdloraError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SdloraError(f"{path}{where} is not valid YAML: {getattr(error, 'problem', error)}") from None
    if not isinstance(raw, dict):
        raise SdloraError(f"{path} must be a mapping of sections (base, data, lora, train, ...)")
    for override in overrides:
        apply_override(raw, override)
    config = from_dict(raw)
    validate(config)
    config.source_dir = path.resolve().parent
    return config


def from_dict(raw: dict) -> Config:
    return _build(Config, raw, prefix="")


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def apply_override(raw: dict, override: str) -> None:
    """`train.steps=200` sets raw["train"]["steps"] = 200 (the value is parsed as YAML)."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise SdloraError(f"--set {override!r} must look like key=value, e.g. train.steps=200")
    *sections, leaf = key.strip().split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise SdloraError(f"--set {key}: {section} is not a section")
    try:
        node[leaf] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SdloraError(f"--set {key}: {value!r} is not a YAML value ({problem}); "
                          "quote text, e.g. --set key='[not a list'") from None


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise SdloraError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise SdloraError(
            f"unknown config key {prefix}{unknown[0]}; known keys here: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value if value is not None else {}, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**values)


def _coerce(value, hint, key: str):
    """Check `value` against a type hint; ints are accepted where floats are expected."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise SdloraError(f"config key {key} needs a value")
    for option in allowed:
        origin = typing.get_origin(option)
        if origin is list and isinstance(value, list):
            if all(isinstance(item, str) for item in value):
                return value
        elif option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(float(value), key)
        elif option is float and isinstance(value, str) and is_number(value):
            return _finite(float(value), key)  # YAML reads 1e-4 (no dot) as a string
        elif option in (int, str, bool) and _is_exactly(value, option):
            return value
    names = " or ".join(
        "a list of strings" if typing.get_origin(a) is list else a.__name__
        for a in allowed if a is not type(None)
    )
    raise SdloraError(f"config key {key} must be {names}, got {value!r}")


def _finite(value: float, key: str) -> float:
    """nan passes every `<` check and 1e309 reads as inf: neither is a setting."""
    if not math.isfinite(value):
        raise SdloraError(f"config key {key} must be a finite number, got {value}")
    return value


def _is_exactly(value, option) -> bool:
    """isinstance, except that True is not an int here."""
    return isinstance(value, option) and (option is bool or not isinstance(value, bool))


def _choice(key: str, value: str, options) -> None:
    if value not in options:
        raise SdloraError(f"config key {key} is {value!r}; choose one of {', '.join(options)}")


def validate(config: Config) -> None:
    """Impossible values, named by key."""
    if not config.base:
        raise SdloraError("config key base is missing: a hub id, a diffusers folder, a .safetensors file or 'demo'")
    data, lora, train = config.data, config.lora, config.train
    if not data.instance_dir:
        raise SdloraError("config key data.instance_dir is missing: the folder of training images")
    if not data.instance_prompt:
        raise SdloraError("config key data.instance_prompt is missing, e.g. 'a painting in sks style'")
    if data.resolution is not None and (data.resolution < 64 or data.resolution % 8):
        raise SdloraError(f"data.resolution must be a multiple of 8 and at least 64, got {data.resolution}")
    if data.class_dir and not data.class_prompt:
        raise SdloraError("data.class_dir is set but data.class_prompt is not: give the class prompt, e.g. 'a photo of a dog'")
    if data.num_class_images < 1:
        raise SdloraError("data.num_class_images must be at least 1")
    if not 0.0 <= data.caption_dropout < 1.0:
        raise SdloraError(f"data.caption_dropout must be in [0, 1), got {data.caption_dropout}")
    if data.keep_tokens < 0:
        raise SdloraError("data.keep_tokens must be 0 or more")
    _choice("data.cache_latents", data.cache_latents, ("memory", "disk", "none"))
    if lora.rank < 1:
        raise SdloraError(f"lora.rank must be at least 1, got {lora.rank}")
    if lora.alpha <= 0:
        raise SdloraError(f"lora.alpha must be positive, got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        raise SdloraError(f"lora.dropout must be in [0, 1), got {lora.dropout}")
    _choice("lora.targets", lora.targets, TARGET_PRESETS)
    if lora.loraplus_ratio is not None and lora.loraplus_ratio < 1:
        raise SdloraError(f"lora.loraplus_ratio must be at least 1, got {lora.loraplus_ratio}")
    for key in ("steps", "batch_size", "gradient_accumulation"):
        if getattr(train, key) < 1:
            raise SdloraError(f"train.{key} must be at least 1, got {getattr(train, key)}")
    if train.learning_rate <= 0:
        raise SdloraError(f"train.learning_rate must be positive, got {train.learning_rate}")
    _choice("train.lr_scheduler", train.lr_scheduler, LR_SCHEDULES)
    _choice("train.optimizer", train.optimizer, ("adamw", "adamw8bit"))
    _choice("train.mixed_precision", train.mixed_precision, ("no", "fp16", "bf16"))
    _choice("train.paired_target", train.paired_target, ("picture", "change"))
    if train.paired_target == "change" and not config.data.before_dir:
        raise SdloraError("train.paired_target: change learns from before/after pairs; set "
                          "data.before_dir to the unstyled pictures, or leave it at picture")
    if not 1 <= train.clip_skip <= MAX_CLIP_SKIP:
        raise SdloraError(
            f"train.clip_skip must be from 1 (the last text-encoder layer) to {MAX_CLIP_SKIP}, "
            f"got {train.clip_skip}"
        )
    if lora.text_encoder_lr is not None and lora.text_encoder_lr <= 0:
        raise SdloraError(f"lora.text_encoder_lr must be positive, got {lora.text_encoder_lr}")
    for key, value in (("data.prior_loss_weight", data.prior_loss_weight),
                       ("train.weight_decay", train.weight_decay),
                       ("train.max_grad_norm", train.max_grad_norm),
                       ("train.noise_offset", train.noise_offset),
                       ("validation.guidance", config.validation.guidance)):
        if value < 0:
            raise SdloraError(f"{key} must be 0 or more, got {value}")
    if train.min_snr_gamma is not None and train.min_snr_gamma <= 0:
        raise SdloraError(f"train.min_snr_gamma must be positive, got {train.min_snr_gamma}")
    if config.validation.every < 0 or config.checkpoint.every < 0 or config.checkpoint.keep < 1:
        raise SdloraError("validation.every and checkpoint.every must be >= 0, checkpoint.keep >= 1")
    if config.validation.every and not config.validation.prompts:
        raise SdloraError("validation.every is set but validation.prompts is empty")
    _validate_embeddings(config)
    _choice("output.format", config.output.format, ("kohya", "diffusers"))
    _choice("output.dtype", config.output.dtype, ("fp16", "bf16", "fp32"))
    for section, key in (*PATH_KEYS, ("", "base")):
        value = getattr(getattr(config, section), key) if section else config.base
        if value and "\0" in value:
            raise SdloraError(f"{section + '.' if section else ''}{key} contains a NUL byte")
    name = config.output.name
    if not name or name in (".", "..") or any(c in name for c in ("/", "\\", os.sep, "\0")):
        raise SdloraError(f"output.name must be a plain file name (no / \\ or NUL), got {name!r}")


def _validate_embeddings(config: Config) -> None:
    embeddings = config.embeddings
    if not embeddings.tokens:
        return
    if embeddings.init and len(embeddings.init) != len(embeddings.tokens):
        raise SdloraError("embeddings.init needs one entry (a word or 'random') per token")
    if len(set(embeddings.tokens)) != len(embeddings.tokens):
        raise SdloraError("embeddings.tokens has a token twice")
    if embeddings.num_vectors < 1 or embeddings.learning_rate <= 0:
        raise SdloraError("embeddings.num_vectors must be at least 1 and learning_rate positive")
    if not 0 <= embeddings.pivot_steps <= config.train.steps:
        raise SdloraError(f"embeddings.pivot_steps must be 0 to train.steps, "
                          f"got {embeddings.pivot_steps}")
    if config.output.format != "kohya":
        raise SdloraError("embeddings are bundled in the adapter file, which only output.format: "
                          "kohya can hold (diffusers' LoRA loader refuses them)")


# Keys whose value is a local path: the adapter's metadata records them portably.
PATH_KEYS = (("data", "instance_dir"), ("data", "before_dir"), ("data", "class_dir"),
             ("output", "dir"))


def portable_path(value: str, anchor: Path) -> str:
    """`value` relative to `anchor` when inside it, else only its last part: a shared adapter
    must not tell its readers how the trainer's disk (or home folder) is laid out."""
    resolved = Path(value).resolve()  # a relative path is used from the working folder
    try:
        return resolved.relative_to(anchor.resolve()).as_posix() or "."
    except ValueError:
        return resolved.name or value


def portable_dict(config: Config) -> dict:
    """`to_dict`, with local paths relative to the config file's folder (or the working folder
    for a config built in code); a base that is a local file or folder keeps only its name."""
    anchor = config.source_dir or Path.cwd()
    raw = config.to_dict()
    for section, key in PATH_KEYS:
        if raw[section][key]:
            raw[section][key] = portable_path(raw[section][key], anchor)
    raw["base"] = portable_base(config.base)
    return raw


def portable_base(base: str) -> str:
    """A hub id as it is; a local model by its file or folder name."""
    path = Path(base)
    return path.name if path.is_absolute() or path.exists() else base
