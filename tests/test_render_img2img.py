"""`sdlora render --init-image/--mask/--hires-scale` through the CLI: outputs named after their
inputs, bad inputs named while the good ones render, settings in the PNG, re-drawn from it."""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdlora.cli import main
from sdlora.render.png import parse_parameters, read_png_texts

FAST = ["--steps", "4", "--prompt", "a red house"]


def render(base, out, *extra) -> int:
    return main(["render", "--base", str(base), "--out", str(out), *FAST, *extra])


def picture(path, size=(64, 48), colour=(200, 40, 40)):
    Image.new("RGB", size, colour).save(path)
    return path


def fields(path) -> dict:
    return parse_parameters(read_png_texts(path)["parameters"])


def test_a_folder_of_photos_comes_out_named_after_them(tiny_sd1, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    picture(photos / "cat.png")
    picture(photos / "dog.jpg", colour=(40, 40, 200))
    (photos / "broken.png").write_bytes(b"not a picture")
    assert render(tiny_sd1, tmp_path / "out", "--init-image", str(photos), "--strength", "0.5") == 2
    error = capsys.readouterr().err
    assert "broken.png" in error and "could not be used" in error.strip().splitlines()[-1]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["cat.png", "dog.png"]
    cat = tmp_path / "out" / "cat.png"
    assert Image.open(cat).size == (64, 48)  # the photo's own size, a multiple of 8
    assert fields(cat)["Denoising strength"] == "0.5"

    # the PNG's own settings (its input included) draw the same picture again
    assert main(["render", "--base", str(tiny_sd1), "--prompts", str(cat),
                 "--out", str(tmp_path / "again")]) == 0
    (again,) = (tmp_path / "again").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(cat)))


def test_a_changed_photo_is_drawn_again_under_a_new_name(tiny_sd1, tmp_path):
    photo = picture(tmp_path / "cat.png")
    assert render(tiny_sd1, tmp_path / "out", "--init-image", str(photo)) == 0
    picture(photo, colour=(10, 200, 10))
    assert render(tiny_sd1, tmp_path / "out", "--init-image", str(photo)) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["cat-2.png", "cat.png"]


def test_inpainting_keeps_the_unmasked_part(tiny_sd1, tmp_path):
    photo = picture(tmp_path / "cat.png", size=(64, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(tmp_path / "mask.png")
    assert render(tiny_sd1, tmp_path / "out", "--init-image", str(photo), "--mask",
                  str(tmp_path / "mask.png"), "--strength", "1") == 0
    result = np.asarray(Image.open(tmp_path / "out" / "cat.png").convert("RGB"), dtype=float)
    source = np.asarray(Image.open(photo), dtype=float)
    assert np.abs(result[:, 48:] - source[:, 48:]).mean() < 2
    assert np.abs(result[:, :16] - source[:, :16]).mean() > 10
    assert fields(tmp_path / "out" / "cat.png")["Mask blur"] == "4"


def test_hires_fix_doubles_the_size_and_says_so(tiny_sd1, tmp_path):
    assert render(tiny_sd1, tmp_path, "--width", "32", "--height", "32",
                  "--hires-scale", "2", "--hires-strength", "0.5") == 0
    (path,) = tmp_path.glob("*.png")
    assert Image.open(path).size == (64, 64)
    found = fields(path)
    assert (found["Hires upscale"], found["Denoising strength"]) == ("2", "0.5")


def test_bad_image_options_are_one_line_errors(tiny_sd1, tmp_path, capsys):
    photo = picture(tmp_path / "cat.png")
    Image.new("L", (32, 32)).save(tmp_path / "small-mask.png")
    cases = [
        (["--init-image", str(photo), "--strength", "1.5"], "--strength"),
        (["--init-image", str(photo), "--strength", "nan"], "--strength"),
        (["--mask", str(photo)], "--mask needs --init-image"),
        (["--init-image", str(photo), "--mask", str(tmp_path / "small-mask.png")], "32x32"),
        (["--init-image", str(tmp_path / "missing.png")], "does not exist"),
        (["--hires-scale", "0.5"], "--hires-scale"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert render(tiny_sd1, tmp_path / "out", *extra) == 2, extra
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and message in error[0], (extra, error)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))
