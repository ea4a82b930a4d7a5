"""The folders the web UI may read and write, and the only ways user input becomes a path.

Whatever a browser sends (an adapter name, a base model, a training folder, an upload) is
resolved here and must land inside a configured folder: names are resolved, symlinks included,
and checked for containment, so `../../etc/passwd` or a link out of the folder is refused.
The operator's own `--base` is trusted as given; hub ids are passed to diffusers as ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from sdlora.adapters.metadata import trigger_words
from sdlora.errors import SdloraError

ADAPTER_SUFFIX = ".safetensors"
# Stricter than sdlora.base.models.HUB_ID: no segment may be "." or "..", so no id is also a path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w-]*(\.[\w-]+)*/[A-Za-z0-9][\w-]*(\.[\w-]+)*")
PLAIN_NAME = re.compile(r"[\w][\w .+-]*")


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: Path
    trigger_words: list[str]


def contained(folder: Path, relative: str, what: str) -> Path:
    """`folder / relative`, resolved, or an error when it leaves `folder`."""
    root = folder.resolve()
    if not relative or Path(relative).is_absolute():
        candidate = Path(relative).resolve() if relative else root
    else:
        candidate = (root / relative).resolve()
    if candidate != root and root not in candidate.parents:
        raise SdloraError(f"{what} {relative!r} is outside the allowed folder {folder}")
    return candidate


@dataclass
class Folders:
    """`adapters`: adapters to mix, and where trained ones are written. `models`: local bases
    users may pick (optional). `data`: training image folders users may name (optional).
    `configs`: preset training configs. `default_base`: the operator's --base."""

    adapters: Path
    configs: Path
    default_base: str = "demo"
    models: Path | None = None
    data: Path | None = None

    # -- adapters ------------------------------------------------------------------------------

    def adapter_path(self, name: str) -> Path:
        if not PLAIN_NAME.fullmatch(name or ""):
            raise SdloraError(f"adapter name {name!r} is not a plain file name")
        path = contained(self.adapters, f"{name}{ADAPTER_SUFFIX}", "adapter")
        if not path.is_file():
            raise SdloraError(f"no adapter named {name!r} in {self.adapters}")
        return path

    def list_adapters(self) -> list[AdapterInfo]:
        """Adapters directly in the adapters folder, by name, with their trigger words."""
        found = []
        for path in sorted(self.adapters.glob(f"*{ADAPTER_SUFFIX}")):
            if not PLAIN_NAME.fullmatch(path.stem):
                continue
            try:
                self.adapter_path(path.stem)  # a link out of the folder is not offered
                with safe_open(str(path), framework="pt") as handle:
                    metadata = handle.metadata() or {}
            except Exception:  # noqa: BLE001 - unreadable or outside the folder: not offered
                continue
            found.append(AdapterInfo(path.stem, path, trigger_words(metadata)))
        return found

    # -- base models ---------------------------------------------------------------------------

    def base_choices(self) -> list[str]:
        """The default base, then the bases in the models folder (by name)."""
        choices = [self.default_base]
        if self.models is not None and self.models.is_dir():
            for child in sorted(self.models.iterdir()):
                if (child / "model_index.json").is_file() or child.suffix == ".safetensors":
                    choices.append(child.name)
        return list(dict.fromkeys(choices))

    def base_source(self, choice: str) -> str:
        """What `load_base` gets for a user's choice: the default base, a base in the models
        folder, `demo`, or a hub id (never a path of the user's choosing)."""
        choice = (choice or "").strip()
        if choice in ("", self.default_base):
            return self.default_base
        if choice == "demo":
            return "demo"
        if self.models is not None:
            path = contained(self.models, choice, "base model")
            if path.exists() and path != self.models.resolve():
                return str(path)
        if HUB_ID.fullmatch(choice) and not Path(choice).exists():
            return choice
        raise SdloraError(f"base {choice!r} is neither a model in the models folder nor a hub id")

    # -- training ------------------------------------------------------------------------------

    def data_folder(self, name: str) -> Path:
        if self.data is None:
            raise SdloraError(
                "naming a folder needs the app started with --data-dir; upload images instead"
            )
        path = contained(self.data, name.strip(), "image folder")
        if not path.is_dir():
            raise SdloraError(f"image folder {name!r} not found in {self.data}")
        return path

    def presets(self) -> dict[str, Path]:
        """Preset training configs by file stem."""
        return {path.stem: path for path in sorted(self.configs.glob("*.yaml"))}

    def preset(self, name: str) -> Path:
        presets = self.presets()
        if name not in presets:
            raise SdloraError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
        return presets[name]
