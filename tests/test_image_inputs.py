"""Reading --init-image / --mask inputs and checking img2img and hires options, before any
model loads: good files become InitImages, bad ones a one-line reason."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from sdlora.errors import SdloraError
from sdlora.render.init_images import (
    InitImage,
    check_image_options,
    fit_size,
    init_output_size,
    mask_from_image,
    read_init_images,
)


def save(path, size=(40, 24), mode="RGB", color=(200, 30, 30), **params):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **params)
    return path


def test_single_image_is_upright_rgb_named_after_its_file(tmp_path):
    # a 40x24 JPEG stored sideways with "rotate 90" in its EXIF: viewers show it 24x40
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path / "beach photo.jpg", exif=exif.tobytes())
    [init], refused = read_init_images(path)
    assert refused == []
    assert (init.name, init.size) == ("beach photo", (24, 40))
    image, mask = init.load()
    assert (image.mode, image.size, mask) == ("RGB", (24, 40), None)


def test_any_mode_becomes_rgb(tmp_path):
    path = save(tmp_path / "grey.png", mode="LA", color=(90, 0))  # fully transparent grey
    image, _ = read_init_images(path)[0][0].load()
    # transparency is composited on white, as for training images
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)


def test_mask_is_l_mode_white_repaints(tmp_path):
    path = save(tmp_path / "cat.png")
    mask_path = save(tmp_path / "cat-mask.png", mode="RGB", color=(255, 255, 255))
    [init], _ = read_init_images(path, mask_path)
    _, mask = init.load()
    assert mask.mode == "L" and mask.getextrema() == (255, 255)


def test_mask_with_transparency_uses_its_alpha():
    layer = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    layer.paste((255, 0, 0, 255), (0, 0, 4, 8))  # painted left half, transparent right half
    mask = np.asarray(mask_from_image(layer))
    assert (mask[:, :4] == 255).all() and (mask[:, 4:] == 0).all()


def test_mask_of_another_size_names_both_sizes(tmp_path):
    path = save(tmp_path / "cat.png", size=(40, 24))
    mask_path = save(tmp_path / "mask.png", size=(24, 40), mode="L", color=255)
    with pytest.raises(SdloraError, match=r"40x24.*mask\.png is 24x40") as error:
        read_init_images(path, mask_path)
    assert "\n" not in str(error.value)


def test_mask_folder_pairs_masks_by_file_stem(tmp_path):
    save(tmp_path / "photos" / "a.jpg")
    save(tmp_path / "photos" / "b.png")
    save(tmp_path / "photos" / "c.png")
    save(tmp_path / "masks" / "a.png", mode="L", color=255)
    save(tmp_path / "masks" / "b.webp", mode="L", color=0)
    images, refused = read_init_images(tmp_path / "photos", tmp_path / "masks")
    assert [(i.name, i.mask_path.name) for i in images] == [("a", "a.png"), ("b", "b.webp")]
    [missing] = refused
    assert missing.path.name == "c.png" and "no mask named 'c'" in missing.reason


def test_one_mask_file_applies_to_every_image_of_a_folder(tmp_path):
    save(tmp_path / "photos" / "a.png")
    save(tmp_path / "photos" / "b.png")
    mask = save(tmp_path / "mask.png", mode="L", color=255)
    images, refused = read_init_images(tmp_path / "photos", mask)
    assert [i.mask_path for i in images] == [mask, mask] and refused == []


def test_mixed_folder_returns_good_images_and_names_the_bad_ones(tmp_path):
    folder = tmp_path / "photos"
    save(folder / "good.png")
    save(folder / "also good.jpg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "fake.jpg").write_text("not a picture")
    truncated = save(tmp_path / "full.png", size=(64, 64)).read_bytes()
    (folder / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    (folder / "notes.txt").write_text("captions and notes are not inputs")
    (folder / ".hidden.png").write_bytes(b"")

    images, refused = read_init_images(folder)
    assert [image.name for image in images] == ["also good", "good"]
    reasons = {item.path.name: item.reason for item in refused}
    assert sorted(reasons) == ["empty.png", "fake.jpg", "truncated.png"]
    assert reasons["empty.png"] == "empty file"
    assert reasons["fake.jpg"].startswith("not an image")
    assert reasons["truncated.png"].startswith("unreadable")
    assert all("\n" not in str(item) for item in refused)


def test_two_files_with_one_stem_are_refused(tmp_path):
    # both would be written as cat.png
    save(tmp_path / "cat.jpg")
    save(tmp_path / "cat.png")
    save(tmp_path / "dog.png")
    images, refused = read_init_images(tmp_path)
    assert [image.name for image in images] == ["dog"]
    assert {item.path.name for item in refused} == {"cat.jpg", "cat.png"}
    assert "same name as cat.png" in next(i.reason for i in refused if i.path.name == "cat.jpg")


def write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.png", "does not exist"),
        (lambda d: d, "has no images"),
        (lambda d: write(d / "empty.png", b""), "empty file"),
        (lambda d: write(d / "fake.png", b"x"), "not an image"),
        (lambda d: write(d / "fake.png", b"x").parent, "no usable init image"),
    ],
    ids=["missing", "empty-folder", "empty-file", "not-an-image", "folder-of-bad-files"],
)
def test_unusable_input_is_one_line_error(tmp_path, make, message):
    with pytest.raises(SdloraError, match=message) as error:
        read_init_images(make(tmp_path))
    assert "\n" not in str(error.value)


def test_bad_mask_file_is_an_error_before_reading_images(tmp_path):
    save(tmp_path / "photos" / "a.png")
    (tmp_path / "mask.png").write_bytes(b"")
    with pytest.raises(SdloraError, match=r"mask .*mask\.png: empty file"):
        read_init_images(tmp_path / "photos", tmp_path / "mask.png")
    with pytest.raises(SdloraError, match="mask 'nowhere' does not exist"):
        read_init_images(tmp_path / "photos", "nowhere")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(strength=1.5), "--strength 1.5 must be between 0 and 1"),
        (dict(strength=-0.1), "--strength -0.1 must be between 0 and 1"),
        (dict(strength=math.nan), "--strength nan must be between 0 and 1"),
        (dict(init_image=None, strength=0.5), "--strength needs --init-image"),
        (dict(init_image=None, strength=None, mask="m.png"), "--mask needs --init-image"),
        (dict(init_image=None, strength=None, hires_scale=1.0), "above 1"),
        (dict(init_image=None, strength=None, hires_scale=0.5), "above 1"),
        (dict(init_image=None, strength=None, hires_scale=math.inf), "above 1"),
        (dict(init_image=None, strength=None, hires_scale=math.nan), "above 1"),
        (dict(init_image=None, strength=None, hires_scale=2, hires_strength=1.2), "between 0 and 1"),
        (dict(init_image=None, strength=None, hires_strength=0.5), "needs --hires-scale"),
        (dict(hires_scale=2), "--hires-scale upscales generated pictures"),
    ],
)
def test_bad_options_are_refused(options, message):
    given = dict(init_image="photos", mask=None, strength=0.5, hires_scale=None, hires_strength=None)
    with pytest.raises(SdloraError, match=message):
        check_image_options(**{**given, **options})


@pytest.mark.parametrize(
    "options",
    [
        dict(init_image=None, mask=None, strength=None, hires_scale=None, hires_strength=None),
        dict(init_image="a.png", mask="m.png", strength=0.0, hires_scale=None, hires_strength=None),
        dict(init_image="a.png", mask=None, strength=1.0, hires_scale=None, hires_strength=None),
        dict(init_image=None, mask=None, strength=None, hires_scale=1.5, hires_strength=0.0),
        dict(init_image=None, mask=None, strength=None, hires_scale=2, hires_strength=None),
    ],
)
def test_good_options_pass(options):
    check_image_options(**options)


def test_sizes_round_down_to_the_model_multiple_like_a1111():
    assert fit_size(1023, 767, 8) == (1016, 760)
    assert fit_size(512, 512, 8) == (512, 512)
    assert fit_size(5, 700, 8) == (8, 696)  # never below one multiple


def test_init_output_size():
    photo = (4000, 3000)
    assert init_output_size(photo, None, None, 8) == (4000, 3000)
    assert init_output_size((1023, 767), None, None, 8) == (1016, 760)
    assert init_output_size(photo, 512, 512, 8) == (512, 512)  # A1111's "Just resize"
    assert init_output_size(photo, 640, None, 8) == (640, 480)  # one side keeps the aspect
    assert init_output_size(photo, None, 600, 8) == (800, 600)


def test_file_that_breaks_after_the_check_is_a_one_line_error(tmp_path):
    path = save(tmp_path / "x.png")
    [init], _ = read_init_images(path)
    path.write_bytes(b"gone")
    with pytest.raises(SdloraError, match=r"x\.png: unreadable"):
        init.load()


def test_init_image_records_its_source(tmp_path):
    path = save(tmp_path / "x.png")
    assert read_init_images(path)[0] == [InitImage("x", path, (40, 24))]
