"""Issue 13 in a real browser: weights that stay put, typed weights that render, cards, a base
list that cannot be typed into, history and PNG info filling the form, img2img, and two users
who never see each other's images or adapters."""

from __future__ import annotations

import re

from factories import random_adapter
from PIL import Image, PngImagePlugin
from playwright.sync_api import expect
from test_browser import set_number, small_fast_settings
from ui_server import serve

from sdlora.adapters.write import save_adapter
from sdlora.base.models import load_base

# What AUTOMATIC1111 writes into a PNG's "parameters" chunk, verbatim in its layout.
A1111_PARAMETERS = (
    "a castle on a hill <lora:oil:0.6> <lora:not-here:1>\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 1234, "
    "Size: 64x64, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, "
    'Lora hashes: "oil: 0123456789ab", Version: v1.10.1'
)

SLOW = 60_000  # ms: a render that may load the base first


def has(text: str) -> re.Pattern:
    """A textbox value containing `text` (to_contain_text reads a textarea's initial text)."""
    return re.compile(re.escape(text))


def open_ui(page, url: str) -> None:
    """Load the page and wait until the Generate tab's controls are wired."""
    page.set_default_timeout(SLOW)
    page.goto(url)
    page.locator("#no-mix").wait_for()


def weight_box(page, element_id: str):
    return page.locator(f"#{element_id} input[type=number]")


def test_ticking_another_adapter_keeps_every_weight(page):
    page.get_by_label("Render on release").uncheck()
    page.locator("#adapters").get_by_label("oil").check()
    set_number(page, "weight-oil", 0.3)
    page.locator("#adapter-oil").get_by_text("Per-part weights").click()
    set_number(page, "unet-oil", 0.5)
    page.wait_for_timeout(500)  # the mix state is saved on change
    page.locator("#adapters").get_by_label("ink").check()
    page.locator("#weight-ink").wait_for()
    expect(weight_box(page, "weight-oil")).to_have_value("0.3")
    expect(weight_box(page, "unet-oil")).to_have_value("0.5")
    page.locator("#adapters").get_by_label("ink").uncheck()
    expect(weight_box(page, "weight-oil")).to_have_value("0.3")


def test_a_typed_weight_renders_on_enter(page):
    page.locator("#prompt textarea").fill("a lighthouse")
    small_fast_settings(page)
    page.locator("#adapters").get_by_label("oil").check()
    box = weight_box(page, "weight-oil")
    box.fill("0.4")
    box.press("Enter")
    expect(page.locator("#settings textarea")).to_have_value(re.compile(r"<lora:oil:0\.4>"),
                                                             timeout=SLOW)
    assert page.locator("#gallery img").count() == 1
    assert page.locator("#gallery").get_by_text("Drop Media Here").count() == 0


def test_an_arrow_key_on_a_slider_renders_and_keeps_the_weight(page):
    page.locator("#prompt textarea").fill("a lighthouse")
    small_fast_settings(page)
    page.locator("#adapters").get_by_label("oil").check()
    page.locator("#weight-oil input[type=range]").press("ArrowRight")  # let go: a release
    expect(page.locator("#settings textarea")).to_have_value(re.compile(r"<lora:oil:1\.05>"),
                                                             timeout=SLOW)
    page.locator("#adapters").get_by_label("ink").check()  # the sliders are re-created
    page.locator("#weight-ink").wait_for()
    expect(weight_box(page, "weight-oil")).to_have_value("1.05")


def test_the_base_list_takes_no_typed_hub_id(page, tiny_sd1):
    base = page.locator("#base input")
    base.fill("someone/any-repository")
    base.press("Enter")
    page.locator("#prompt textarea").click()
    expect(base).to_have_value(str(tiny_sd1))


def test_cards_tick_adapters_and_grey_those_of_another_family(
    browser, tiny_sd1, tiny_sdxl, adapters_dir, tmp_path
):
    shared = tmp_path / "adapters"
    (shared / "styles").mkdir(parents=True)
    for name in ("oil", "ink"):
        (shared / "styles" / f"{name}.safetensors").write_bytes(
            (adapters_dir / f"{name}.safetensors").read_bytes())
    xl = load_base(str(tiny_sdxl)).pipeline
    save_adapter(random_adapter(xl, "xl-only"), shared / "xl-only.safetensors")
    app, url = serve(str(tiny_sd1), shared, tmp_path / "outputs")
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        open_ui(page, url)
        cards = page.locator("#adapter-cards")
        expect(cards).to_contain_text("xl-only · sdxl")
        expect(cards).to_contain_text("unusable: made for sdxl, the base is sd1")
        expect(page.locator("#adapters")).not_to_contain_text("xl-only")
        page.locator("#adapter-search input, #adapter-search textarea").fill("sks")
        expect(cards.locator("img")).to_have_count(1)  # oil: its trigger words match
        cards.locator("img").first.click()
        expect(page.locator("#adapters").get_by_label("oil")).to_be_checked()
        page.locator("#adapter-details").get_by_text("Details of the clicked adapter").click()
        expect(page.locator("#adapter-info")).to_contain_text("layout:")
    finally:
        context.close()
        app.close()


