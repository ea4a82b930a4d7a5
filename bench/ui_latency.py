"""Slider release to new image in the web UI, against the same picture from a warm session.

    python bench/ui_latency.py [--runs 10] [--steps 20] [--threads 1]

On the embedded demo base at 64 px, with one and with three adapters ticked: Chromium
(Playwright, Debian's /usr/bin/chromium) releases the first adapter's slider at a new place
and waits for the gallery to show the new image. Two timings of each release:

- release -> image (what the issue names), in the browser's own clock: `performance.now()` at
  the slider's `pointerup` (a capture listener on the document, which runs before Gradio's own
  listener on the slider sends the request) to the `load` event of the gallery's new <img>
  (a MutationObserver finds the <img> whose src is not the one before the release; one
  already `complete` when found counts as loaded then);
- click -> image: Python's clock from before Playwright's `slider.click()` (which spends tens
  of ms moving the mouse and pressing before it lets go) until a polled check sees the new
  image complete and the settings box changed. The older, pessimistic measure.

The baseline is `GenerationSession.generate` of the same request in this process (what a warm
`sdlora render` runs per image), wall time. Prints the medians and both ratios (goal: <= 1.5).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mix_speed import random_lora  # noqa: E402 - the bench folder's own helper

from sdlora.adapters.write import save_adapter  # noqa: E402
from sdlora.base.models import load_base  # noqa: E402
from sdlora.render.session import GenerationSession, ImageRequest  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
SIZE = 64


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_adapters(folder: Path, count: int) -> list[str]:
    pipeline = load_base("demo").pipeline
    names = [f"style{index}" for index in range(count)]
    for seed, name in enumerate(names):
        adapter, _ = random_lora(pipeline, name, seed, text_encoder=True)
        save_adapter(adapter, folder / f"{name}.safetensors")
    return names


def session_median(folder: Path, names: list[str], steps: int, runs: int) -> float:
    session = GenerationSession("demo")
    session.use_adapters({name: folder / f"{name}.safetensors" for name in names})
    times = []
    for run in range(runs + 1):  # the first run warms up
        request = ImageRequest(prompt="a lighthouse", steps=steps, width=SIZE, height=SIZE,
                               loras={name: 0.5 + 0.05 * run for name in names})
        start = time.perf_counter()
        session.generate(request)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


# Installed before the page's own scripts: the release and new-image times, in the browser's
# clock. `arm()` (before each release) forgets the last run and notes the gallery's image.
WATCH_RELEASE = """
(() => {
  const run = window.__latency = {armed: false, before: null, release: null, loaded: null};
  window.__latencyArm = () => {
    const img = document.querySelector("#gallery img");
    Object.assign(run, {armed: true, before: img ? img.src : null, release: null, loaded: null});
  };
  document.addEventListener("pointerup", (event) => {
    if (run.armed && run.release === null
        && event.target.matches?.(".adapter-weight input[type=range]")) {
      run.release = performance.now();
    }
  }, true);
  const loaded = () => { if (run.loaded === null) run.loaded = performance.now(); };
  new MutationObserver(() => {
    if (!run.armed || run.release === null || run.loaded !== null) return;
    const img = document.querySelector("#gallery img");
    if (!img || !img.src || img.src === run.before) return;
    if (img.complete && img.naturalWidth > 0) loaded();
    else img.addEventListener("load", loaded, {once: true});
  }).observe(document, {subtree: true, childList: true, attributes: true,
                        attributeFilter: ["src"]});
})();
"""


def ui_medians(url: str, names: list[str], steps: int, runs: int) -> tuple[float, float]:
    """Medians (s) of release -> image in the browser's clock and click -> image in Python's."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.add_init_script(WATCH_RELEASE)
        page.set_default_timeout(120_000)
        page.goto(url)
        page.locator("#no-mix").wait_for()
        for element_id, value in (("steps", steps), ("width", SIZE), ("height", SIZE)):
            box = page.locator(f"#{element_id} input[type=number]")
            box.fill(str(value))
            box.press("Tab")
        page.locator("#prompt textarea").fill("a lighthouse")
        for name in names:
            page.locator("#adapters").get_by_label(name).check()
            page.locator(f"#weight-{name}").wait_for()
        slider = page.locator(f"#weight-{names[0]} input[type=range]")
        box = slider.bounding_box()
        in_browser, from_click = [], []
        for run in range(runs + 1):  # the first run warms up
            before = page.locator("#settings textarea").input_value()
            page.evaluate("window.__latencyArm()")
            fraction = 0.3 + 0.04 * run
            start = time.perf_counter()
            slider.click(position={"x": box["width"] * fraction, "y": box["height"] / 2})
            page.wait_for_function(
                "before => { const img = document.querySelector('#gallery img');"
                " const text = document.querySelector('#settings textarea').value;"
                " return img && img.complete && text !== before; }", arg=before)
            from_click.append(time.perf_counter() - start)
            page.wait_for_function("window.__latency.loaded !== null")
            release, loaded = page.evaluate(
                "() => { const run = window.__latency; run.armed = false;"
                " return [run.release, run.loaded]; }")
            in_browser.append((loaded - release) / 1000)
        browser.close()
    return statistics.median(in_browser[1:]), statistics.median(from_click[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sdlora.ui.command import build_app, launch
    from sdlora.ui.folders import Folders
    from sdlora.ui.studio import Studio
    from sdlora.ui.training import Trainer

    work = Path(tempfile.mkdtemp(prefix="ui-latency-"))
    adapters = work / "adapters"
    adapters.mkdir()
    names = make_adapters(adapters, 3)
    folders = Folders(adapters=adapters, configs=Path("configs"), outputs=work / "outputs")
    app = build_app(folders, Studio(folders), Trainer(folders))
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    try:
        print(f"demo base, {SIZE} px, {args.steps} steps, {args.threads} thread(s), "
              f"median of {args.runs}")
        rows = []
        for count in (1, 3):
            ticked = names[:count]
            bare = session_median(adapters, ticked, args.steps, args.runs)
            release, click = ui_medians(f"http://127.0.0.1:{port}/", ticked, args.steps,
                                        args.runs)
            rows.append(f"| {count} | {bare * 1000:.0f} | {release * 1000:.0f} | "
                        f"{release / bare:.2f}x | {click * 1000:.0f} | {click / bare:.2f}x |")
        print("| adapters | session.generate ms | release -> image ms (browser) | ratio "
              "| click -> image ms (Playwright) | ratio |")
        print("|---:|---:|---:|---:|---:|---:|")
        print("\n".join(rows))
    finally:
        app.close()


if __name__ == "__main__":
    main()
