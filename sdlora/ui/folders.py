"""The folders the web UI may read and write, and the only ways user input becomes a path.

Whatever a browser sends (an adapter name, a base model, a training folder) is resolved here
and must land inside a configured folder: adapter names are looked up in the scanned list
(never joined into a path), other names are resolved, symlinks included, and checked for
containment, so `../../etc/passwd` or a link out of the folder is refused.

Bases: the operator's `--base`, `demo`, the models folder, and the ids of `--allow-base`.
Nothing else, so a user of a shared UI cannot make the server download and run any repository.

Users: with a login, each user writes into their own folder (`outputs/<user>`,
`adapters/<user>`), marked by a `.sdlora-user` file; scans skip every marked folder but the
user's own, so no user sees another's images or adapters.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from sdlora.adapters.metadata import family_from_metadata, trigger_words
from sdlora.base.families import family_from_unet_config
from sdlora.errors import SdloraError

ADAPTER_SUFFIX = ".safetensors"
PREVIEW_SUFFIX = ".preview.png"  # A1111's name for an adapter's card picture
PLAIN_NAME = re.compile(r"[\w][\w .+-]*")
USER_MARKER = ".sdlora-user"
# Folders of a training run that hold intermediate files, not adapters to offer.
_NOT_ADAPTER_FOLDERS = {"checkpoints", "cache", "validation", "images", "logs"}


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter file and what its metadata says (no tensors are read to list it)."""

    name: str
    path: Path
    trigger_words: list[str]
    family: str | None
    metadata: dict[str, str]

    @property
    def rank(self) -> str:
        return self.metadata.get("ss_network_dim", "")

    @property
    def steps(self) -> str:
        return self.metadata.get("ss_max_train_steps", "")

    @property
    def base_model(self) -> str:
        return self.metadata.get("ss_sd_model_name", "")

    @property
    def cached_preview(self) -> Path:
        """Where a preview rendered on demand is kept: beside the adapter."""
        return self.path.with_name(self.path.stem + PREVIEW_SUFFIX)

    @property
    def preview(self) -> Path | None:
        """The card picture: a saved preview, else the newest validation grid of its run."""
        if self.cached_preview.is_file():
            return self.cached_preview
        grids = sorted((self.path.parent / "validation").glob("step-*.png"), key=_step_number)
        return grids[-1] if grids else None


def _step_number(path: Path) -> int:
    digits = re.sub(r"\D", "", path.stem)
    return int(digits) if digits else -1


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


def user_folder_name(user: str) -> str:
    """A login name as a folder name, one-to-one: characters other than letters, digits,
    `-` and `_` (and a leading dot) become %XX, so no name is a path or collides with another."""
    return "".join(
        char if re.fullmatch(r"[A-Za-z0-9_-]", char) else f"%{ord(char):02X}" for char in user
    )


