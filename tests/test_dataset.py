"""The training data layer: reading images, captions, buckets, crops and the batch order."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.errors import SdloraError
from sdlora.train.buckets import BucketBatchSampler, make_buckets, nearest_bucket, place
from sdlora.train.captions import apply_caption_rules, tag_frequency
from sdlora.train.dataset import TrainingDataset, collate, load_rgb, scan_images


def solid(size, color=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def column_coded(width: int, height: int) -> Image.Image:
    """Each pixel says where it came from: red+green*256 = column, blue = row."""
    columns = np.arange(width)[None, :].repeat(height, 0)
    rows = np.arange(height)[:, None].repeat(width, 1)
    pixels = np.stack([columns % 256, columns // 256, rows], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def as_uint8(pixel_values: torch.Tensor) -> np.ndarray:
    """(3, h, w) in [-1, 1] -> (h, w, 3) uint8, inverting the dataset's scaling exactly."""
    return np.rint((pixel_values.permute(1, 2, 0).numpy() + 1.0) * 127.5).astype(np.int64)


# --- loading any image as RGB ----------------------------------------------------------------


def test_every_mode_loads_as_rgb_with_transparency_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # transparent black
    rgba.paste((200, 30, 30, 255), (0, 0, 4, 8))  # opaque red left half
    rgba.save(tmp_path / "rgba.png")
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "la.png")
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    palette.paste(1, (0, 0, 4, 8))
    palette.save(tmp_path / "p_transparent.png", transparency=0)
    palette.save(tmp_path / "p.png")
    Image.new("L", (8, 8), 100).save(tmp_path / "l.png")
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "grey16.png")
    Image.new("1", (8, 8), 1).save(tmp_path / "bilevel.png")

    def pixel(name, xy=(6, 4)):
        image = load_rgb(tmp_path / name)
        assert image.mode == "RGB" and image.size == (8, 8)
        return image.getpixel(xy)

    assert pixel("rgba.png", (1, 4)) == (200, 30, 30)
    assert pixel("rgba.png") == (255, 255, 255)
    assert pixel("la.png") == (255, 255, 255)
    assert pixel("p_transparent.png", (1, 4)) == (10, 200, 10)
    assert pixel("p_transparent.png") == (255, 255, 255)
    assert pixel("p.png") == (0, 0, 0)  # no transparency: the palette colour stays
    assert pixel("l.png") == (100, 100, 100)
    red, green, blue = pixel("cmyk.jpg")
    assert red < 10 and green > 245 and blue > 245  # full cyan ink is cyan
    assert all(abs(channel - 128) <= 1 for channel in pixel("grey16.png"))  # not clipped to white
    assert pixel("bilevel.png") == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    stored = solid((40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # mark the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)

    image = load_rgb(tmp_path / "rotated.jpg")
    assert image.size == (20, 40)
    top_right = image.getpixel((17, 2))  # clockwise, the top-left corner goes top-right
    assert top_right[0] > 200 and top_right[2] < 60
    assert image.getpixel((2, 2))[2] > 200
    assert scan_images(tmp_path).images[0].size == (20, 40)


# --- scanning a folder -----------------------------------------------------------------------


def test_scan_skips_unreadable_files_and_reports_each_once(tmp_path, caplog):
    solid((16, 16)).save(tmp_path / "good.PNG")
    buffer = tmp_path / "full.jpg"
    column_coded(64, 64).save(buffer)
    (tmp_path / "truncated.jpg").write_bytes(buffer.read_bytes()[:300])
    buffer.unlink()
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "good.txt").write_text("a caption, not an image")

    with caplog.at_level(logging.WARNING):
        result = scan_images(tmp_path)
    assert [image.path.name for image in result.images] == ["good.PNG"]
    assert sorted(path.name for path, _ in result.skipped) == ["notes.png", "truncated.jpg"]
    assert all(reason for _, reason in result.skipped)
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "notes.png" in warnings[0].getMessage()


def test_scan_errors_say_what_to_fix(tmp_path):
    with pytest.raises(SdloraError, match="instance_dir .*missing does not exist"):
        scan_images(tmp_path / "missing", "instance_dir")
    with pytest.raises(SdloraError, match="no usable images in .*expected .jpg"):
        scan_images(tmp_path)
    (tmp_path / "a.png").write_text("text")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(SdloraError, match=r"2 files skipped: a.png: .*b.jpg") as error:
        scan_images(tmp_path)
    assert "\n" not in str(error.value)


# --- captions --------------------------------------------------------------------------------


def make_dataset(folder, files: dict, prompt="a painting in sks style", **options):
    """files: name -> image (PIL) or caption text (str, for .txt files)."""
    folder.mkdir(exist_ok=True)
    for name, content in files.items():
        if isinstance(content, str):
            (folder / name).write_text(content, encoding="utf-8")
        else:
            content.save(folder / name)
    options.setdefault("resolution", 64)
    return TrainingDataset(folder, prompt, **options)


def test_captions_from_files_with_trigger_word_else_the_instance_prompt(tmp_path):
    files = {"a.png": solid((64, 64)), "b.png": solid((64, 64)), "c.png": solid((64, 64))}
    files["a.txt"] = "\ufeffsks, red hair,\n smiling  \n"  # BOM, newline, extra spaces
    files["c.txt"] = "blue dress, outdoors"
    dataset = make_dataset(tmp_path / "data", files, trigger_word="sks")
    assert [dataset.caption(i, epoch=0) for i in range(3)] == [
        "sks, red hair, smiling",
        "a painting in sks style",
        "sks, blue dress, outdoors",
    ]
    frequency = dataset.tag_frequency()
    assert list(frequency) == ["data"]
    assert frequency["data"] == {"sks": 2, "a painting in sks style": 1, "blue dress": 1,
                                 "outdoors": 1, "red hair": 1, "smiling": 1}


def test_caption_dropout_rate_matches_probability(tmp_path):
    dataset = make_dataset(tmp_path / "d", {"a.png": solid((64, 64))}, caption_dropout=0.3)
    dropped = sum(dataset.caption(0, epoch) == "" for epoch in range(3000))
    assert abs(dropped / 3000 - 0.3) < 0.03
    assert dataset.caption(0, 1) in ("", "a painting in sks style")


def test_shuffle_keeps_the_first_tags_in_place(tmp_path):
    files = {"a.png": solid((64, 64)), "a.txt": "sks, woman, red hair, hat, smiling, outdoors"}
    dataset = make_dataset(tmp_path / "d", files, shuffle_tags=True, keep_tokens=2)
    captions = {dataset.caption(0, epoch) for epoch in range(50)}
    assert len(captions) > 10  # actually shuffled
    for caption in captions:
        tags = caption.split(", ")
        assert tags[:2] == ["sks", "woman"]
        assert sorted(tags[2:]) == ["hat", "outdoors", "red hair", "smiling"]


def test_caption_randomness_depends_on_seed_epoch_index_only(tmp_path):
    files = {f"{n}.png": solid((64, 64)) for n in "abcd"}
    files.update({f"{n}.txt": "sks, one, two, three, four, five" for n in "abcd"})
    options = dict(shuffle_tags=True, caption_dropout=0.2, seed=7)
    first = make_dataset(tmp_path / "d", files, **options)
    second = TrainingDataset(tmp_path / "d", "prompt", resolution=64, **options)
    keys = [(index, epoch) for epoch in range(6) for index in range(4)]
    forward = [first.caption(i, e) for i, e in keys]
    backward = [second.caption(i, e) for i, e in reversed(keys)][::-1]
    assert forward == backward  # same seed, any call order: same captions
    assert len(set(forward)) > 5
    other_seed = TrainingDataset(tmp_path / "d", "prompt", resolution=64, **{**options, "seed": 8})
    assert [other_seed.caption(i, e) for i, e in keys] != forward


def test_caption_rules_alone():
    import random

    assert apply_caption_rules("a, b", random.Random(0), dropout=1.0) == ""
    assert apply_caption_rules("a, b, c", random.Random(0), keep_tokens=3, shuffle_tags=True) == "a, b, c"
    assert tag_frequency(["a, b", "b, b"], "set") == {"set": {"b": 2, "a": 1}}


# --- buckets, crops and the SDXL conditioning -------------------------------------------------


@pytest.mark.parametrize("resolution", [256, 512, 768, 1024])
def test_buckets_are_multiples_of_64_within_area_and_aspect(resolution):
    buckets = make_buckets(resolution)
    assert (resolution, resolution) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert width * height <= resolution**2
        assert max(width, height) / min(width, height) <= 2.0
        assert (height, width) in buckets
    assert len(buckets) >= 3


def test_sdxl_resolution_has_the_usual_buckets():
    buckets = make_buckets(1024)
    for size in [(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (832, 1216)]:
        assert size in buckets
    assert make_buckets(512, max_aspect=1.3) == [(448, 576), (512, 512), (576, 448)]


def test_wide_image_goes_to_a_wide_bucket_with_sdxl_sizes(tmp_path):
    dataset = make_dataset(tmp_path / "d", {"wide.png": column_coded(400, 200)}, resolution=256)
    item = dataset[0]
    assert nearest_bucket((400, 200), dataset.buckets) == (320, 192)
    assert item["target_size"] == (192, 320)
    assert item["pixel_values"].shape == (3, 192, 320)
    assert item["original_size"] == (200, 400)
    # resized by max(320/400, 192/200) = 0.96 to 384x192, centered: 32 px off each side
    assert item["crop_top_left"] == (0, 32)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert isinstance(item["caption"], str) and item["is_class"] is False


def test_no_bucket_means_a_square_center_crop(tmp_path):
    dataset = make_dataset(tmp_path / "d", {"wide.png": column_coded(400, 200)},
                           resolution=128, bucket=False)
    item = dataset.image(0)
    assert item["target_size"] == (128, 128)
    assert item["crop_top_left"] == (0, 64)  # resized to 256x128


@pytest.mark.parametrize("image_size, spare_axis", [((336, 192), "x"), ((320, 240), "y")])
def test_random_crop_and_flip_record_where_the_pixels_came_from(tmp_path, image_size, spare_axis):
    # Both sizes fit bucket 320x192 at scale 1, so pixel codes are exact source coordinates.
    width, height = image_size
    seen = set()
    for seed in range(12):
        dataset = make_dataset(tmp_path / f"s{seed}", {"img.png": column_coded(width, height)},
                               resolution=256, random_crop=True, random_flip=True, seed=seed)
        item = dataset.image(0)
        pixels = as_uint8(item["pixel_values"])
        top, left = item["crop_top_left"]
        source_column = pixels[0, 0, 0] + 256 * pixels[0, 0, 1]
        assert pixels[0, 0, 2] == top  # rows are never flipped
        # In the flipped image, column `left` is source column width - 1 - left.
        assert source_column == (width - 1 - left if item["flipped"] else left)
        assert item["target_size"] == (192, 320) and item["original_size"] == (height, width)
        spare = width - 320 if spare_axis == "x" else height - 192
        assert 0 <= (left if spare_axis == "x" else top) <= spare
        seen.add((item["flipped"], (left if spare_axis == "x" else top) != spare // 2))
    assert seen >= {(True, True), (False, True)}  # flipped and not, off-centre crops


def test_placement_of_a_flipped_center_crop_mirrors_the_offset():
    plain = place((101, 64), (64, 64))
    flipped = place((101, 64), (64, 64), flip=True)
    assert plain.crop_top_left == (0, 18) and flipped.crop_top_left == (0, 19)
    assert plain.crop_box == flipped.crop_box == (18, 0, 82, 64)


# --- batches ---------------------------------------------------------------------------------


def mixed_aspect_dataset(folder, count=11, **options):
    sizes = [(400, 200), (200, 400), (256, 256)]
    files = {f"{i:02d}.png": solid(sizes[i % 3], (i * 20, 0, 0)) for i in range(count)}
    return make_dataset(folder, files, resolution=256, **options)


def test_batches_share_a_bucket_and_cover_the_epoch(tmp_path):
    dataset = mixed_aspect_dataset(tmp_path / "d")
    sampler = dataset.batch_sampler(batch_size=2)
    for epoch in range(3):
        batches = sampler.batches_for_epoch(epoch)
        assert sorted(i for batch in batches for i in batch) == list(range(11))
        for batch in batches:
            assert len({dataset.samples[i].placement.bucket for i in batch}) == 1
    assert sampler.batches_for_epoch(0) != sampler.batches_for_epoch(1)


def test_batch_order_is_reproducible_and_resumable(tmp_path):
    bucket_of = [i % 3 for i in range(30)]
    sampler = BucketBatchSampler(bucket_of, batch_size=4, seed=3)
    same = BucketBatchSampler(bucket_of, batch_size=4, seed=3)
    assert sampler.batches_for_epoch(5) == same.batches_for_epoch(5)
    assert sampler.batches_for_epoch(5) != BucketBatchSampler(bucket_of, 4, seed=4).batches_for_epoch(5)

    sampler.set_epoch(2)
    full = list(sampler)
    resumed = BucketBatchSampler(bucket_of, batch_size=4, seed=3)
    resumed.set_epoch(2, start_batch=3)
    assert len(resumed) == len(full) - 3
    assert list(resumed) == full[3:]
    assert all(key.epoch == 2 for batch in full for key in batch)


def test_dataloader_yields_bucketed_batches_with_that_epochs_captions(tmp_path):
    dataset = mixed_aspect_dataset(tmp_path / "d", count=6, shuffle_tags=True)
    sampler = dataset.batch_sampler(batch_size=2)
    sampler.set_epoch(4)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == len(sampler.batches_for_epoch(4))
    for batch, indices in zip(batches, sampler.batches_for_epoch(4), strict=True):
        height, width = batch["target_size"][0]
        assert batch["pixel_values"].shape == (len(indices), 3, height, width)
        assert batch["caption"] == [dataset.caption(i, 4) for i in indices]


def test_class_images_join_each_epoch_one_for_one(tmp_path):
    for i in range(5):
        (tmp_path / "class").mkdir(exist_ok=True)
        solid((64, 64), (0, i * 40, 0)).save(tmp_path / "class" / f"c{i}.png")
    dataset = make_dataset(tmp_path / "inst", {"a.png": solid((64, 64)), "b.png": solid((64, 64))},
                           class_dir=tmp_path / "class", class_prompt="a painting",
                           caption_dropout=1.0)
    assert len(dataset) == 7
    class_index = next(i for i in range(7) if dataset.samples[i].is_class)
    item = dataset[(class_index, 3)]
    assert item["is_class"] is True and item["caption"] == "a painting"  # no dropout on class
    assert dataset[(0, 3)]["caption"] == ""
    sampler = dataset.batch_sampler(batch_size=1)
    seen_classes = set()
    for epoch in range(3):
        indices = [i for batch in sampler.batches_for_epoch(epoch) for i in batch]
        classes = [i for i in indices if dataset.samples[i].is_class]
        assert len(classes) == 2 and len(indices) == 4
        seen_classes.update(classes)
    assert len(seen_classes) == 5  # the class set is cycled through
    only_class = dataset.batch_sampler(batch_size=2, kind="class").batches_for_epoch(0)
    assert sorted(i for batch in only_class for i in batch) == list(range(2, 7))


def test_bad_options_are_refused(tmp_path):
    files = {"a.png": solid((64, 64))}
    with pytest.raises(SdloraError, match="caption_dropout"):
        make_dataset(tmp_path / "d", files, caption_dropout=1.5)
    with pytest.raises(SdloraError, match="multiple of 8"):
        make_dataset(tmp_path / "d", files, resolution=100)
    with pytest.raises(SdloraError, match="class_prompt"):
        make_dataset(tmp_path / "d", files, class_dir=tmp_path / "d")
