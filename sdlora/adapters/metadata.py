"""Adapter metadata: the string key/values stored in a safetensors header.

Two vocabularies live side by side:
  ss_*      what kohya's sd-scripts writes and what AUTOMATIC1111, ComfyUI, civitai and friends
            show (base model, rank, alpha, resolution, steps, tag frequency, comment);
  sdlora.*  sdlora's own: the family, the whole training config (JSON), the trigger words.
`training_metadata` builds both for the trainer; the readers below pull facts back out of any
adapter's metadata for `sdlora info` and for family detection.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence

from sdlora.base.families import FAMILIES, get_family

FAMILY_KEY = "sdlora.family"
CONFIG_KEY = "sdlora.config"
TRIGGER_WORDS_KEY = "sdlora.trigger_words"
# modelspec.architecture (Stability's model spec, written by kohya and read by ComfyUI)
_ARCHITECTURES = {
    "sd1": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-512/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
}


def training_metadata(
    *,
    family: str,
    rank: int,
    alpha: float,
    resolution: int,
    max_train_steps: int,
    base_model: str,
    output_name: str,
    trigger_words: Sequence[str] = (),
    tag_frequency: Mapping[str, Mapping[str, int]] | None = None,
    config: Mapping | None = None,
    v_prediction: bool = False,
    learning_rate: float | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    num_train_images: int | None = None,
    clip_skip: int | None = None,
) -> dict[str, str]:
    """Metadata for a trained adapter: kohya `ss_*`, `modelspec.*` and `sdlora.*` keys, all strings.

    tag_frequency is kohya's {dataset folder: {caption tag: count}}; config is the whole training
    config (stored as JSON so that a run can be reproduced from the adapter alone); clip_skip is
    A1111's count (1 = the last text-encoder layer), recorded as kohya's ss_clip_skip.
    """
    base_version = get_family(family).kohya_base_version
    if v_prediction and family != "sdxl":
        base_version += "_v"  # kohya's spelling for v-parameterization models ("sd_v2_v")
    words = [word.strip() for word in trigger_words if word.strip()]
    metadata = {
        "ss_base_model_version": base_version,
        "ss_v2": str(family == "sd2"),
        "ss_sd_model_name": base_model,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": _number(alpha),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_max_train_steps": str(max_train_steps),
        "ss_output_name": output_name,
        "ss_tag_frequency": json.dumps(dict(tag_frequency or {})),
        "ss_training_comment": f"trigger words: {', '.join(words)}" if words else "",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": (
            "stable-diffusion-v2-768-v/lora"
            if family == "sd2" and v_prediction
            else _ARCHITECTURES[family]
        ),
        "modelspec.implementation": "diffusers",
        "modelspec.title": output_name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        FAMILY_KEY: family,
        TRIGGER_WORDS_KEY: json.dumps(words),
        CONFIG_KEY: json.dumps(config or {}, sort_keys=True, default=str),
    }
    if words:
        metadata["modelspec.trigger_phrase"] = ", ".join(words)
    optional = {
        "ss_learning_rate": learning_rate,
        "ss_train_batch_size": batch_size,
        "ss_seed": seed,
        "ss_num_train_images": num_train_images,
        "ss_clip_skip": clip_skip,
    }
    metadata.update({key: _number(value) for key, value in optional.items() if value is not None})
    return metadata


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The family an adapter's metadata declares: sdlora's own key, modelspec, then kohya's."""
    declared = metadata.get(FAMILY_KEY)
    if declared in FAMILIES:
        return declared
    architecture = metadata.get("modelspec.architecture", "")
    for prefix, family in (
        ("stable-diffusion-xl", "sdxl"),
        ("stable-diffusion-v2", "sd2"),
        ("stable-diffusion-v1", "sd1"),
    ):
        if architecture.startswith(prefix):
            return family
    version = metadata.get("ss_base_model_version", "")
    for prefix, family in (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1")):
        if version.startswith(prefix):
            return family
    if metadata.get("ss_v2") == "True":
        return "sd2"
    return None


def family_from_model_name(metadata: Mapping[str, str]) -> str | None:
    """A guess from ss_sd_model_name ("sd_xl_base_1.0", "v2-1_768-ema", "v1-5-pruned").

    Names are free text, so this is the last resort, after the metadata and the weights.
    """
    name = metadata.get("ss_sd_model_name", "").lower()
    if "xl" in name:
        return "sdxl"
    if any(hint in name for hint in ("v2-", "v2_", "sd2", "768-v")):
        return "sd2"
    if any(hint in name for hint in ("v1-", "v1_", "sd15", "sd-1", "sd1")):
        return "sd1"
    return None


def trigger_words(metadata: Mapping[str, str]) -> list[str]:
    """Trigger words: sdlora's list, else modelspec's phrase, else a "trigger words:" comment."""
    words = _json(metadata, TRIGGER_WORDS_KEY)
    if isinstance(words, list) and words:
        return [str(word) for word in words]
    phrase = metadata.get("modelspec.trigger_phrase", "")
    if not phrase:
        comment = metadata.get("ss_training_comment", "")
        label, _, rest = comment.partition(":")
        phrase = rest if label.strip().lower() in ("trigger word", "trigger words") else ""
    return [word.strip() for word in phrase.split(",") if word.strip()]


def top_tags(metadata: Mapping[str, str], count: int = 10) -> list[tuple[str, int]]:
    """The most frequent caption tags over all datasets in ss_tag_frequency (readable ones)."""
    totals: Counter[str] = Counter()
    for tag, number in _tag_counts(_json(metadata, "ss_tag_frequency")):
        if _is_count(number):
            totals[str(tag)] += number
    return totals.most_common(count)


def unreadable_keys(metadata: Mapping[str, str]) -> list[str]:
    """Keys present in the metadata whose JSON is not what sdlora and kohya write.

    Hand-edited or foreign files have these; `sdlora info` marks them instead of failing.
    """
    bad = []
    words = _json(metadata, TRIGGER_WORDS_KEY)
    if words is not None and not isinstance(words, list):
        bad.append(TRIGGER_WORDS_KEY)
    frequency = _json(metadata, "ss_tag_frequency")
    if frequency is not None and (
        not isinstance(frequency, dict)
        or not all(isinstance(tags, dict) for tags in frequency.values())
        or not all(_is_count(number) for _, number in _tag_counts(frequency))
    ):
        bad.append("ss_tag_frequency")
    config = _json(metadata, CONFIG_KEY)
    if config is not None and not isinstance(config, dict):
        bad.append(CONFIG_KEY)
    return bad


_INVALID = object()  # what _json returns for a value that is not JSON


def _json(metadata: Mapping[str, str], key: str) -> object:
    """The parsed value of `key`; None when absent, _INVALID when not JSON."""
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: thousands of nested brackets
        return _INVALID


def _tag_counts(per_dataset: object) -> list[tuple[object, object]]:
    if not isinstance(per_dataset, dict):
        return []
    return [
        (tag, number)
        for tags in per_dataset.values()
        if isinstance(tags, dict)
        for tag, number in tags.items()
    ]


def _is_count(number: object) -> bool:
    return isinstance(number, int) and not isinstance(number, bool)


# (metadata key, label) shown by `sdlora info` when present.
TRAINING_SETTINGS = (
    ("ss_sd_model_name", "base model"),
    ("ss_base_model_version", "base model version"),
    ("ss_network_module", "network module"),
    ("ss_network_dim", "network dim"),
    ("ss_network_alpha", "network alpha"),
    ("ss_resolution", "resolution"),
    ("ss_max_train_steps", "max train steps"),
    ("ss_num_epochs", "epochs"),
    ("ss_num_train_images", "train images"),
    ("ss_train_batch_size", "batch size"),
    ("ss_learning_rate", "learning rate"),
    ("ss_unet_lr", "unet learning rate"),
    ("ss_text_encoder_lr", "text encoder learning rate"),
    ("ss_optimizer", "optimizer"),
    ("ss_lr_scheduler", "lr scheduler"),
    ("ss_mixed_precision", "mixed precision"),
    ("ss_clip_skip", "clip skip"),
    ("ss_seed", "seed"),
    ("ss_output_name", "output name"),
    ("ss_training_comment", "comment"),
)


def training_settings(metadata: Mapping[str, str]) -> list[tuple[str, str]]:
    """(label, value) pairs of the training settings the metadata records, in a fixed order."""
    settings = [(label, metadata[key]) for key, label in TRAINING_SETTINGS if metadata.get(key)]
    config = metadata.get(CONFIG_KEY)
    if config and config != "{}":
        settings.append(("sdlora config", config))
    return settings
