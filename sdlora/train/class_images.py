"""DreamBooth prior preservation: make sure the class folder holds enough class images.

Missing images are generated with the base pipeline itself ("a photo of a dog" from the model
that is about to learn "a photo of sks dog"), so training can keep the model's idea of the
class while it learns the instance.

Generation is reproducible and resumable:
- image i is `class_{i:05d}.png`, written atomically (temp file, then rename), so a killed run
  leaves only whole images and a re-run generates just the missing ones;
- image i starts from its own noise seed, derived from (seed, i), and is always generated in
  the same batch, indices [k*batch_size, (k+1)*batch_size). The batch matters: the same noise in
  a batch of another size gives slightly different pixels, so filling one hole re-runs that
  hole's whole batch and keeps only the missing image, pixel-identical to the one lost.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdlora.files import atomic_write
from sdlora.train.dataset import scan_images


def class_image_name(index: int) -> str:
    return f"class_{index:05d}.png"


def image_seed(seed: int, index: int) -> int:
    """The noise seed of class image `index`: independent streams per image, stable forever."""
    digest = hashlib.sha256(f"sdlora-class|{seed}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def ensure_class_images(
    pipeline,
    class_dir: str | Path,
    class_prompt: str,
    num_images: int,
    batch_size: int = 4,
    seed: int = 0,
    resolution: int | None = None,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    show_progress: bool = True,
) -> list[Path]:
    """Generate what `class_dir` lacks of `num_images` usable images; return `num_images` paths.

    Images already in the folder count, whatever their names (a user's own class photos are
    used as they are); generated ones fill the lowest free `class_{i:05d}.png` names.
    `pipeline` is a loaded SD 1.x/2.x or SDXL diffusers pipeline, on whatever device it is;
    `resolution` defaults to the UNet's native size.
    """
    class_dir = Path(class_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    for stale in class_dir.glob(".class_*.tmp"):  # left by a killed run
        stale.unlink()
    usable = {scanned.path.name for scanned in scan_images(class_dir, "class_dir", allow_empty=True).images}
    missing = _missing_indices(usable, num_images)
    if missing:
        _generate(pipeline, class_dir, class_prompt, missing, num_images, batch_size, seed,
                  resolution, num_inference_steps, guidance_scale, show_progress)
    return [scanned.path for scanned in scan_images(class_dir, "class_dir").images][:num_images]


def _missing_indices(usable_names: set[str], num_images: int) -> list[int]:
    """The lowest indices whose file is absent or unreadable, as many as images are lacking.

    All are below num_images: at most len(usable) of the range is taken, and len(usable) plus
    the lacking count is num_images.
    """
    lacking = num_images - len(usable_names)
    free = (i for i in range(num_images) if class_image_name(i) not in usable_names)
    return [next(free) for _ in range(max(0, lacking))]


def _generate(pipeline, class_dir, prompt, missing, num_images, batch_size, seed, resolution,
              steps, guidance_scale, show_progress) -> None:
    if resolution is None:
        resolution = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    groups: dict[int, list[int]] = {}
    for index in missing:
        groups.setdefault(index // batch_size, []).append(index)
    progress = tqdm(total=len(missing), desc="class images", unit="image", disable=not show_progress)
    # The pipeline's own per-step bar would interleave with ours; restore the user's setting after.
    previous_bar_config = dict(getattr(pipeline, "_progress_bar_config", {}))
    pipeline.set_progress_bar_config(disable=True)
    try:
        for group, wanted in groups.items():
            indices = range(group * batch_size, min((group + 1) * batch_size, num_images))
            generators = [torch.Generator("cpu").manual_seed(image_seed(seed, i)) for i in indices]
            images = pipeline(
                prompt=[prompt] * len(indices),
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                generator=generators,
            ).images
            for index, image in zip(indices, images, strict=True):
                if index in wanted:
                    atomic_write(class_dir / class_image_name(index),
                                 lambda temp, im=image: im.save(temp, format="PNG"))
                    progress.update(1)
    finally:
        progress.close()
        pipeline._progress_bar_config = previous_bar_config
