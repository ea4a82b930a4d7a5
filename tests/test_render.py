"""`sdlora render` through the CLI on the tiny SD1 base: files, metadata, resume, prompt files,
grids, errors, and sharding across two processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import random_adapter
from PIL import Image

from sdlora.adapters.write import save_adapter
from sdlora.base.tiny import build_tiny_pipeline, tiny_scheduler
from sdlora.cli import main
from sdlora.render.png import parse_parameters, read_png_texts
from sdlora.render.schedulers import SAMPLERS, build_scheduler, get_sampler

FAST = ["--steps", "2", "--width", "64", "--height", "64"]


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory) -> Path:
    """style.safetensors and ink.safetensors (sd1), and xl.safetensors (sdxl)."""
    folder = tmp_path_factory.mktemp("adapters")
    sd1 = build_tiny_pipeline("sd1")
    save_adapter(random_adapter(sd1, "style", convs=True, seed=1), folder / "style.safetensors")
    save_adapter(random_adapter(sd1, "ink", seed=2), folder / "ink.safetensors")
    save_adapter(
        random_adapter(build_tiny_pipeline("sdxl"), "xl", seed=3), folder / "xl.safetensors"
    )
    return folder


def render(base, out, *extra) -> int:
    return main(["render", "--base", str(base), "--out", str(out), *FAST, *extra])


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_render_writes_pngs_with_settings_and_resumes(tiny_sd1, adapters_dir, tmp_path, capsys):
    style = adapters_dir / "style.safetensors"
    args = [
        "--prompt",
        "a red house <lora:ink:0.5>",
        "--negative",
        "blurry, dark",
        "--lora",
        f"{style}:0.8",
        "--adapters-dir",
        str(adapters_dir),
        "--seed",
        "7",
        "--batch",
        "2",
        "--scheduler",
        "dpm++_2m_karras",
    ]
    assert render(tiny_sd1, tmp_path, *args) == 0
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    assert files == ["00000-7.png", "00001-8.png"]

    texts = read_png_texts(tmp_path / "00001-8.png")
    fields = parse_parameters(texts["parameters"])
    assert fields["prompt"] == "a red house <lora:style:0.8> <lora:ink:0.5>"
    assert fields["negative"] == "blurry, dark"
    assert (fields["Steps"], fields["Sampler"], fields["Schedule type"]) == (
        "2",
        "DPM++ 2M",
        "Karras",
    )
    assert (fields["Seed"], fields["Size"], fields["CFG scale"]) == ("8", "64x64", "7")
    assert re.fullmatch(r"[0-9a-f]{10}", fields["Model hash"])
    assert re.fullmatch(r"style: [0-9a-f]{12}, ink: [0-9a-f]{12}", fields["Lora hashes"])
    settings = json.loads(texts["sdlora"])
    assert settings["loras"] == {"style": 0.8, "ink": 0.5}
    assert settings["prompt"] == "a red house" and settings["seed"] == 8

    first = pixels(tmp_path / "00000-7.png")
    (tmp_path / "00000-7.png").unlink()
    capsys.readouterr()
    assert render(tiny_sd1, tmp_path, *args) == 0
    assert "1 image written, 1 already there" in capsys.readouterr().err
    assert np.array_equal(pixels(tmp_path / "00000-7.png"), first)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    "suffix, content",
    [
        (".txt", "# comments and blank lines are skipped\n\na cat <lora:style:0.5>\na dog\n"),
        (
            ".jsonl",
            '{"prompt": "a cat", "loras": {"style": 0.5}, "seed": 40}\n\n'
            '{"prompt": "a dog", "negative": "ugly", "steps": 1, "cfg": 3}\n',
        ),
        (".csv", 'prompt,seed,loras,width\n"a cat, oil",40,style:0.5;ink:-1,\na dog,,,72\n'),
    ],
)
def test_prompt_files(tiny_sd1, adapters_dir, tmp_path, suffix, content):
    prompts = tmp_path / f"prompts{suffix}"
    prompts.write_text(content)
    out = tmp_path / "out"
    assert (
        render(
            tiny_sd1,
            out,
            "--prompts",
            str(prompts),
            "--adapters-dir",
            str(adapters_dir),
            "--seed",
            "3",
        )
        == 0
    )
    first, second = (json.loads(read_png_texts(p)["sdlora"]) for p in sorted(out.glob("*.png")))
    assert first["loras"]["style"] == 0.5 and "style" not in second["loras"]
    assert first["prompt_index"] == 0 and second["seed"] == 3 + 1  # --seed + row index
    if suffix == ".jsonl":
        assert first["seed"] == 40
        assert (second["negative"], second["steps"], second["cfg"]) == ("ugly", 1, 3.0)
    if suffix == ".csv":
        assert first["prompt"] == "a cat, oil" and first["loras"]["ink"] == -1.0
        assert second["width"] == 72 and Image.open(out / "00001-4.png").size == (72, 64)


def test_grid_image_has_a_cell_per_prompt_and_weight(tiny_sd1, adapters_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "out"
    assert (
        render(
            tiny_sd1,
            out,
            "--prompts",
            str(prompts),
            "--adapters-dir",
            str(adapters_dir),
            "--grid",
            "style=0,1",
            "--steps",
            "1",
        )
        == 0
    )
    cells = sorted(out.glob("0*.png"))
    assert len(cells) == 4  # 2 prompts x 2 weights, same seed along a row
    assert [json.loads(read_png_texts(c)["sdlora"])["loras"] for c in cells[:2]] == [
        {},
        {"style": 1.0},
    ]
    grid = pixels(out / "grid-style.png")
    assert grid.shape[0] > 2 * 64 and grid.shape[1] > 2 * 64
    assert np.array_equal(grid[-64:, -64:], pixels(cells[-1]))  # bottom right: a dog at style=1
    assert np.array_equal(grid[-128:-64, -128:-64], pixels(cells[0]))


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--prompt", "x <lora:nope:1>", "--adapters-dir", "{adapters}"],
            r"unknown adapter 'nope'.*available: ink, style, xl",
        ),
        (
            ["--prompt", "x <lora:style:heavy>", "--adapters-dir", "{adapters}"],
            r"'heavy' is not a number",
        ),
        (
            ["--prompt", "x", "--lora", "{adapters}/style.safetensors:abc"],
            r"weight 'abc'.*not a number",
        ),
        (
            ["--prompt", "x", "--lora", "{adapters}/style.safetensors:1@0.5-1"],
            r"a weight schedule goes in the prompt, as <lora:style:1@0.5-1>, with --lora ",
        ),
        (
            ["--prompt", "x", "--lora", "{adapters}/missing.safetensors"],
            r"missing.safetensors' not found",
        ),
        (
            ["--prompt", "x", "--lora", "{adapters}/xl.safetensors"],
            r"'xl' is for sdxl but the base is sd1",
        ),
        (["--prompts", "{prompts}"], r"prompts.jsonl:2: not valid JSON"),
        (["--prompt", "x", "--width", "100"], r"width 100 is not a positive multiple of 8"),
        (
            ["--prompt", "x", "--scheduler", "fastest"],
            r"unknown scheduler 'fastest'; choose one of: euler,",
        ),
        (["--prompt", "x", "--grid", "style"], r"--grid 'style' is not NAME=w1,w2"),
    ],
)
def test_errors_are_one_line_and_write_nothing(
    tiny_sd1, adapters_dir, tmp_path, capsys, extra, message
):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": broken}\n')
    extra = [e.format(adapters=adapters_dir, prompts=prompts) for e in extra]
    out = tmp_path / "out"
    assert render(tiny_sd1, out, *extra) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and re.search(message, error), error
    assert not list(out.glob("*.png"))


def test_unwritable_output_folder_fails_before_loading(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert (
        main(
            [
                "render",
                "--base",
                str(tmp_path / "no-model"),
                "--prompt",
                "x",
                "--out",
                str(blocker / "out"),
            ]
        )
        == 2
    )
    assert "is not writable" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_shard_prompts_and_match_one_process(tiny_sd1, adapters_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na bird <lora:ink:0.7>\na fish\na tree\n")
    args = [
        "render",
        "--base",
        str(tiny_sd1),
        "--prompts",
        str(prompts),
        *FAST,
        "--steps",
        "1",
        "--adapters-dir",
        str(adapters_dir),
        "--lora",
        f"{adapters_dir / 'style.safetensors'}:0.4",
    ]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    # Same thread count as this process: float sums split across threads round differently.
    environment = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parents[1]),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "sdlora",
            *args,
            "--out",
            str(tmp_path / "multi"),
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "process 1/2" in launched.stderr and "process 2/2" in launched.stderr
    single = sorted(p.name for p in (tmp_path / "single").glob("*.png"))
    assert sorted(p.name for p in (tmp_path / "multi").glob("*.png")) == single
    assert len(single) == 5
    for name in single:
        assert np.array_equal(
            pixels(tmp_path / "multi" / name), pixels(tmp_path / "single" / name)
        ), name


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_builds_from_the_base_config_and_steps(name):
    scheduler = build_scheduler(name, tiny_scheduler(prediction_type="v_prediction").config)
    assert scheduler.config.prediction_type == "v_prediction"  # the base's schedule carries over
    scheduler.set_timesteps(3)
    sample = torch.randn(1, 4, 8, 8) * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, timestep)
        sample = scheduler.step(torch.zeros_like(model_input), timestep, sample).prev_sample
    assert torch.isfinite(sample).all()
    assert get_sampler(name.replace("_", " ").upper()) is SAMPLERS[name]


def test_default_size_is_the_bases_native_size(tiny_sd1, tmp_path):
    """No --width/--height: the size the UNet was built for (64 px here), not SD1.5's 512."""
    code = main(["render", "--base", str(tiny_sd1), "--out", str(tmp_path), "--steps", "1",
                 "--prompt", "a cat"])
    assert code == 0
    (image,) = tmp_path.glob("*.png")
    assert Image.open(image).size == (64, 64)
