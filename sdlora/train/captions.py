"""Captions: the same-stem .txt beside an image, the trigger word, and the per-epoch rules
(dropout, tag shuffling) that a training run applies to them."""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from sdlora.errors import SdloraError


def read_caption_file(image_path: str | Path) -> str | None:
    """The caption in the same-stem .txt beside an image, whitespace collapsed to single spaces;
    None when there is no such file or it is blank. UTF-8, with or without a BOM."""
    caption_path = Path(image_path).with_suffix(".txt")
    if not caption_path.is_file():
        return None
    try:
        text = " ".join(caption_path.read_text(encoding="utf-8-sig").split())
    except UnicodeDecodeError:
        raise SdloraError(f"caption file {caption_path} is not UTF-8 text; save it as UTF-8") from None
    return text or None


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def with_trigger_word(caption: str, trigger_word: str | None) -> str:
    """Prepend `trigger_word` as the first tag unless the caption already has it as a word."""
    if not trigger_word or re.search(rf"(?<!\w){re.escape(trigger_word)}(?!\w)", caption):
        return caption
    return f"{trigger_word}, {caption}"


def apply_caption_rules(
    caption: str,
    rng: random.Random,
    dropout: float = 0.0,
    shuffle_tags: bool = False,
    keep_tokens: int = 1,
) -> str:
    """One epoch's version of a caption: "" with probability `dropout`, else, with
    `shuffle_tags`, its tags shuffled except the first `keep_tokens`, which stay in place."""
    if rng.random() < dropout:
        return ""
    if not shuffle_tags:
        return caption
    tags = split_tags(caption)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(kept + rest)


def tag_frequency(captions: Iterable[str], dataset_name: str) -> dict[str, dict[str, int]]:
    """{dataset_name: {tag: number of captions with it}}, kohya's `ss_tag_frequency` layout."""
    counts = Counter(tag for caption in captions for tag in dict.fromkeys(split_tags(caption)))
    return {dataset_name: dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))}
