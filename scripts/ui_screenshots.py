"""Screenshots of the web UI's tabs for the README: docs/ui-generate.png, docs/ui-history.png,
docs/ui-train.png.

    python scripts/ui_screenshots.py [--adapters-dir out/demo]

Serves the UI on the demo base (adapters from --adapters-dir, by default what `sdlora demo`
writes) with a throw-away outputs folder, renders one picture with the first adapter ticked,
and photographs each tab in Debian's Chromium (Playwright).
"""

from __future__ import annotations

import argparse
import socket
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def photograph(url: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(120_000)
        page.goto(url)
        page.locator("#no-mix").wait_for()
        page.locator("#prompt textarea").fill("a red circle on a blue background")
        cards = page.locator("#adapter-cards img")
        if cards.count():
            cards.first.click()
            page.locator(".adapter-weight").first.wait_for()
        page.locator("#generate").click()
        page.locator("#gallery img").first.wait_for()
        page.screenshot(path=str(DOCS / "ui-generate.png"), full_page=True)
        for tab in ("History", "Train"):
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(1500)
            page.screenshot(path=str(DOCS / f"ui-{tab.lower()}.png"), full_page=True)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters-dir", default="out/demo")
    args = parser.parse_args()

    from sdlora.ui.command import build_app, launch
    from sdlora.ui.folders import Folders
    from sdlora.ui.studio import Studio
    from sdlora.ui.training import Trainer

    outputs = Path(tempfile.mkdtemp(prefix="sdlora-screenshots-"))
    folders = Folders(adapters=Path(args.adapters_dir), configs=Path("configs"), outputs=outputs)
    app = build_app(folders, Studio(folders), Trainer(folders))
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    try:
        photograph(f"http://127.0.0.1:{port}/")
    finally:
        app.close()
    print(f"wrote {', '.join(f'docs/ui-{tab}.png' for tab in ('generate', 'history', 'train'))}")


if __name__ == "__main__":
    main()
