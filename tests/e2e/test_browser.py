"""The web UI in a real browser: tick an adapter, move its slider, generate, compare images."""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image
from playwright.sync_api import expect
from ui_server import ARTIFACTS, serve


def set_number(page, element_id: str, value) -> None:
    """Type into a slider's or number's box and leave it, as a user does."""
    box = page.locator(f"#{element_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def generate(page) -> np.ndarray:
    """Click Generate and return the pixels of the image the gallery then shows."""
    before = gallery_source(page)
    page.locator("#generate").click()
    page.wait_for_function(
        "before => { const img = document.querySelector('#gallery img');"
        " return img && img.complete && img.naturalWidth > 0 && img.src !== before; }",
        arg=before,
    )
    response = page.request.get(page.locator("#gallery img").first.get_attribute("src"))
    assert response.ok
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


def gallery_source(page) -> str | None:
    image = page.locator("#gallery img").first
    return image.get_attribute("src") if image.count() else None


def small_fast_settings(page) -> None:
    for element_id, value in (("steps", 3), ("width", 64), ("height", 64), ("seed", 7)):
        set_number(page, element_id, value)


def test_slider_weight_changes_the_generated_image(page):
    page.get_by_label("Render on release").uncheck()  # only Generate renders here
    page.get_by_label("oil").check()
    page.locator("#weight-oil").wait_for()
    page.locator("#prompt textarea").fill("a lighthouse")
    page.locator("#add-words-oil").click()
    page.wait_for_function(
        "() => document.querySelector('#prompt textarea').value === 'a lighthouse, sks, oil paint'"
    )
    small_fast_settings(page)

    set_number(page, "weight-oil", 0)
    at_zero = generate(page)
    assert "<lora:oil" not in page.locator("#settings textarea").input_value()
    set_number(page, "weight-oil", 1)
    at_one = generate(page)
    settings = page.locator("#settings textarea").input_value()
    assert "<lora:oil:1>" in settings and "Seed: 7" in settings and "Size: 64x64" in settings

    assert at_zero.shape == at_one.shape == (64, 64, 3)
    assert np.abs(at_zero.astype(int) - at_one.astype(int)).max() > 0

    page.locator("#show-command").click()
    expect(page.locator("#command textarea")).to_have_value(re.compile(r"^sdlora render "))
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-generate.png"), full_page=True)


def test_letting_go_of_a_slider_renders_without_generate(page):
    page.get_by_label("oil").check()
    page.locator("#prompt textarea").fill("a lighthouse")
    small_fast_settings(page)
    weight = page.locator("#weight-oil input[type=range]")
    box = weight.bounding_box()
    weight.click(position={"x": box["width"] * 0.25, "y": box["height"] / 2})  # press, let go
    page.wait_for_function("() => document.querySelector('#gallery img')")
    chosen = float(page.locator("#weight-oil input[type=number]").input_value())
    assert chosen != 1.0
    expect(page.locator("#settings textarea")).to_have_value(
        re.compile(re.escape(f"<lora:oil:{chosen:g}>"))
    )

    page.get_by_label("Render on release").uncheck()
    shown = gallery_source(page)
    weight.click(position={"x": box["width"] * 0.75, "y": box["height"] / 2})
    page.wait_for_timeout(3000)
    assert gallery_source(page) == shown


def start_training(page, folder, name: str, steps: int) -> None:
    """Upload two images on the Train tab and start a run of `steps` steps."""
    uploads = []
    for index, colour in enumerate(((200, 40, 40), (40, 40, 200))):
        path = folder / f"painting{index}.png"
        Image.new("RGB", (64, 64), colour).save(path)
        uploads.append(str(path))
    page.get_by_role("tab", name="Train").click()
    page.locator("#uploads input[type=file]").set_input_files(uploads)
    page.locator('#uploads [aria-label="painting1.png"]').wait_for()
    page.locator("#name textarea").fill(name)
    page.locator("#trigger textarea").fill("zxq")
    set_number(page, "train-steps", steps)
    set_number(page, "rank", 4)
    page.locator("#start").click()


def test_training_from_uploads_shows_progress_and_adds_the_adapter(page, tmp_path):
    start_training(page, tmp_path, "browser-style", steps=4)

    status = page.locator("#train-status")
    status.get_by_text("finished").wait_for(timeout=240_000)
    assert "step 4 / 4" in status.inner_text()
    assert page.locator("#validation img").count() == 2  # the grids of steps 2 and 4
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-train.png"), full_page=True)

    page.get_by_role("tab", name="Generate").click()
    page.locator("#adapters").get_by_label("browser-style").check()
    page.locator("#adapter-browser-style").get_by_text("zxq").wait_for()


def test_cancel_stops_training_and_keeps_the_checkpoint(page, tmp_path):
    start_training(page, tmp_path, "cancelled-style", steps=10_000)
    status = page.locator("#train-status")
    expect(status).to_contain_text(re.compile(r"step \d+ / 10000, loss .*, ETA"), timeout=240_000)
    page.locator("#cancel").click()
    expect(status).to_contain_text("cancelled at step", timeout=120_000)
    expect(status).to_contain_text("the last checkpoint is kept")


def test_auth_asks_for_the_login_first(browser, tiny_sd1, adapters_dir, tmp_path):
    app, url = serve(str(tiny_sd1), adapters_dir, tmp_path, auth=("ann", "s3cret"))
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(url)
        assert page.locator("#prompt").count() == 0
        assert page.request.get(url + "config").status == 401
        page.get_by_label("username").fill("ann")
        page.get_by_label("password").fill("s3cret")
        page.get_by_role("button", name="Login").click()
        page.locator("#prompt").wait_for(timeout=60_000)
    finally:
        context.close()
        app.close()
