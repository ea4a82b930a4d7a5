"""Load a base model from a hub id, a diffusers folder or a single-file checkpoint.

`load_base` returns the diffusers pipeline together with what the rest of sdlora needs to
know about it: the family (sd1, sd2, sdxl) and the prediction type (epsilon, v_prediction),
both read from the model itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlora.base.families import Family, family_from_unet_config, get_family
from sdlora.errors import SdloraError
from sdlora.files import PICKLE_SUFFIXES

SINGLE_FILE_SUFFIXES = (".safetensors",)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Base:
    pipeline: object  # a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline
    family: Family
    prediction_type: str  # "epsilon" or "v_prediction"
    source: str  # what the user passed

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [getattr(self.pipeline, name) for name in self.family.text_encoders]

    @property
    def native_size(self) -> int:
        """The image side the UNet was built for (512 for SD1.5, 768 for SD2-v, 1024 for SDXL,
        less for a tiny base): the default wherever no size is given."""
        return self.pipeline.unet.config.sample_size * self.pipeline.vae_scale_factor

    @property
    def tokenizers(self) -> list:
        names = ["tokenizer", "tokenizer_2"][: len(self.family.text_encoders)]
        return [getattr(self.pipeline, name) for name in names]


def resolve_base_source(source: str) -> str:
    """Map a user's base spec to something diffusers loads; `demo` is the embedded tiny base."""
    if source == "demo":
        from sdlora.base.demo_base import demo_base_path

        return str(demo_base_path())
    return source


def load_base(source: str, torch_dtype: torch.dtype = torch.float32) -> Base:
    """Load `source` (hub id, diffusers folder, .safetensors file or `demo`) as a pipeline."""
    from diffusers import DiffusionPipeline

    _quiet_optional_dependency_notices()
    path = resolve_base_source(source)
    local = Path(path)
    if local.suffix.lower() in PICKLE_SUFFIXES:
        raise SdloraError(
            f"base {source!r} is a pickle checkpoint, which sdlora never unpickles; "
            "convert it to .safetensors first"
        )
    try:
        if local.is_file() and local.suffix.lower() in SINGLE_FILE_SUFFIXES:
            pipeline = _load_single_file(local, torch_dtype)
        elif local.is_dir():
            if not (local / "model_index.json").is_file():
                raise SdloraError(
                    f"base folder {source!r} has no model_index.json; "
                    "pass a diffusers pipeline folder, a .safetensors checkpoint or a hub id"
                )
            _refuse_pickle_weights(local, source)
            pipeline = DiffusionPipeline.from_pretrained(
                local, dtype=torch_dtype, use_safetensors=True, **_no_safety_checker(local)
            )
        elif not HUB_ID.fullmatch(path):
            raise SdloraError(
                f"base {source!r} not found: expected a diffusers folder or a .safetensors file"
            )
        else:
            # use_safetensors: a repository that only has pickle weights is refused, not run
            pipeline = DiffusionPipeline.from_pretrained(
                path, dtype=torch_dtype, use_safetensors=True
            )
    except SdloraError:
        raise
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SdloraError(f"cannot load base {source!r}: {first_line}") from error
    return describe_pipeline(pipeline, source)


def _quiet_optional_dependency_notices() -> None:
    """transformers announces on every load that image processors we never use would like
    torchvision; the notice is noise to our users, so its handler drops exactly that line."""
    import logging

    import transformers

    transformers.utils.logging.get_logger()  # sets up the library's handler
    for handler in logging.getLogger("transformers").handlers:
        if not any(isinstance(f, _TorchvisionNotice) for f in handler.filters):
            handler.addFilter(_TorchvisionNotice())


class _TorchvisionNotice:
    def filter(self, record) -> bool:
        return "requires torchvision" not in record.getMessage()


def describe_pipeline(pipeline, source: str = "") -> Base:
    """Wrap an already loaded pipeline, detecting its family and prediction type."""
    unet = getattr(pipeline, "unet", None)
    if unet is None or getattr(pipeline, "text_encoder", None) is None:
        raise SdloraError(
            f"base {source!r} is not a Stable Diffusion pipeline (SD 1.x, SD 2.x or SDXL)"
        )
    num_text_encoders = 2 if getattr(pipeline, "text_encoder_2", None) is not None else 1
    family = get_family(family_from_unet_config(unet.config, num_text_encoders))
    prediction_type = pipeline.scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise SdloraError(
            f"base {source!r} uses prediction type {prediction_type!r}; "
            "sdlora supports epsilon and v_prediction"
        )
    return Base(pipeline=pipeline, family=family, prediction_type=prediction_type, source=source)


def _refuse_pickle_weights(folder: Path, source: str) -> None:
    """A diffusers folder whose weights are pickle files only: one line, before diffusers
    (which would unpickle them without use_safetensors, and gives a long error with it)."""
    for component in sorted(child for child in folder.iterdir() if child.is_dir()):
        files = [path for path in component.iterdir() if path.is_file()]
        pickles = [path for path in files if path.suffix.lower() in PICKLE_SUFFIXES]
        if pickles and not any(path.suffix == ".safetensors" for path in files):
            raise SdloraError(
                f"base {source!r} holds pickle weights ({component.name}/{pickles[0].name}), "
                "which sdlora never unpickles; save the model with safetensors first"
            )


def _no_safety_checker(folder: Path) -> dict:
    index = json.loads((folder / "model_index.json").read_text())
    return {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}


def _load_single_file(path: Path, torch_dtype: torch.dtype):
    """Load an original-layout checkpoint; the family decides the pipeline class."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    if any(key.startswith("conditioner.embedders.1") for key in keys):
        pipeline_class = StableDiffusionXLPipeline
    elif any(key.startswith(("cond_stage_model.", "model.diffusion_model.")) for key in keys):
        pipeline_class = StableDiffusionPipeline
    else:
        raise SdloraError(
            f"{path} is not a Stable Diffusion checkpoint (no UNet or text-encoder keys found)"
        )
    return pipeline_class.from_single_file(str(path), dtype=torch_dtype)
