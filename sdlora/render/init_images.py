"""Input images and masks for img2img and inpainting, checked before any model loads.

`--init-image PATH|DIR [--mask PATH|DIR]` -> `read_init_images` -> a list of `InitImage`
(one per picture to render, named after its file so that the output can be) and a list of
`Refused` (files that cannot be used, each with a one-line reason). A folder with some bad
files still yields its good ones, so the command renders those, names the others and exits
non-zero; a single bad file, an empty folder or bad options are a `SdloraError` at once.

Conventions (AUTOMATIC1111's):
- images are taken upright (EXIF orientation applied) and as RGB, whatever their mode;
- a mask is white where the picture is repainted and black where it is kept; a mask
  with transparent pixels uses its alpha (opaque = repaint), like a mask painted on a layer;
- a mask folder pairs masks with images by file stem (`photos/cat.jpg` <-> `masks/cat.png`);
  a single mask file applies to every image;
- sizes are rounded down to the model's multiple (8 for Stable Diffusion), as A1111 does
  (its latent size is `width // 8`) and as diffusers' VaeImageProcessor does.

Pixels are decoded here once to prove each file readable, then dropped: `InitImage.load()`
decodes again when the picture is rendered, so a folder of 500 photos does not sit in memory.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import ExifTags, Image, ImageOps

from sdlora.errors import SdloraError
from sdlora.train.dataset import to_rgb

# Formats a photo folder holds in practice, all readable by Pillow without plugins. Other
# files (captions, notes) are not inputs and are passed over.
INIT_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_STRENGTH = 0.75  # A1111's img2img "Denoising strength" default
DEFAULT_HIRES_STRENGTH = 0.7  # A1111's hires-fix "Denoising strength" default

_SIDEWAYS_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height

Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class InitImage:
    """One picture to render from: where it is, its upright size, and its mask if any."""

    name: str  # the input's file stem: the output is named after it
    path: Path
    size: Size  # upright (width, height)
    mask_path: Path | None = None

    def load(self) -> tuple[Image.Image, Image.Image | None]:
        """The RGB image (upright) and its L-mode mask (white = repaint) or None.

        Raises `SdloraError` when a file became unreadable since it was checked (a long
        batch outlives its inputs now and then)."""
        try:
            image = to_rgb(_open_upright(self.path))
            mask = mask_from_image(_open_upright(self.mask_path)) if self.mask_path else None
        except Exception as error:  # decoders fail in many ways; each one means "unusable"
            raise SdloraError(f"init image {self.path}: unreadable ({_first_line(error)})") from None
        return image, mask


@dataclass(frozen=True)
class Refused:
    """A file that cannot be used, and why (one line)."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def read_init_images(
    init: str | Path, mask: str | Path | None = None
) -> tuple[list[InitImage], list[Refused]]:
    """Find, decode and pair the init images (and masks) of `--init-image` / `--mask`.

    `init` is an image file or a folder of them (top level only, sorted by name); `mask` is
    None, one mask file, or a folder of masks named like the images. Returns the usable
    images and the refused files of a folder. Raises `SdloraError` for a missing path, a
    single unusable file, a folder without images, or a folder where nothing is usable.
    """
    init = Path(init)
    if not init.exists():
        raise SdloraError(f"init image {str(init)!r} does not exist")
    masks = _MaskSource(Path(mask)) if mask is not None else None
    if init.is_dir():
        return _read_folder(init, masks)
    image = _checked(init, masks)
    if isinstance(image, Refused):
        raise SdloraError(f"init image {image}")
    return [image], []


