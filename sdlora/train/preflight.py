"""Checks that need no model: they run before minutes of model loading, so that a typo in a
folder name or a missing package fails at once, and before anything is written."""

from __future__ import annotations

from pathlib import Path

import torch

from sdlora.errors import SdloraError
from sdlora.train.config import Config
from sdlora.train.dataset import IMAGE_SUFFIXES


def check_before_loading(config: Config) -> None:
    check_image_folder(config.data.instance_dir, "data.instance_dir")
    if config.data.before_dir:
        check_image_folder(config.data.before_dir, "data.before_dir")
    class_dir = config.data.class_dir
    if class_dir and Path(class_dir).exists() and not Path(class_dir).is_dir():
        raise SdloraError(f"data.class_dir {class_dir} is a file; give a folder (missing class "
                          "images are generated into it)")
    optimizer_class(config)


def check_image_folder(folder: str, key: str = "data.instance_dir") -> None:
    """Fail fast on a missing or image-less folder; unreadable files are found by the dataset."""
    path = Path(folder)
    if not path.is_dir():
        raise SdloraError(f"{key} {folder} does not exist or is not a folder")
    if not any(child.suffix.lower() in IMAGE_SUFFIXES for child in path.iterdir()):
        raise SdloraError(f"no usable images in {folder} (expected {', '.join(IMAGE_SUFFIXES)} files)")


def optimizer_class(config: Config) -> type[torch.optim.Optimizer]:
    if config.train.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise SdloraError("train.optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes, "
                              "or use adamw") from None
        return bitsandbytes.optim.AdamW8bit
    return torch.optim.AdamW
