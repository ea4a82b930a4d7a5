"""A live sdlora web UI on a tiny base and a headless Chromium driven by Playwright.

The browser is Debian's /usr/bin/chromium (.ci/run installs it); Playwright's own browser
download is not used. Without that binary the browser tests skip, saying so.
"""

from __future__ import annotations

import pytest
from factories import random_adapter
from ui_server import CHROMIUM, CHROMIUM_ARGS, serve

from sdlora.adapters.write import save_adapter
from sdlora.base.models import load_base


@pytest.fixture(scope="session")
def adapters_dir(tiny_sd1, tmp_path_factory):
    """Two adapters for the tiny base; `oil` carries trigger words in its metadata."""
    folder = tmp_path_factory.mktemp("adapters")
    pipeline = load_base(str(tiny_sd1)).pipeline
    save_adapter(
        random_adapter(pipeline, "oil", seed=1),
        folder / "oil.safetensors",
        metadata={"sdlora.trigger_words": '["sks", "oil paint"]'},
    )
    save_adapter(random_adapter(pipeline, "ink", seed=2), folder / "ink.safetensors")
    return folder


@pytest.fixture(scope="session")
def ui_url(tiny_sd1, adapters_dir, tmp_path_factory):
    app, url = serve(str(tiny_sd1), adapters_dir, tmp_path_factory.mktemp("ui-images"))
    yield url
    app.close()


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (as .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, ui_url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(ui_url)
    yield page
    context.close()
