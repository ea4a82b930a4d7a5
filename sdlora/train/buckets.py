"""Aspect-ratio buckets: the training sizes, where each image goes, and how it is cropped.

A square crop throws away the sides of every wide or tall image and teaches the model to cut
heads off. Buckets instead train each image at a size near its own aspect ratio with about the
same pixel count as the square resolution R:

    make_buckets(512) -> [(256, 1024)?, ..., (384, 640), (448, 576), (512, 512), (576, 448), ...]

Every bucket is a (width, height) with both sides multiples of 64 (so the VAE latent, 1/8 of the
image, stays a multiple of 8 for the UNet's down-samplings), an area of at most R*R, sides
between `min_side` and `max_side`, and an aspect ratio of at most `max_aspect`.

An image is assigned the bucket nearest its aspect ratio, resized so it covers the bucket, and
cropped to it. `Placement` records what SDXL's size/crop conditioning needs, as (height, width)
and (top, left) pairs, exactly as diffusers' `add_time_ids` order them.

`BucketBatchSampler` then groups dataset indices into batches whose items share a bucket (so
they stack into one tensor), in an order that is a pure function of (seed, epoch): a run resumed
at step k of an epoch continues with exactly the batches the interrupted run would have seen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sdlora.errors import SdloraError

Size = tuple[int, int]  # (width, height) for buckets and PIL sizes


@dataclass(frozen=True)
class Placement:
    """How one image becomes one training sample of its bucket.

    `resized` is the (width, height) the image is resized to; the crop of `bucket` size is taken
    at `crop_top_left` of that resized image, after an optional horizontal flip of it.
    """

    original_size: tuple[int, int]  # (height, width) of the image as loaded (EXIF-rotated)
    resized: Size  # (width, height) after the covering resize
    bucket: Size  # (width, height) of the crop, i.e. the training size
    crop_top_left: tuple[int, int]  # (top, left) in the resized (and flipped, if so) image
    flipped: bool

    @property
    def target_size(self) -> tuple[int, int]:
        """(height, width) of the training sample."""
        return self.bucket[1], self.bucket[0]

    @property
    def crop_box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the crop in the resized image before flipping.

        Flipping mirrors the crop too: a crop at `left` in the flipped image is the same pixels as
        a crop at `resized_width - left - bucket_width` in the unflipped one, flipped.
        """
        top, left = self.crop_top_left
        if self.flipped:
            left = self.resized[0] - left - self.bucket[0]
        return left, top, left + self.bucket[0], top + self.bucket[1]


