"""The Train tab's newer features in a real browser, each on a run of a few steps of the tiny
preset: the advanced settings reach the run, the loss chart draws the steps, a second run waits
its turn, before/after originals train a paired run, and the adapter shows as a card."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageOps
from playwright.sync_api import expect
from test_browser import set_number

from sdlora.adapters.metadata import CONFIG_KEY
from sdlora.adapters.read import load_adapter

RUN = 240_000  # ms: a run of a few steps, the base loaded first
COLOURS = ((200, 40, 40), (40, 40, 200))


def pictures(folder: Path, names=("painting0", "painting1"), size=64, shade=0) -> list[str]:
    """Two flat pictures named `names`; `shade` makes another version of the same ones."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, colour in zip(names, COLOURS):
        path = folder / f"{name}.png"
        Image.new("RGB", (size, size), tuple(min(255, c + shade) for c in colour)).save(path)
        paths.append(str(path))
    return paths


def fill_form(page, uploads: list[str], name: str, steps: int) -> None:
    """The Train tab with `uploads` uploaded, a name, the trigger word zxq, `steps` and rank 4."""
    page.get_by_role("tab", name="Train").click()
    page.locator("#uploads input[type=file]").set_input_files(uploads)
    page.locator(f'#uploads [aria-label="{Path(uploads[-1]).name}"]').wait_for()
    page.locator("#name textarea").fill(name)
    page.locator("#trigger textarea").fill("zxq")
    set_number(page, "train-steps", steps)
    set_number(page, "rank", 4)


