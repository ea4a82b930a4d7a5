"""`sdlora render` never hands back a picture made with other settings: a file is re-used only
when its recorded settings are the request's; seeds -1 are drawn and recorded; every flag that
changes the picture reaches it and its PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
from factories import random_adapter
from PIL import Image

from sdlora.adapters.write import save_adapter
from sdlora.base.tiny import build_tiny_pipeline
from sdlora.cli import main
from sdlora.render.png import parse_parameters, read_png_texts

FAST = ["--steps", "2", "--width", "64", "--height", "64", "--prompt", "a red house"]


@pytest.fixture(scope="module")
def style(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapters") / "style.safetensors"
    save_adapter(random_adapter(build_tiny_pipeline("sd1"), "style", seed=1), path)
    return path


def render(base, out, *extra) -> int:
    return main(["render", "--base", str(base), "--out", str(out), *FAST, *extra])


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def record(path) -> dict:
    return json.loads(read_png_texts(path)["sdlora"])


def test_a_changed_weight_gets_a_new_file_and_a_rerun_reuses_it(tiny_sd1, style, tmp_path, capsys):
    assert render(tiny_sd1, tmp_path, "--lora", f"{style}:0.5") == 0
    first = pixels(tmp_path / "00000-0.png")
    assert render(tiny_sd1, tmp_path, "--lora", f"{style}:1.0") == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00000-0-2.png", "00000-0.png"]
    assert np.array_equal(pixels(tmp_path / "00000-0.png"), first)  # the old picture is kept
    assert record(tmp_path / "00000-0-2.png")["loras"] == {"style": 1.0}
    assert not np.array_equal(pixels(tmp_path / "00000-0-2.png"), first)

    capsys.readouterr()
    assert render(tiny_sd1, tmp_path, "--lora", f"{style}:1.0") == 0
    assert "0 images written, 1 already there" in capsys.readouterr().err
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_a_grid_never_shows_a_cell_of_other_settings(tiny_sd1, style, tmp_path):
    assert render(tiny_sd1, tmp_path, "--lora", str(style), "--grid", "style=0,1") == 0
    assert render(tiny_sd1, tmp_path, "--lora", str(style), "--grid", "style=0,1",
                  "--cfg", "3") == 0
    grids = sorted(tmp_path.glob("grid-style*.png"))
    assert [p.name for p in grids] == ["grid-style-2.png", "grid-style.png"]
    cells = record(grids[0])["grid"][0]
    assert all(record(tmp_path / cell)["cfg"] == 3 for cell in cells)


def test_seed_minus_one_draws_a_seed_and_records_it(tiny_sd1, tmp_path, capsys):
    assert render(tiny_sd1, tmp_path, "--seed", "-1") == 0
    drawn = int(capsys.readouterr().err.split("random seed ")[1].split()[0])
    (path,) = tmp_path.glob("*.png")
    assert path.name == f"00000-{drawn}.png"
    assert parse_parameters(read_png_texts(path)["parameters"])["Seed"] == str(drawn)


def test_block_and_component_weights_reach_the_picture_and_the_png(tiny_sd1, style, tmp_path):
    assert render(tiny_sd1, tmp_path / "plain", "--lora", str(style)) == 0
    assert render(tiny_sd1, tmp_path / "parts", "--lora", str(style),
                  "--block-weights", "style=te=0,up=0.5") == 0
    (plain,), (parts,) = (tmp_path / "plain").glob("*.png"), (tmp_path / "parts").glob("*.png")
    assert not np.array_equal(pixels(plain), pixels(parts))
    fields = parse_parameters(read_png_texts(parts)["parameters"])
    assert "<lora:style:0:1>" in fields["prompt"]
    assert fields["Lora block weights"] == "style: up=0.5"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cfg", "nan"], "CFG scale must be a finite number"),
        (["--seed", str(2**64)], "seed must be"),
        (["--clip-skip", "0"], "clip skip must be"),
        (["--block-weights", "style=down.x=1"], "unknown block"),
        (["--block-weights", "style=1,2,3"], "block-weight vector"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--height", "1000000"], "larger than 8192"),
    ],
)
def test_bad_flags_are_one_line_errors(tiny_sd1, style, tmp_path, capsys, extra, message):
    assert render(tiny_sd1, tmp_path, "--lora", str(style), *extra) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
    assert not list(tmp_path.glob("*.png"))
