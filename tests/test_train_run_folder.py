"""A run owns its output folder: lock, refusal of another run's files, --overwrite, --resume."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from test_train import interrupt_at, tiny_config

from sdlora.cli import main
from sdlora.errors import SdloraError
from sdlora.train import checkpoints, run_folder
from sdlora.train.checkpoints import list_checkpoints, list_snapshots
from sdlora.train.loop import train

HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from sdlora.train.run_folder import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def write_config(config, path):
    path.write_text(yaml.safe_dump(config.to_dict()))
    return str(path)


def one_error_line(capsys) -> str:
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    return error


def test_a_second_run_is_refused_while_the_first_holds_the_folder(tiny_sd1, tmp_path, capsys):
    config = tiny_config(tiny_sd1, tmp_path, train={"steps": 1})
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", write_config(config, tmp_path / "c.yaml")]) == 2
        error = one_error_line(capsys)
        assert f"in use by another training run (pid {holder.pid} on " in error
        assert "started 20" in error
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the killed holder's lock: the file it left is no lock.
    assert (out / run_folder.LOCK_NAME).exists()
    assert main(["train", write_config(config, tmp_path / "c.yaml")]) == 0
    assert not (out / run_folder.LOCK_NAME).exists()


def test_lock_without_fcntl_refuses_a_live_holder_and_ignores_a_dead_one(tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder, "fcntl", None)
    first = run_folder.RunLock(tmp_path)
    first.acquire()
    with pytest.raises(SdloraError, match="in use by another training run"):
        run_folder.RunLock(tmp_path).acquire()
    first.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    import socket

    (tmp_path / run_folder.LOCK_NAME).write_text(
        f"pid={dead} host={socket.gethostname()} started=2000-01-01T00:00:00\n")
    second = run_folder.RunLock(tmp_path)
    second.acquire()
    second.release()


def test_a_finished_run_is_kept_unless_overwrite_or_resume(tiny_sd1, tmp_path, capsys,
                                                           monkeypatch):
    import sdlora.train.loop as loop

    config = tiny_config(tiny_sd1, tmp_path, train={"steps": 2})
    adapter = train(config)
    before = adapter.read_bytes()
    path = write_config(config, tmp_path / "c.yaml")
    capsys.readouterr()
    with monkeypatch.context() as patch:  # refused before any model loads
        patch.setattr(loop, "load_base", lambda *a, **k: pytest.fail("loaded the model"))
        assert main(["train", path, "--set", "data.instance_dir=" + str(tmp_path / "x")]) == 2
    error = one_error_line(capsys)
    assert "holds another run (the adapter style.safetensors)" in error
    assert "--overwrite" in error and "--resume latest" in error
    assert adapter.read_bytes() == before
    assert main(["train", path, "--overwrite", "--set", "train.learning_rate=0.002"]) == 0
    assert adapter.read_bytes() != before


def test_an_overwrite_run_owns_its_checkpoints_and_resume_checks_the_config(tiny_sd1, tmp_path):
    """Issue 16: after a finished 8-step run, a new run stopped at step 1 kept no checkpoint
    (pruning took it) and --resume latest continued the old run under the new config."""
    old = tiny_config(tiny_sd1, tmp_path, train={"steps": 8}, checkpoint={"every": 2, "keep": 2})
    train(old)
    assert [step for step, _ in list_checkpoints(old.output.dir)] == [4, 6]

    new = tiny_config(tiny_sd1, tmp_path, train={"steps": 8, "learning_rate": 2e-3},
                      checkpoint={"every": 2, "keep": 2})
    with pytest.raises(KeyboardInterrupt):
        train(new, overwrite=True, on_step=interrupt_at(1))
    assert [step for step, _ in list_checkpoints(new.output.dir)] == [1]
    assert [step for step, _ in list_snapshots(new.output.dir)] == [1]
    assert new.adapter_path.exists()  # the old adapter stays until the new one replaces it
    saved = yaml.safe_load((tmp_path / "out" / "style.config.yaml").read_text())
    assert saved["train"]["learning_rate"] == 2e-3

    with pytest.raises(SdloraError, match=r"another config \(train.learning_rate is 0.002 there, "
                                          r"0.001 here\).*--overwrite"):
        train(old, resume="latest")
    # Output-only keys and the length of the run are not the training's identity.
    longer = tiny_config(tiny_sd1, tmp_path, train={"steps": 9, "learning_rate": 2e-3},
                         checkpoint={"every": 2, "keep": 2}, validation={"seed": 5})
    train(longer, resume="latest")
    state = checkpoints.load_checkpoint(list_checkpoints(new.output.dir)[-1][1])
    assert state["step"] == 8 and state["run"]["id"] == checkpoints.load_checkpoint(
        list_checkpoints(new.output.dir)[0][1])["run"]["id"]


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    folder = checkpoints.checkpoint_dir(tmp_path)
    folder.mkdir()
    for step in (1, 2, 3, 5, 6):
        (folder / f"step-{step:06d}.pt").write_bytes(b"")
        (folder / f"style-step{step:06d}.safetensors").write_bytes(b"")
    checkpoints.prune(tmp_path, written_step=3, keep=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert [step for step, _ in list_snapshots(tmp_path)] == [2, 3]


def test_a_run_that_fails_its_checks_writes_nothing(tiny_sd1, tmp_path, monkeypatch, request):
    import sdlora.train.loop as loop

    config = tiny_config(tiny_sd1, tmp_path, train={"steps": 1})
    train(config)
    config_yaml = tmp_path / "out" / "style.config.yaml"
    before = config_yaml.read_text()
    missing = tiny_config(tiny_sd1, tmp_path, data={"instance_dir": str(tmp_path / "nope")},
                          train={"steps": 2})
    with pytest.raises(SdloraError, match="does not exist"):
        train(missing, overwrite=True)
    assert config_yaml.read_text() == before and config.adapter_path.exists()

    request.getfixturevalue("without_bitsandbytes")
    monkeypatch.setattr(loop, "load_base", lambda *a, **k: pytest.fail("loaded the model"))
    eight_bit = tiny_config(tiny_sd1, tmp_path, train={"optimizer": "adamw8bit"})
    with pytest.raises(SdloraError, match="pip install bitsandbytes"):
        train(eight_bit, overwrite=True)
    assert config_yaml.read_text() == before


def test_a_killed_runs_temporaries_are_removed_and_only_those(tiny_sd1, tmp_path):
    out = tmp_path / "out"
    left = [out / ".style.safetensors.k2j_x9ab.tmp", out / "checkpoints" / ".step-000002.pt.abcdefgh.tmp",
            out / "cache" / "latents" / ".0123abcd.safetensors.zz9y8x7w.tmp"]
    kept = [out / ".notes.tmp", out / "checkpoints" / "mine.tmp"]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    train(tiny_config(tiny_sd1, tmp_path, train={"steps": 1}, data={"cache_latents": "disk"}))
    assert [path.exists() for path in left + kept] == [False] * len(left) + [True] * len(kept)


def test_resume_refuses_a_checkpoint_without_its_run(tiny_sd1, tmp_path):
    config = tiny_config(tiny_sd1, tmp_path)
    path = checkpoints.checkpoint_dir(config.output.dir) / "step-000001.pt"
    path.parent.mkdir(parents=True)
    torch.save({"step": 1, "lora": {}}, path)
    with pytest.raises(SdloraError, match="does not record the config that made it"):
        train(config, resume="latest")
