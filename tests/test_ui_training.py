"""The Train tab's engine: a preset plus the user's choices, trained in a thread, cancellable."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora.adapters.read import load_adapter
from sdlora.errors import SdloraError
from sdlora.train.checkpoints import list_checkpoints
from sdlora.ui.folders import Folders
from sdlora.ui.training import Trainer, TrainingRequest

PRESETS = Path(__file__).parent / "e2e" / "presets"


@pytest.fixture
def folders(tiny_sd1, tmp_path):
    (tmp_path / "adapters").mkdir()
    return Folders(adapters=tmp_path / "adapters", configs=PRESETS, default_base=str(tiny_sd1))


def images(folder: Path, count: int = 2) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"upload{index}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def request(uploads, **changes) -> TrainingRequest:
    settings = {
        "preset": "tiny-style",
        "name": "ink",
        "trigger_word": "zxq",
        "steps": 4,
        "rank": 4,
        "uploads": uploads,
    }
    return TrainingRequest(**{**settings, **changes})


def wait_until(condition, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_finished_run_puts_its_adapter_in_the_adapters_folder(folders, tmp_path):
    trainer = Trainer(folders)
    job = trainer.start(request(images(tmp_path / "uploads")))
    job.wait()
    assert (job.state, job.step, job.total_steps) == ("finished", 4, 4), job.message
    assert job.loss is not None and "ready in the Generate tab" in job.message
    (listed,) = folders.list_adapters()
    assert (listed.name, listed.trigger_words) == ("ink", ["zxq"])
    assert load_adapter(listed.path).layers
    assert [path.name for path in job.validation_images()] == ["step-000002.png", "step-000004.png"]
    assert job.config.data.instance_prompt == "a painting in zxq style"
    assert job.config.validation.prompts == ["a house, zxq style"]
    assert (job.config.lora.rank, job.config.lora.alpha) == (4, 2.0)  # the preset's alpha/rank


def test_cancel_stops_after_the_step_and_keeps_a_checkpoint(folders, tmp_path):
    trainer = Trainer(folders)
    job = trainer.start(request(images(tmp_path / "uploads"), steps=1000))
    waiting = trainer.start(request(images(tmp_path / "more"), name="other"))
    assert (waiting.state, trainer.place_in_queue(waiting)) == ("queued", 1)
    waiting.cancel()
    wait_until(lambda: job.step >= 1 or not job.running)
    job.cancel()
    job.wait()
    waiting.wait()
    assert (waiting.state, waiting.step) == ("cancelled", 0)
    assert job.state == "cancelled", job.message
    assert job.step < 1000 and "last checkpoint is kept" in job.message
    assert [step for step, _ in list_checkpoints(job.run_dir)] == [job.step]
    assert folders.list_adapters() == []


def test_a_failed_run_reports_why(folders, tmp_path):
    caption = tmp_path / "only.txt"
    caption.write_text("a caption without its image")
    job = Trainer(folders).start(request([str(caption)]))
    job.wait()
    assert (job.state, job.running) == ("failed", False)
    assert "no usable images" in job.message


def test_the_real_presets_take_the_users_choices(tiny_sd1, tmp_path):
    folders = Folders(adapters=tmp_path, configs=Path("configs"), default_base=str(tiny_sd1))
    config = Trainer(folders).config_for(
        request(images(tmp_path / "up"), preset="sd15-style", rank=8, steps=30)
    )
    assert config.data.instance_prompt == "a painting in zxq style"
    assert config.data.trigger_word == "zxq"
    assert all("zxq" in prompt and "sks" not in prompt for prompt in config.validation.prompts)
    assert (config.lora.rank, config.lora.alpha, config.train.steps) == (8, 8.0, 30)
    assert config.base == str(tiny_sd1)
    assert Path(config.output.dir) == tmp_path / "ink"
    assert sorted(p.name for p in Path(config.data.instance_dir).iterdir()) == [
        "upload0.png",
        "upload1.png",
    ]


def test_uploads_must_be_images_or_captions_within_the_size_limit(folders, tmp_path, monkeypatch):
    trainer = Trainer(folders)
    uploads = images(tmp_path / "up")
    script = tmp_path / "evil.sh"
    script.write_text("rm -rf /")
    fake = tmp_path / "fake.png"
    fake.write_text("not a png")
    for bad, message in ((script, "only"), (fake, "not a readable image")):
        with pytest.raises(SdloraError, match=message):
            trainer.config_for(request([*uploads, str(bad)]))
    monkeypatch.setattr("sdlora.ui.training.MAX_UPLOAD_BYTES", 100)
    with pytest.raises(SdloraError, match="larger than"):
        trainer.config_for(request(uploads))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"name": "../escape"}, "plain name"),
        ({"trigger_word": " "}, "trigger word"),
        ({"steps": 0}, "steps must be"),
        ({"uploads": []}, "upload some images"),
        ({"uploads": [], "folder": "../etc"}, "--data-dir"),
        ({"preset": "../configs/sd15-style"}, "unknown preset"),
    ],
)
def test_bad_training_requests_are_refused(folders, changes, message):
    with pytest.raises(SdloraError, match=message):
        Trainer(folders).config_for(request(**{"uploads": ["unused.png"], **changes}))


def test_originals_come_from_the_data_folder_and_never_from_the_preset(tiny_sd1, tmp_path):
    (tmp_path / "data" / "styled").mkdir(parents=True)
    (tmp_path / "data" / "plain").mkdir()
    folders = Folders(adapters=tmp_path / "adapters", configs=Path("configs"),
                      default_base=str(tiny_sd1), data=tmp_path / "data")
    trainer = Trainer(folders)
    # configs/demo.yaml pairs samples/demo/sepia with samples/demo/plain: not the user's images
    uploaded = trainer.config_for(request(images(tmp_path / "up"), preset="demo"))
    assert uploaded.data.before_dir is None
    assert uploaded.train.paired_target == "picture"  # the preset's "change" needs its pairs
    with pytest.raises(SdloraError, match="needs the originals"):
        trainer.config_for(request(images(tmp_path / "up2"), preset="demo", paired_target="change"))
    paired = trainer.config_for(request([], preset="demo", folder="styled", before_folder="plain"))
    assert Path(paired.data.before_dir) == tmp_path / "data" / "plain"
    assert paired.train.paired_target == "change"
    with pytest.raises(SdloraError, match="not found"):
        trainer.config_for(request([], preset="demo", folder="styled", before_folder="missing"))


def test_a_second_run_of_a_name_never_overwrites_the_first(folders, tmp_path):
    trainer = Trainer(folders)
    first = trainer.start(request(images(tmp_path / "a")))
    second = trainer.start(request(images(tmp_path / "b")))  # waits for the first
    first.wait()
    second.wait()
    assert (first.config.output.name, second.config.output.name) == ("ink", "ink-2")
    assert first.adapter_path.is_file() and second.adapter_path.is_file()
    assert [info.name for info in folders.list_adapters()] == ["ink", "ink-2"]
    assert [loss_step for loss_step, _ in second.losses] == [1, 2, 3, 4]


def test_users_train_into_their_own_folders(folders, tmp_path):
    config = Trainer(folders).config_for(request(images(tmp_path / "a")), user="ann")
    assert Path(config.output.dir) == folders.adapters / "ann" / "ink"


def test_the_demo_preset_gets_previews_and_the_advanced_choices(tiny_sd1, tmp_path):
    folders = Folders(adapters=tmp_path, configs=Path("configs"), default_base=str(tiny_sd1))
    originals = images(tmp_path / "plain")
    config = Trainer(folders).config_for(request(
        images(tmp_path / "up"), preset="demo", steps=8, learning_rate=5e-4, resolution=128,
        targets="attention", text_encoder=True, before_uploads=originals, paired_target="change",
    ))
    assert config.validation.prompts == [config.data.instance_prompt]
    assert config.validation.every == 2
    assert (config.train.learning_rate, config.data.resolution) == (5e-4, 128)
    assert (config.lora.targets, config.lora.text_encoder) == ("attention", True)
    assert config.train.paired_target == "change"
    assert sorted(p.name for p in Path(config.data.before_dir).iterdir()) == [
        "upload0.png", "upload1.png"]


def test_originals_of_other_names_are_refused_before_the_run_queues(folders, tmp_path):
    styled = images(tmp_path / "up")
    originals = [str(Path(path).rename(Path(path).with_stem("photo"))) for path in
                 images(tmp_path / "plain", count=1)]
    with pytest.raises(SdloraError, match=r"no original for 2 of the 2 images \(first: upload0"):
        Trainer(folders).config_for(request(styled, before_uploads=originals))
    assert not any(folders.adapters.iterdir())  # nothing copied, the name is still free


def test_a_refused_request_leaves_no_run_folder_behind(folders, tmp_path):
    trainer = Trainer(folders)
    with pytest.raises(SdloraError, match="resolution must be a multiple of 8"):
        trainer.config_for(request(images(tmp_path / "up"), resolution=65))
    assert not any(folders.adapters.iterdir())
    assert trainer.config_for(request(images(tmp_path / "up"))).output.name == "ink"