def choose(page, element_id: str, option: str) -> None:
    page.locator(f"#{element_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()
    expect(page.locator(f"#{element_id} input")).to_have_value(option)


def finished(page) -> str:
    status = page.locator("#train-status")
    expect(status).to_contain_text(re.compile(r"finished|failed|cancelled"), timeout=RUN)
    text = status.inner_text()
    assert "finished" in text, text
    return text


def run_config(adapters: Path, name: str) -> dict:
    return yaml.safe_load((adapters / name / f"{name}.config.yaml").read_text(encoding="utf-8"))


def adapter_metadata(adapters: Path, name: str) -> dict[str, str]:
    return load_adapter(adapters / name / f"{name}.safetensors").metadata


def test_advanced_settings_reach_the_run(page, tmp_path, adapters_dir):
    fill_form(page, pictures(tmp_path, size=96), "advanced-style", steps=2)
    page.get_by_text("Advanced (blank: the preset's)").click()
    set_number(page, "learning-rate", 0.0005)
    set_number(page, "resolution", 96)
    choose(page, "targets", "transformer")
    choose(page, "text-encoder", "train")
    page.locator("#start").click()
    finished(page)

    config = run_config(adapters_dir, "advanced-style")
    assert config["train"]["learning_rate"] == 0.0005  # the preset's is 1e-3
    assert config["data"]["resolution"] == 96  # the preset's is 64
    assert config["lora"]["targets"] == "transformer"  # the default is attention
    assert config["lora"]["text_encoder"] is True  # the default is frozen
    metadata = adapter_metadata(adapters_dir, "advanced-style")
    assert (metadata["ss_learning_rate"], metadata["ss_resolution"]) == ("0.0005", "(96, 96)")
    assert json.loads(metadata[CONFIG_KEY])["lora"]["text_encoder"] is True
    layers = load_adapter(adapters_dir / "advanced-style" / "advanced-style.safetensors").layers
    assert any(path.startswith("text_encoder.") for path in layers)


def test_the_loss_chart_draws_a_point_per_step(page, tmp_path):
    fill_form(page, pictures(tmp_path), "chart-style", steps=4)
    page.locator("#start").click()
    status = finished(page)
    chart = page.locator("#loss-chart")
    points = chart.locator('[aria-roledescription="point"]')
    expect(points).to_have_count(4)
    labels = [point.get_attribute("aria-label") for point in points.all()]
    matches = [re.fullmatch(rf"step: {step}; loss: ([\d.]+)", label)
               for step, label in zip(range(1, 5), labels)]
    assert all(matches), labels  # each step's point holds its loss
    losses = [float(match.group(1)) for match in matches]
    last = re.search(r"step 4 / 4, loss ([\d.]+)", status).group(1)
    assert f"{losses[-1]:.4f}" == last  # the chart's last point is the loss the status shows
    # numbers on numeric axes: a curve, not the losses as categories in rank order
    expect(chart.locator('[aria-roledescription="axis"]').last).to_have_attribute(
        "aria-label", re.compile(r"Y-axis titled 'loss' for a linear scale"))


def test_a_second_run_waits_its_turn_then_trains(page, browser, ui_url, tmp_path):
    fill_form(page, pictures(tmp_path / "first"), "queue-first", steps=10_000)
    page.locator("#start").click()
    expect(page.locator("#train-status")).to_contain_text(re.compile(r"step \d+ / 10000"),
                                                          timeout=RUN)
    # the chart draws while a run trains, not only when it ends
    expect(page.locator('#loss-chart [aria-roledescription="point"]').first).to_be_attached()
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        other = context.new_page()
        other.set_default_timeout(60_000)
        other.goto(ui_url)
        fill_form(other, pictures(tmp_path / "second"), "queue-second", steps=2)
        other.locator("#start").click()
        waiting = other.locator("#train-status")
        expect(waiting).to_contain_text("queue-second: waiting for 1 run(s) before it to finish")
        page.locator("#cancel").click()
        expect(page.locator("#train-status")).to_contain_text("cancelled at step", timeout=RUN)
        assert "step 2 / 2" in finished(other)
    finally:
        context.close()


def test_originals_train_a_paired_run(page, tmp_path, adapters_dir, capfd):
    fill_form(page, pictures(tmp_path / "styled"), "paired-style", steps=2)
    page.get_by_text("Optional: the same pictures without the style").click()
    originals = pictures(tmp_path / "originals", shade=40)
    page.locator("#before-uploads input[type=file]").set_input_files(originals)
    page.locator('#before-uploads [aria-label="painting1.png"]').wait_for()
    page.locator("#start").click()
    finished(page)

    before_dir = Path(run_config(adapters_dir, "paired-style")["data"]["before_dir"])
    assert before_dir == adapters_dir / "paired-style" / "originals"
    assert sorted(path.name for path in before_dir.iterdir()) == ["painting0.png", "painting1.png"]
    config = json.loads(adapter_metadata(adapters_dir, "paired-style")[CONFIG_KEY])
    assert config["data"]["before_dir"] == "originals"  # kept relative to the run folder
    assert "2 images paired with their originals in 1 buckets" in capfd.readouterr().out


def test_originals_of_other_names_are_refused_in_one_line(page, tmp_path, adapters_dir):
    fill_form(page, pictures(tmp_path / "styled"), "unpaired-style", steps=2)
    page.get_by_text("Optional: the same pictures without the style").click()
    originals = pictures(tmp_path / "originals", names=("photo0", "photo1"))
    page.locator("#before-uploads input[type=file]").set_input_files(originals)
    page.locator('#before-uploads [aria-label="photo1.png"]').wait_for()
    page.locator("#start").click()
    error = page.get_by_text(re.compile(r"^no original for 2 of the 2 images \(first: painting0"))
    expect(error).to_be_visible()  # at once, before the run queues
    assert "\n" not in error.inner_text()
    expect(page.locator("#train-status")).to_contain_text("No training run yet.")
    assert not (adapters_dir / "unpaired-style").exists()


def test_the_finished_adapter_shows_as_a_card_with_its_preview(page, tmp_path, adapters_dir):
    fill_form(page, pictures(tmp_path), "card-style", steps=4)
    page.locator("#start").click()
    finished(page)

    page.get_by_role("tab", name="Generate").click()  # no Refresh: the run updated the cards
    card = page.locator("#adapter-cards img[alt^='card-style · sd1']")
    expect(card).to_have_attribute("alt", "card-style · sd1 · rank 4 · 4 steps · trigger: zxq")
    response = page.request.get(card.get_attribute("src"))
    assert response.ok
    shown = np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"), dtype=float)
    with Image.open(adapters_dir / "card-style" / "validation" / "step-000004.png") as grid:
        expected = np.asarray(ImageOps.fit(grid.convert("RGB"), shown.shape[1::-1]), dtype=float)
    assert np.abs(shown - expected).mean() < 8  # the newest validation grid, not a name tile