@dataclass
class Folders:
    """`adapters`: adapters to mix, and where trained ones are written. `outputs`: generated
    images (history). `models`: local bases users may pick (optional). `data`: training image
    folders users may name (optional). `configs`: preset training configs. `default_base`: the
    operator's --base. `allowed_bases`: other bases (hub ids too) users may pick.
    `embeddings`: A1111's embeddings folder, named in prompts (optional)."""

    adapters: Path
    configs: Path
    outputs: Path = Path("outputs")
    default_base: str = "demo"
    models: Path | None = None
    data: Path | None = None
    allowed_bases: tuple[str, ...] = ()
    embeddings: Path | None = None
    _scanned: dict[Path, tuple[int, AdapterInfo | None]] = field(default_factory=dict, repr=False)

    # -- users ---------------------------------------------------------------------------------

    def user_root(self, root: Path, user: str | None) -> Path:
        """`root` for the one user of a UI without login, else the user's marked folder in it."""
        if user is None:
            return root
        folder = root / user_folder_name(user)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / USER_MARKER).touch()
        return folder

    def adapters_for(self, user: str | None) -> Path:
        return self.user_root(self.adapters, user)

    def outputs_for(self, user: str | None) -> Path:
        return self.user_root(self.outputs, user)

    # -- adapters ------------------------------------------------------------------------------

    def list_adapters(self, user: str | None = None) -> list[AdapterInfo]:
        """The user's own adapters, then the shared ones (the adapters folder without users'
        folders), subfolders included, by name; a name seen twice is kept with its folder."""
        folders = [self.adapters_for(user)] if user is not None else []
        found: dict[str, AdapterInfo] = {}
        for folder in [*folders, self.adapters]:
            for path in _adapter_files(folder, self.adapters):
                info = self._read(path)
                if info is None:
                    continue
                name = path.stem
                if name in found or not PLAIN_NAME.fullmatch(name):
                    name = path.relative_to(self.adapters.resolve()).with_suffix("").as_posix()
                if name not in found:
                    found[name] = AdapterInfo(
                        name, info.path, info.trigger_words, info.family, info.metadata
                    )
        return sorted(found.values(), key=lambda info: info.name.lower())

    def adapter(self, name: str, user: str | None = None) -> AdapterInfo:
        for info in self.list_adapters(user):
            if info.name == name:
                return info
        raise SdloraError(f"no adapter named {name!r} in {self.adapters}")

    def adapter_path(self, name: str, user: str | None = None) -> Path:
        return self.adapter(name, user).path

    def _read(self, path: Path) -> AdapterInfo | None:
        """The adapter's metadata, re-read only when the file changed; None: not offered."""
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            return None
        cached = self._scanned.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
            info = AdapterInfo(
                path.stem, path, trigger_words(metadata), family_from_metadata(metadata), metadata
            )
        except Exception:  # noqa: BLE001 - unreadable: not offered
            info = None
        self._scanned[path] = (stamp, info)
        return info

    # -- base models ---------------------------------------------------------------------------

    def base_choices(self) -> list[str]:
        """The default base, the allowed ones, then the bases in the models folder (by name)."""
        choices = [self.default_base, *self.allowed_bases]
        if self.models is not None and self.models.is_dir():
            for child in sorted(self.models.iterdir()):
                if (child / "model_index.json").is_file() or child.suffix == ".safetensors":
                    choices.append(child.name)
        return list(dict.fromkeys(choices))

    def base_source(self, choice: str) -> str:
        """What `load_base` gets for a user's choice: the default base, `demo`, an allowed
        base, or a base in the models folder; anything else is refused."""
        choice = (choice or "").strip()
        if choice in ("", self.default_base):
            return self.default_base
        if choice == "demo" or choice in self.allowed_bases:
            return choice
        if self.models is not None and "\0" not in choice:
            path = contained(self.models, choice, "base model")
            if path.exists() and path != self.models.resolve():
                return str(path)
        raise SdloraError(
            f"base {choice!r} is not offered here: pick one of the list "
            "(the operator can add one with --allow-base or --models-dir)"
        )

    def base_family(self, choice: str) -> str | None:
        """The family of a base, from its config files (None: not known before loading)."""
        from sdlora.base.models import resolve_base_source

        folder = Path(resolve_base_source(self.base_source(choice)))
        try:
            config = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
            encoders = 2 if (folder / "text_encoder_2").is_dir() else 1
            return family_from_unet_config(config, encoders)
        except (OSError, ValueError, SdloraError):
            return None

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


def _adapter_files(folder: Path, root: Path) -> list[Path]:
    """Adapter files under `folder` (resolved), sorted; users' folders below it, hidden and
    run-internal folders are skipped, and so is a link that leads out of `root`."""
    root = root.resolve()
    files = []
    for current, subfolders, names in os.walk(folder.resolve()):
        here = Path(current)
        subfolders[:] = sorted(
            sub for sub in subfolders
            if not sub.startswith(".") and sub not in _NOT_ADAPTER_FOLDERS
            and not (here / sub / USER_MARKER).exists()
        )
        for name in sorted(names):
            if name.endswith(ADAPTER_SUFFIX) and not name.startswith("."):
                path = (here / name).resolve()
                if path == root or root in path.parents:
                    files.append(path)
    return files
