"""A live sdlora web UI on a tiny base and a headless Chromium driven by Playwright.

The browser is Debian's /usr/bin/chromium (.ci/run installs it); Playwright's own browser
download is not used. Without that binary the browser tests skip, saying so.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from factories import random_adapter

from sdlora.adapters.write import save_adapter
from sdlora.models import load_base

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def adapters_dir(tiny_sd1, tmp_path_factory):
    """Two adapters for the tiny base; `oil` carries trigger words in its metadata."""
    folder = tmp_path_factory.mktemp("adapters")
    pipeline = load_base(str(tiny_sd1)).pipeline
    save_adapter(random_adapter(pipeline, "oil", seed=1), folder / "oil.safetensors",
                 metadata={"sdlora.trigger_words": '["sks", "oil paint"]'})
    save_adapter(random_adapter(pipeline, "ink", seed=2), folder / "ink.safetensors")
    return folder


@pytest.fixture(scope="session")
def ui_url(tiny_sd1, adapters_dir, tmp_path_factory):
    """The UI served in this process on a free 127.0.0.1 port."""
    from sdlora.ui import build_app, launch
    from sdlora.ui_folders import Folders
    from sdlora.ui_studio import Studio
    from sdlora.ui_training import Trainer

    folders = Folders(adapters=adapters_dir, configs=Path("configs"), default_base=str(tiny_sd1))
    studio = Studio(folders, tmp_path_factory.mktemp("ui-images"))
    app = build_app(folders, studio, Trainer(folders))
    port = free_port()
    launch(app, studio, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/"
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