def make_buckets(
    resolution: int,
    min_side: int | None = None,
    max_side: int | None = None,
    max_aspect: float = 2.0,
    step: int = 64,
) -> list[Size]:
    """Kohya-style bucket sizes for a square `resolution`, sorted by aspect ratio (w/h).

    For each width (a multiple of `step` between min_side and max_side) the bucket takes the
    tallest height that keeps the area within resolution**2; buckets breaking the side or aspect
    limits are dropped. The square bucket (resolution rounded down to `step`) is always present.
    min_side defaults to resolution/2, max_side to 2*resolution.
    """
    if resolution < step or resolution % 8:
        raise SdloraError(
            f"resolution {resolution} must be a multiple of 8 and at least {step}"
        )
    min_side = resolution // 2 if min_side is None else min_side
    max_side = resolution * 2 if max_side is None else max_side
    if max_aspect < 1:
        raise SdloraError(f"max bucket aspect ratio {max_aspect} must be at least 1")
    max_area = resolution * resolution
    square = resolution // step * step
    found = {(square, square)}
    first_width = max(step, math.ceil(min_side / step) * step)
    for width in range(first_width, max_side + 1, step):
        height = min(max_side, max_area // width // step * step)
        if height < min_side or height < step:
            continue
        if max(width, height) / min(width, height) <= max_aspect:
            found.add((width, height))
            found.add((height, width))
    return sorted(found, key=lambda size: (size[0] / size[1], size[0]))


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest that of `size` (width, height).

    Distance is measured on log(w/h), so 1:2 and 2:1 are equally far from square; on a tie the
    larger bucket wins, keeping more pixels.
    """
    log_ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - log_ratio), -b[0] * b[1]))


def place(
    size: Size,
    bucket: Size,
    rng: random.Random | None = None,
    flip: bool = False,
) -> Placement:
    """Plan how an image of `size` (width, height) fills `bucket`; no pixels are touched.

    The image is scaled by max(bw/w, bh/h) so it covers the bucket, then cropped: centered when
    `rng` is None, at a uniformly random offset drawn from `rng` otherwise. With `flip`, the
    recorded crop position is the one in the flipped image, which is what the model sees.
    """
    width, height = size
    bucket_width, bucket_height = bucket
    scale = max(bucket_width / width, bucket_height / height)
    # round() may undershoot by one pixel on the covered side; the bucket side is the floor.
    resized = (max(bucket_width, round(width * scale)), max(bucket_height, round(height * scale)))
    spare_x, spare_y = resized[0] - bucket_width, resized[1] - bucket_height
    if rng is None:
        left, top = spare_x // 2, spare_y // 2
    else:
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    if flip:
        left = spare_x - left
    return Placement(
        original_size=(height, width),
        resized=resized,
        bucket=bucket,
        crop_top_left=(top, left),
        flipped=flip,
    )


def derived_rng(seed: int, *keys) -> random.Random:
    """An independent random stream for (seed, *keys), identical in every process and run.

    Seeding `random.Random` with a string hashes it with SHA-512, unaffected by PYTHONHASHSEED.
    """
    return random.Random("|".join(str(part) for part in (seed, *keys)))


class SampleKey(NamedTuple):
    """What the sampler hands the dataset per item: the epoch travels with the index, so
    per-epoch randomness (captions) is right even inside persistent DataLoader workers."""

    index: int
    epoch: int


class BucketBatchSampler:
    """Batches of dataset indices from one bucket each, reproducible from (seed, epoch).

    `bucket_of[i]` is index i's bucket. An epoch holds every index of `instance_indices` (all
    indices by default) once and, when `class_indices` (prior-preservation images) are given,
    as many class indices, taken in turn from a fixed shuffle of the class set, so the prior
    term keeps a 1:1 share however many class images there are (kohya does the same). Indices
    are shuffled within their bucket, cut into batches of `batch_size` (the last one of a bucket
    may be smaller unless `drop_last`), and the batches are shuffled.

    Use as a DataLoader `batch_sampler`; iteration yields lists of `SampleKey(index, epoch)`.
    Call `set_epoch(epoch, start_batch)` before each epoch; `start_batch` skips the batches a
    resumed run already trained on. `batches_for_epoch(epoch)` gives the plain index lists.
    """

    def __init__(
        self,
        bucket_of: Sequence[Hashable],
        batch_size: int,
        seed: int = 0,
        instance_indices: Sequence[int] | None = None,
        class_indices: Sequence[int] = (),
        drop_last: bool = False,
        stream: str = "",
    ):
        if batch_size < 1:
            raise SdloraError(f"batch size must be at least 1, got {batch_size}")
        self.bucket_of = list(bucket_of)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.stream = stream  # separates the draws of samplers sharing a seed
        if instance_indices is None:
            instance_indices = range(len(self.bucket_of))
        self.instance_indices = list(instance_indices)
        self.class_indices = list(class_indices)
        derived_rng(seed, stream, "class-order").shuffle(self.class_indices)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_indices(self, epoch: int) -> list[int]:
        """The dataset indices one epoch trains on, in no particular order."""
        count = len(self.instance_indices)
        if not self.class_indices:
            return list(self.instance_indices)
        first = epoch * count
        cycle = self.class_indices
        return self.instance_indices + [cycle[(first + k) % len(cycle)] for k in range(count)]

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        rng = derived_rng(self.seed, self.stream, "batches", epoch)
        by_bucket: dict[Hashable, list[int]] = {}
        for index in self.epoch_indices(epoch):
            by_bucket.setdefault(self.bucket_of[index], []).append(index)
        batches = []
        for bucket in sorted(by_bucket):  # sorted: dict order must not decide the random draws
            indices = sorted(by_bucket[bucket])
            rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for batch in self.batches_for_epoch(self.epoch)[self.start_batch :]:
            yield [SampleKey(index, self.epoch) for index in batch]

    def __len__(self) -> int:
        return max(0, len(self.batches_for_epoch(self.epoch)) - self.start_batch)
