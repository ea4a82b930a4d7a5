"""`python app.py` starts the web UI with its flags, on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_page(url: str, process: subprocess.Popen, seconds: float = 180) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"app.py exited with {process.returncode}: {process.stderr.read()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {seconds} s")


def test_app_py_serves_the_ui_with_its_flags(tiny_sd1, tmp_path):
    port = free_port()
    adapters = tmp_path / "new-adapters"
    process = subprocess.Popen(
        [
            sys.executable,
            "app.py",
            "--base",
            str(tiny_sd1),
            "--adapters-dir",
            str(adapters),
            "--port",
            str(port),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        config = json.loads(wait_for_page(f"http://127.0.0.1:{port}/config", process))
        assert config["title"] == "sdlora"
        assert adapters.is_dir()
    finally:
        process.terminate()
        process.wait(30)


def test_a_bad_flag_is_one_line_not_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "app.py", "--data-dir", str(tmp_path / "missing")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    missing = tmp_path / "missing"
    assert result.stderr.strip() == f"sdlora ui: error: --data-dir {missing} is not a folder"
