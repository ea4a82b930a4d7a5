"""UI logins without a password in `ps`: --auth-file (several users) and $SDLORA_AUTH."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from sdlora.cli import build_parser
from sdlora.errors import SdloraError
from sdlora.ui.command import credentials, read_auth_file

REPO = Path(__file__).resolve().parents[1]
AUTH_FILE = "# team logins\n\nann:se:cret\n  bob:pw2  \n# carol:old\n"


def ui_args(*flags: str):
    return build_parser().parse_args(["ui", *flags])


def test_auth_file_reads_several_users_and_skips_blanks_and_comments(tmp_path):
    path = tmp_path / "logins"
    path.write_text(AUTH_FILE)
    assert read_auth_file(path) == [("ann", "se:cret"), ("bob", "pw2")]


@pytest.mark.parametrize("line", ["justaname-hunter2", ":hunter2", "ann:"])
def test_a_malformed_line_is_named_by_number_without_the_password(tmp_path, line):
    path = tmp_path / "logins"
    path.write_text(f"ann:ok\n\n{line}\n")
    with pytest.raises(SdloraError) as error:
        read_auth_file(path)
    message = str(error.value)
    assert f"--auth-file {path} line 3 must look like user:password" == message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"# nobody\n\n", "has no user:password line"), (b"ann:\xff\xfe\n", "is not UTF-8")],
)
def test_an_auth_file_without_logins_is_an_error(tmp_path, content, expected):
    path = tmp_path / "logins"
    path.write_bytes(content)
    with pytest.raises(SdloraError, match=expected):
        read_auth_file(path)


def test_a_missing_auth_file_is_one_line(tmp_path):
    with pytest.raises(SdloraError, match="--auth-file .*missing"):
        credentials(ui_args("--auth-file", str(tmp_path / "missing")), environ={})


def test_credentials_come_from_the_flag_the_file_and_the_environment(tmp_path):
    path = tmp_path / "logins"
    path.write_text(AUTH_FILE)
    args = ui_args("--auth", "dan:x", "--auth-file", str(path))
    logins = credentials(args, environ={"SDLORA_AUTH": "eve:y"})
    assert logins == [("dan", "x"), ("ann", "se:cret"), ("bob", "pw2"), ("eve", "y")]
    assert credentials(ui_args(), environ={}) == []
    with pytest.raises(SdloraError, match="SDLORA_AUTH must look like user:password"):
        credentials(ui_args(), environ={"SDLORA_AUTH": "nocolon"})
    with pytest.raises(SdloraError, match="'ann' is given more than one password"):
        credentials(ui_args("--auth-file", str(path)), environ={"SDLORA_AUTH": "ann:z"})


def test_help_points_away_from_the_flag_that_ps_shows(capsys):
    with pytest.raises(SystemExit):
        ui_args("--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "--auth-file FILE" in text and "SDLORA_AUTH" in text and "`ps`" in text


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def status_of(request: urllib.request.Request | str) -> int:
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def login(url: str, user: str, password: str) -> int:
    form = urllib.parse.urlencode({"username": user, "password": password}).encode()
    return status_of(urllib.request.Request(f"{url}/login", data=form, method="POST"))


def test_the_ui_launches_behind_the_file_and_environment_logins(tiny_sd1, tmp_path):
    auth_file = tmp_path / "logins"
    auth_file.write_text(AUTH_FILE)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "app.py", "--base", str(tiny_sd1), "--adapters-dir",
         str(tmp_path / "adapters"), "--port", str(port), "--auth-file", str(auth_file)],
        cwd=REPO,
        env={**os.environ, "SDLORA_AUTH": "eve:from-env", "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the UI did not answer"
            try:
                config_status = status_of(f"{url}/config")
                break
            except OSError:
                time.sleep(0.5)
        assert config_status == 401
        assert login(url, "ann", "se:cret") == 200
        assert login(url, "bob", "pw2") == 200
        assert login(url, "eve", "from-env") == 200
        assert login(url, "ann", "wrong") == 400
        assert login(url, "carol", "old") == 400
    finally:
        process.terminate()
        process.wait(30)
