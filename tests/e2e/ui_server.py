"""Serving the UI in the test process, and where the browser and the artifacts are."""

from __future__ import annotations

import socket
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
PRESETS = Path(__file__).parent / "presets"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(base: str, adapters: Path, images: Path, auth=None, **folders):
    """Start the UI in this process on a free 127.0.0.1 port; returns (app, url). `auth` is
    Gradio's: one (user, password) pair or a list of them; `folders` more Folders fields."""
    from sdlora.ui.command import build_app, launch
    from sdlora.ui.folders import Folders
    from sdlora.ui.studio import Studio
    from sdlora.ui.training import Trainer

    folders = Folders(adapters=adapters, configs=PRESETS, outputs=images, default_base=base,
                      **folders)
    app = build_app(folders, Studio(folders), Trainer(folders))
    port = free_port()
    launch(app, "127.0.0.1", port, auth=auth, block=False)
    return app, f"http://127.0.0.1:{port}/"