def mask_from_image(image: Image.Image) -> Image.Image:
    """Any mask picture -> L mode, white = repaint (see the module docstring for alpha)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
    return to_rgb(image).convert("L")


def fit_size(width: int, height: int, multiple: int) -> Size:
    """Round a size down to `multiple` (at least one multiple per side), as A1111 does."""
    return tuple(max(multiple, side // multiple * multiple) for side in (width, height))


def init_output_size(
    image_size: Size, width: int | None, height: int | None, multiple: int
) -> Size:
    """The size an init image is rendered at: the requested size when both sides are given
    (A1111's "Just resize", which stretches), the given side with the image's aspect ratio
    when one is, else the image's own size; rounded down to `multiple`."""
    image_width, image_height = image_size
    if width and not height:
        height = round(width * image_height / image_width)
    elif height and not width:
        width = round(height * image_width / image_height)
    elif not width and not height:
        width, height = image_width, image_height
    return fit_size(width, height, multiple)


def check_image_options(
    *,
    init_image: str | Path | None,
    mask: str | Path | None,
    strength: float | None,
    hires_scale: float | None,
    hires_strength: float | None,
) -> None:
    """Reject option combinations and values that cannot work, naming the flag to fix."""
    if mask is not None and init_image is None:
        raise SdloraError("--mask needs --init-image (the picture the mask paints into)")
    if strength is not None:
        if init_image is None:
            raise SdloraError(
                "--strength needs --init-image (the hires-fix strength is --hires-strength)"
            )
        _check_fraction(strength, "--strength", "0 keeps the image, 1 repaints it")
    if hires_strength is not None and hires_scale is None:
        raise SdloraError("--hires-strength needs --hires-scale")
    if hires_scale is not None:
        if init_image is not None:
            raise SdloraError(
                "--hires-scale upscales generated pictures; with --init-image, "
                "ask for the final size with --width/--height"
            )
        if not (math.isfinite(hires_scale) and hires_scale > 1):
            raise SdloraError(f"--hires-scale {hires_scale} must be a number above 1 (2 doubles)")
    if hires_strength is not None:
        _check_fraction(hires_strength, "--hires-strength", "0.3-0.7 adds detail")


def _check_fraction(value: float, flag: str, hint: str) -> None:
    if not 0 <= value <= 1:  # false for nan too
        raise SdloraError(f"{flag} {value} must be between 0 and 1 ({hint})")


class _MaskSource:
    """One mask file for every image, or a folder of masks found by image stem."""

    def __init__(self, path: Path):
        if not path.exists():
            raise SdloraError(f"mask {str(path)!r} does not exist")
        self.path = path
        self.by_stem: dict[str, list[Path]] = defaultdict(list)
        if path.is_dir():
            for candidate in _image_files(path):
                self.by_stem[candidate.stem].append(candidate)
        elif isinstance(refused := _probe(path), Refused):
            raise SdloraError(f"mask {refused}")

    def find(self, stem: str) -> Path | Refused:
        if not self.path.is_dir():
            return self.path
        found = self.by_stem.get(stem, [])
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(path.name for path in found)
            return Refused(self.path, f"several masks for {stem!r} ({names}); keep one")
        return Refused(self.path, f"no mask named {stem!r} in {self.path} (expected e.g. {stem}.png)")


def _read_folder(folder: Path, masks: _MaskSource | None) -> tuple[list[InitImage], list[Refused]]:
    files = _image_files(folder)
    if not files:
        suffixes = ", ".join(INIT_IMAGE_SUFFIXES)
        raise SdloraError(f"init image folder {str(folder)!r} has no images ({suffixes})")
    by_stem = defaultdict(list)
    for path in files:
        by_stem[path.stem].append(path)
    images, refused = [], []
    for path in files:
        twins = by_stem[path.stem]
        if len(twins) > 1:
            others = ", ".join(twin.name for twin in twins if twin != path)
            refused.append(
                Refused(path, f"same name as {others}; outputs are named after the file stem")
            )
            continue
        result = _checked(path, masks)
        (refused if isinstance(result, Refused) else images).append(result)
    if not images:
        shown = "; ".join(str(item) for item in refused[:3])
        more = f"; and {len(refused) - 3} more" if len(refused) > 3 else ""
        raise SdloraError(f"no usable init image in {str(folder)!r}: {shown}{more}")
    return images, refused


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.iterdir()
        if path.suffix.lower() in INIT_IMAGE_SUFFIXES
        and not path.name.startswith(".")
        and path.is_file()
    )


def _checked(path: Path, masks: _MaskSource | None) -> InitImage | Refused:
    """Decode `path` (and its mask) to prove them usable; a Refused says why not."""
    size = _probe(path)
    if isinstance(size, Refused):
        return size
    if masks is None:
        return InitImage(path.stem, path, size)
    mask_path = masks.find(path.stem)
    if isinstance(mask_path, Refused):
        return Refused(path, mask_path.reason)
    mask_size = _probe(mask_path)
    if isinstance(mask_size, Refused):
        return Refused(path, f"mask {mask_size}")
    if mask_size != size:
        return Refused(
            path,
            f"image is {size[0]}x{size[1]} but its mask {mask_path.name} is "
            f"{mask_size[0]}x{mask_size[1]}; masks must have the image's size",
        )
    return InitImage(path.stem, path, size, mask_path)


def _probe(path: Path) -> Size | Refused:
    """The upright size of a readable image, or why it cannot be read."""
    try:
        if path.stat().st_size == 0:
            return Refused(path, "empty file")
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))  # JPEG: fast
            image.load()
    except Image.UnidentifiedImageError:
        return Refused(path, "not an image (Pillow cannot identify it)")
    except Exception as error:  # decoders fail in many ways; each one means "unusable"
        return Refused(path, f"unreadable ({_first_line(error)})")
    return (height, width) if orientation in _SIDEWAYS_ORIENTATIONS else (width, height)


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _open_upright(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image)