def test_an_a1111_png_fills_the_form(page, tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_PARAMETERS)
    path = tmp_path / "from-a1111.png"
    Image.new("RGB", (64, 64), "gray").save(path, pnginfo=info)
    page.get_by_role("tab", name="History").click()
    page.locator("#png-info input[type=file]").set_input_files(str(path))
    expect(page.locator("#prompt textarea")).to_have_value("a castle on a hill")
    expect(page.locator("#negative textarea")).to_have_value("blurry, lowres")
    expect(page.locator("#seed input")).to_have_value("1234")
    expect(weight_box(page, "steps")).to_have_value("4")
    expect(weight_box(page, "cfg")).to_have_value("5.5")
    expect(weight_box(page, "width")).to_have_value("64")
    expect(weight_box(page, "clip-skip")).to_have_value("2")
    expect(page.locator("#scheduler input")).to_have_value("dpm++_2m_karras")
    expect(page.locator("#adapters").get_by_label("oil")).to_be_checked()
    expect(weight_box(page, "weight-oil")).to_have_value("0.6")
    expect(page.get_by_text("not in your adapters, left out: not-here")).to_be_visible()


def test_history_survives_a_restart_and_loads_back(browser, tiny_sd1, adapters_dir, tmp_path):
    outputs = tmp_path / "outputs"
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    app, url = serve(str(tiny_sd1), adapters_dir, outputs)
    try:
        page = context.new_page()
        open_ui(page, url)
        page.locator("#prompt textarea").fill("a red boat")
        small_fast_settings(page)
        page.locator("#generate").click()
        expect(page.locator("#settings textarea")).to_have_value(has("a red boat"), timeout=SLOW)
    finally:
        app.close()
    app, url = serve(str(tiny_sd1), adapters_dir, outputs)  # the restart
    try:
        page = context.new_page()
        open_ui(page, url)
        page.get_by_role("tab", name="History").click()
        page.locator("#history img").first.click()
        expect(page.locator("#history-settings textarea")).to_have_value(has("a red boat"))
        page.locator("#history-send").click()
        expect(page.locator("#prompt textarea")).to_have_value("a red boat")
        expect(page.locator("#seed input")).to_have_value("7")
    finally:
        context.close()
        app.close()


def test_img2img_from_an_uploaded_picture(page, tmp_path):
    page.locator("#no-mix").wait_for()
    picture = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (30, 120, 200)).save(picture)
    page.locator("#prompt textarea").fill("a blue wall")
    small_fast_settings(page)
    page.locator("#image-options").get_by_text("img2img, inpainting").click()
    page.locator('#init-image [aria-label="Upload"]').wait_for()  # the editor is ready
    page.locator("#init-image input[type=file]").set_input_files(str(picture))
    # the editor holds the picture once its upload buttons give way to the brush's
    page.locator('#init-image [aria-label="Brush Size"]').wait_for()
    set_number(page, "strength", 0.5)
    page.locator("#generate").click()
    expect(page.locator("#settings textarea")).to_have_value(has("Denoising strength: 0.5"),
                                                               timeout=SLOW)


def test_two_users_never_see_each_others_images_or_adapters(
    browser, tiny_sd1, adapters_dir, tmp_path
):
    shared = tmp_path / "adapters"
    shared.mkdir()
    (shared / "oil.safetensors").write_bytes((adapters_dir / "oil.safetensors").read_bytes())
    app, url = serve(str(tiny_sd1), shared, tmp_path / "outputs",
                     auth=[("ann", "ann-pw"), ("bob", "bob-pw")])
    ann_folder = shared / "ann"
    ann_folder.mkdir()
    (ann_folder / ".sdlora-user").touch()
    (ann_folder / "anns-secret.safetensors").write_bytes(
        (adapters_dir / "ink.safetensors").read_bytes())
    contexts = [browser.new_context(viewport={"width": 1400, "height": 1000}) for _ in range(2)]
    try:
        ann, bob = (context.new_page() for context in contexts)
        for page, user in ((ann, "ann"), (bob, "bob")):
            page.set_default_timeout(60_000)
            page.goto(url)
            page.get_by_label("username").fill(user)
            page.get_by_label("password").fill(f"{user}-pw")
            page.get_by_role("button", name="Login").click()
            page.locator("#prompt").wait_for()
        expect(ann.locator("#adapters")).to_contain_text("anns-secret")
        expect(bob.locator("#adapters")).to_contain_text("oil")
        assert "anns-secret" not in bob.locator("#adapters").inner_text()
        ann.locator("#prompt textarea").fill("ann's picture")
        small_fast_settings(ann)
        ann.locator("#generate").click()
        expect(ann.locator("#settings textarea")).to_have_value(has("ann's picture"), timeout=SLOW)
        assert list((tmp_path / "outputs" / "ann").glob("*/*.png"))
        bob.reload()
        bob.locator("#no-mix").wait_for()
        bob.get_by_role("tab", name="History").click()
        bob.wait_for_timeout(1500)
        assert bob.locator("#history img").count() == 0
        ann.get_by_role("tab", name="History").click()
        expect(ann.locator("#history img")).to_have_count(1)
    finally:
        for context in contexts:
            context.close()
        app.close()
