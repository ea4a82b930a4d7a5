"""The training images: found, verified, loaded as RGB, captioned and cut to their bucket.

    dataset = TrainingDataset("data/oil", "a painting in sks style", resolution=512, seed=0)
    sampler = dataset.batch_sampler(batch_size=4)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)

Two parts, so the training loop can cache what never changes:
- `dataset.image(index)`: the pixels and the SDXL size/crop conditioning. It is a pure function
  of the index and the seed (a random crop or flip is drawn once per image, not per epoch), so
  the loop may encode it with the VAE once and reuse the latent for the whole run.
- `dataset.caption(index, epoch)`: the caption after the per-epoch rules (dropout, tag
  shuffling), a pure function of (seed, epoch, index), so a resumed run sees the same captions.
`dataset[SampleKey(index, epoch)]` is both together, the item the DataLoader yields:

    pixel_values   float tensor (3, height, width) in [-1, 1]
    caption        str ("" when dropped for unconditional training)
    original_size  (height, width) of the image file, after EXIF rotation
    crop_top_left  (top, left) of the crop in the resized (and flipped) image
    target_size    (height, width) of the bucket, equal to pixel_values' size
    flipped        bool
    path           str
    is_class       bool, True for prior-preservation class images
    before_pixel_values, before_path   with `before_dir` only: the unstyled original, placed alike

Only the top level of a folder is read (subfolders often hold rejects or originals), files whose
names start with "." are ignored, and colour profiles are not applied (as in kohya's and
diffusers' trainers).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from sdlora.errors import SdloraError
from sdlora.train.buckets import (
    BucketBatchSampler,
    Placement,
    SampleKey,
    Size,
    derived_rng,
    make_buckets,
    nearest_bucket,
    place,
)
from sdlora.train.captions import (
    apply_caption_rules,
    read_caption_file,
    tag_frequency,
    with_trigger_word,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


# --- finding and loading images -------------------------------------------------------------


@dataclass(frozen=True)
class ScannedImage:
    path: Path
    size: Size  # (width, height) after EXIF rotation


@dataclass(frozen=True)
class ScanResult:
    images: list[ScannedImage]  # usable images, sorted by file name
    skipped: list[tuple[Path, str]]  # (path, reason) of image files that cannot be read


def scan_images(folder: str | Path, role: str = "image folder", allow_empty: bool = False) -> ScanResult:
    """Find and verify the images (.jpg .jpeg .png .webp, any case) at the top of `folder`.

    Each file is decoded once (JPEGs at 1/8 scale, which still reads every byte) so a corrupt
    or truncated file is reported here, once, instead of failing mid-training. `role` names the
    folder in error messages ("instance_dir", "class_dir"). A missing folder, or one without a
    usable image unless `allow_empty`, is a `SdloraError`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise SdloraError(f"{role} {folder} {what}")
    candidates = sorted(
        path
        for path in folder.iterdir()
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()
    )
    images, skipped = [], []
    for path in candidates:
        try:
            images.append(ScannedImage(path, _probe(path)))
        except Exception as error:  # decoders fail in many ways; each one means "unusable"
            skipped.append((path, _reason(error)))
    if skipped:
        listing = "; ".join(f"{path.name}: {reason}" for path, reason in skipped)
        logger.warning("skipped %d unreadable image file(s) in %s: %s", len(skipped), folder, listing)
    if not images and not allow_empty:
        raise SdloraError(f"no usable images in {folder} ({_empty_hint(folder, skipped)})")
    return ScanResult(images, skipped)


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image upright (EXIF orientation applied) as 8-bit RGB."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white (a transparent background is
    white in every viewer, and black would teach the model dark halos); 16-bit greys are scaled
    to 8 bits, where PIL's own conversion clips everything above 255 to white."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # Mode "I" holds 16-bit files (PNG, TIFF) in practice, so its range is taken as 0..65535.
        grey = np.clip(np.asarray(image).astype(np.float64), 0, 65535) / 257.0
        image = Image.fromarray(np.rint(grey).astype(np.uint8), mode="L")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _probe(path: Path) -> Size:
    """Decode `path` fully enough to prove it readable; return its upright (width, height)."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))  # no-op unless JPEG
        image.load()
        to_rgb(image)
    return (height, width) if orientation in _ROTATED_ORIENTATIONS else (width, height)


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _empty_hint(folder: Path, skipped: list[tuple[Path, str]]) -> str:
    if skipped:
        shown = ", ".join(f"{path.name}: {reason}" for path, reason in skipped[:3])
        more = ", ..." if len(skipped) > 3 else ""
        return f"{len(skipped)} files skipped: {shown}{more}"
    hint = f"expected {', '.join(IMAGE_SUFFIXES)} files"
    if any(child.is_dir() for child in folder.iterdir()):
        hint += "; images in subfolders are not read"
    return hint


# --- the dataset -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    path: Path
    caption: str  # before the per-epoch rules
    is_class: bool
    placement: Placement
    before: Path | None = None  # the unstyled original (data.before_dir), same size


class TrainingDataset(torch.utils.data.Dataset):
    """Instance images (and optional class images) ready for training; see the module docstring.

    `resolution` is the square side R (a multiple of 8). With `bucket`, images go to the
    aspect-ratio bucket nearest their own (`make_buckets(R, min_bucket_side, max_bucket_side,
    max_bucket_aspect)`); without, every image is cropped to an R x R square.
    """

    def __init__(
        self,
        instance_dir: str | Path,
        instance_prompt: str,
        *,
        resolution: int = 512,
        bucket: bool = True,
        min_bucket_side: int | None = None,
        max_bucket_side: int | None = None,
        max_bucket_aspect: float = 2.0,
        random_crop: bool = False,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        shuffle_tags: bool = False,
        keep_tokens: int = 1,
        trigger_word: str | None = None,
        class_dir: str | Path | None = None,
        class_prompt: str | None = None,
        before_dir: str | Path | None = None,
        seed: int = 0,
    ):
        if not 0.0 <= caption_dropout <= 1.0:
            raise SdloraError(f"caption_dropout must be between 0 and 1, got {caption_dropout}")
        if keep_tokens < 0:
            raise SdloraError(f"keep_tokens must be 0 or more, got {keep_tokens}")
        if class_dir is not None and not class_prompt:
            raise SdloraError("class_dir is set but class_prompt is empty; set both or neither")
        self.instance_dir = Path(instance_dir)
        self.resolution = resolution
        self.caption_dropout = caption_dropout
        self.shuffle_tags = shuffle_tags
        self.keep_tokens = keep_tokens
        self.seed = seed
        if bucket:
            self.buckets = make_buckets(resolution, min_bucket_side, max_bucket_side, max_bucket_aspect)
        elif resolution % 8:
            raise SdloraError(f"resolution {resolution} must be a multiple of 8")
        else:
            self.buckets = [(resolution, resolution)]
        self._random_crop = random_crop
        self._random_flip = random_flip

        self.samples: list[Sample] = []
        for scanned in scan_images(self.instance_dir, "instance_dir").images:
            file_caption = read_caption_file(scanned.path)
            caption = (
                instance_prompt if file_caption is None else with_trigger_word(file_caption, trigger_word)
            )
            self.samples.append(self._sample(scanned, caption, is_class=False))
        self.paired = before_dir is not None  # every instance image has its original
        if self.paired:
            self.samples = pair_with_originals(self.samples, before_dir)
        if class_dir is not None:
            for scanned in scan_images(class_dir, "class_dir").images:
                caption = read_caption_file(scanned.path) or class_prompt
                self.samples.append(self._sample(scanned, caption, is_class=True))

    def _sample(self, scanned: ScannedImage, caption: str, is_class: bool) -> Sample:
        bucket = nearest_bucket(scanned.size, self.buckets)
        # Keyed by file name, not index, so adding an image leaves the others' crops (and their
        # cached latents) as they were.
        key = ("class" if is_class else "instance", scanned.path.name)
        crop_rng = derived_rng(self.seed, "crop", *key) if self._random_crop else None
        flip = self._random_flip and derived_rng(self.seed, "flip", *key).random() < 0.5
        return Sample(scanned.path, caption, is_class, place(scanned.size, bucket, crop_rng, flip))

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> dict:
        """The deterministic part of an item: pixels (3, h, w) in [-1, 1] and the conditioning."""
        sample = self.samples[index]
        placement = sample.placement
        item = {
            "pixel_values": placed_pixels(sample.path, placement),
            "original_size": placement.original_size,
            "crop_top_left": placement.crop_top_left,
            "target_size": placement.target_size,
            "flipped": placement.flipped,
            "path": str(sample.path),
            "is_class": sample.is_class,
        }
        if sample.before is not None:
            item["before_pixel_values"] = placed_pixels(sample.before, placement)
            item["before_path"] = str(sample.before)
        return item

    def caption(self, index: int, epoch: int) -> str:
        """The caption of `index` in `epoch`; class captions stay as they are (the prior is
        learned from the exact prompt the class images were made with)."""
        sample = self.samples[index]
        if sample.is_class:
            return sample.caption
        rng = derived_rng(self.seed, "caption", epoch, index)
        return apply_caption_rules(
            sample.caption, rng, self.caption_dropout, self.shuffle_tags, self.keep_tokens
        )

    def __getitem__(self, key: SampleKey | tuple[int, int] | int) -> dict:
        """`dataset[SampleKey(index, epoch)]`; a plain int index means epoch 0."""
        index, epoch = key if isinstance(key, tuple) else (int(key), 0)
        return {**self.image(index), "caption": self.caption(index, epoch)}

    def batch_sampler(
        self, batch_size: int, kind: str = "mixed", drop_last: bool = False
    ) -> BucketBatchSampler:
        """Same-bucket batches of this dataset's indices. kind "mixed": every instance image
        and as many class images per epoch, in shared batches; "instance" or "class": one kind
        only, for a loop that batches class images separately."""
        instance = [i for i, sample in enumerate(self.samples) if not sample.is_class]
        classes = [i for i, sample in enumerate(self.samples) if sample.is_class]
        pools = {"mixed": (instance, classes), "instance": (instance, []), "class": (classes, [])}
        if kind not in pools:
            raise ValueError(f"kind must be one of {sorted(pools)}, got {kind!r}")
        chosen, prior = pools[kind]
        return BucketBatchSampler(
            [sample.placement.bucket for sample in self.samples],
            batch_size,
            seed=self.seed,
            instance_indices=chosen,
            class_indices=prior,
            drop_last=drop_last,
            stream=kind,
        )

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """Tags of the instance captions (trigger word included), for `ss_tag_frequency`."""
        captions = [sample.caption for sample in self.samples if not sample.is_class]
        return tag_frequency(captions, self.instance_dir.name)

    def describe(self) -> str:
        """One line for the log, e.g. "20 images (+100 class) in 3 buckets: 512x512 x12, ..."."""
        counts = Counter(f"{w}x{h}" for w, h in (sample.placement.bucket for sample in self.samples))
        num_class = sum(sample.is_class for sample in self.samples)
        extra = f" (+{num_class} class)" if num_class else ""
        if self.paired:
            extra += " paired with their originals"
        buckets = ", ".join(f"{name} x{count}" for name, count in sorted(counts.items()))
        return f"{len(self) - num_class} images{extra} in {len(counts)} buckets: {buckets}"


def placed_pixels(path: Path, placement: Placement) -> torch.Tensor:
    """The image at `path` resized, cropped and flipped as `placement` says: (3, h, w) in [-1, 1]."""
    image = load_rgb(path)
    if image.size != (placement.original_size[1], placement.original_size[0]):
        raise SdloraError(f"{path} changed size since it was scanned; restart training")
    image = image.resize(placement.resized, Image.Resampling.LANCZOS).crop(placement.crop_box)
    if placement.flipped:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0


def pair_with_originals(samples: list[Sample], before_dir: str | Path) -> list[Sample]:
    """Give each instance image its unstyled original: the file of `before_dir` with the same
    name up to the suffix (a.png may pair with a.jpg), of the same size."""
    originals: dict[str, ScannedImage] = {}
    for scanned in scan_images(before_dir, "before_dir").images:
        twin = originals.setdefault(scanned.path.stem, scanned)
        if twin is not scanned:
            raise SdloraError(f"data.before_dir has both {twin.path.name} and {scanned.path.name}: "
                              "keep one original per name")
    missing = [sample.path.name for sample in samples if sample.path.stem not in originals]
    if missing:
        raise SdloraError(f"data.before_dir {before_dir} has no original for {len(missing)} of the "
                          f"{len(samples)} training images (first: {missing[0]}); give each one "
                          "its unstyled picture under the same name")
    paired = []
    for sample in samples:
        original = originals[sample.path.stem]
        width, height = sample.placement.original_size[1], sample.placement.original_size[0]
        if original.size != (width, height):
            raise SdloraError(f"{original.path} is {original.size[0]}x{original.size[1]} but "
                              f"{sample.path} is {width}x{height}: a pair must be one picture, "
                              "before and after the style")
        paired.append(replace(sample, before=original.path))
    return paired


def collate(items: list[dict]) -> dict:
    """Stack `pixel_values` to (batch, 3, h, w); every other key becomes a list per batch."""
    batch = {key: [item[key] for item in items] for key in items[0]}
    batch["pixel_values"] = torch.stack(batch["pixel_values"])
    return batch
