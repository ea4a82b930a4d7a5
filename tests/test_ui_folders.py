"""What browsers may reach: adapters, bases and image folders only inside the configured ones."""

from __future__ import annotations

import pytest
from factories import random_adapter

from sdlora.adapters.write import save_adapter
from sdlora.base.models import load_base
from sdlora.cli import build_parser
from sdlora.errors import SdloraError
from sdlora.ui.command import folders_from_args, parse_auth
from sdlora.ui.folders import Folders, user_folder_name


@pytest.fixture
def folders(tmp_path):
    for name in ("adapters", "models/tiny", "data/cats", "configs", "outside"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "models/tiny/model_index.json").write_text("{}")
    (tmp_path / "configs/style.yaml").write_text("base: demo\n")
    return Folders(
        adapters=tmp_path / "adapters",
        configs=tmp_path / "configs",
        default_base="demo",
        models=tmp_path / "models",
        data=tmp_path / "data",
    )


def test_adapters_are_listed_with_their_trigger_words(folders, tiny_sd1):
    pipeline = load_base(str(tiny_sd1)).pipeline
    save_adapter(
        random_adapter(pipeline, "oil"),
        folders.adapters / "oil.safetensors",
        metadata={"sdlora.trigger_words": '["sks"]'},
    )
    (folders.adapters / "notes.txt").write_text("not an adapter")
    (folders.adapters / "broken.safetensors").write_bytes(b"garbage")
    (listed,) = folders.list_adapters()
    assert (listed.name, listed.trigger_words, listed.family) == ("oil", ["sks"], "sd1")
    assert folders.adapter_path("oil") == (folders.adapters / "oil.safetensors").resolve()


def test_subfolders_are_scanned_but_not_run_internals_nor_other_users(folders, tiny_sd1):
    """`--adapters-dir out/demo` lists the adapters of the runs in it (issue 13)."""
    pipeline = load_base(str(tiny_sd1)).pipeline
    for relative in ("sepia/sepia.safetensors", "styles/ink/ink.safetensors",
                     "sepia/checkpoints/step-10.safetensors", "other/sepia.safetensors"):
        (folders.adapters / relative).parent.mkdir(parents=True, exist_ok=True)
        save_adapter(random_adapter(pipeline, "x"), folders.adapters / relative)
    folders.adapters_for("bob")
    save_adapter(random_adapter(pipeline, "x"), folders.adapters / "bob" / "bobs.safetensors")
    names = [info.name for info in folders.list_adapters()]
    assert names == ["ink", "sepia", "sepia/sepia"]  # a name seen twice: the second by path
    assert "bobs" in [info.name for info in folders.list_adapters("bob")]


@pytest.mark.parametrize(
    "name", ["../outside/x", "/etc/passwd", "a/b", "", ".hidden", "..", "oil\n"]
)
def test_adapter_names_cannot_leave_the_folder(folders, name):
    with pytest.raises(SdloraError):
        folders.adapter_path(name)


def test_a_link_out_of_the_adapters_folder_is_neither_listed_nor_loaded(folders, tmp_path):
    secret = tmp_path / "outside" / "secret.safetensors"
    secret.write_bytes(b"x")
    (folders.adapters / "secret.safetensors").symlink_to(secret)
    assert folders.list_adapters() == []
    with pytest.raises(SdloraError, match="no adapter named 'secret'"):
        folders.adapter_path("secret")


def test_bases_come_from_the_models_folder_or_the_allow_list(folders, tmp_path):
    assert folders.base_choices() == ["demo", "tiny"]
    assert folders.base_source("") == "demo"
    assert folders.base_source("tiny") == str((tmp_path / "models/tiny").resolve())
    with pytest.raises(SdloraError, match="not offered here"):
        folders.base_source("stabilityai/sdxl-turbo")  # a typed hub id
    folders.allowed_bases = ("stabilityai/sdxl-turbo",)
    assert folders.base_source("stabilityai/sdxl-turbo") == "stabilityai/sdxl-turbo"
    assert folders.base_choices() == ["demo", "stabilityai/sdxl-turbo", "tiny"]
    for sneaky in (
        "../outside",
        str(tmp_path / "outside"),
        "tiny/../../outside",
        "models/..",
        "a/..",
        "./x",
    ):
        with pytest.raises(SdloraError):
            folders.base_source(sneaky)


def test_the_operators_base_is_used_as_given(tmp_path):
    folders = Folders(adapters=tmp_path, configs=tmp_path, default_base=str(tmp_path / "sd15"))
    assert folders.base_source(str(tmp_path / "sd15")) == str(tmp_path / "sd15")
    with pytest.raises(SdloraError):
        folders.base_source(str(tmp_path / "other"))


def test_image_folders_only_inside_the_data_folder(folders, tmp_path):
    assert folders.data_folder("cats") == (tmp_path / "data/cats").resolve()
    for sneaky in ("../outside", str(tmp_path / "outside"), "cats/../../outside"):
        with pytest.raises(SdloraError, match="outside the allowed folder"):
            folders.data_folder(sneaky)
    without = Folders(adapters=tmp_path, configs=tmp_path)
    with pytest.raises(SdloraError, match="--data-dir"):
        without.data_folder("cats")


def test_presets_are_the_configs_folder_yaml_files(folders):
    assert list(folders.presets()) == ["style"]
    with pytest.raises(SdloraError, match="unknown preset"):
        folders.preset("../style")


def test_ui_flags_default_to_localhost_and_check_folders(tmp_path):
    args = build_parser().parse_args(["ui", "--adapters-dir", str(tmp_path / "new"),
                                      "--outputs-dir", str(tmp_path / "out"),
                                      "--allow-base", "a/b", "--allow-base", "c/d"])
    assert (args.host, args.port, args.base, args.auth) == ("127.0.0.1", 7860, "demo", None)
    folders = folders_from_args(args)
    assert folders.adapters.is_dir() and folders.outputs.is_dir()
    assert folders.allowed_bases == ("a/b", "c/d")
    assert build_parser().parse_args(["ui"]).outputs_dir == "outputs"
    args = build_parser().parse_args(["ui", "--models-dir", str(tmp_path / "missing")])
    with pytest.raises(SdloraError, match="--models-dir"):
        folders_from_args(args)


def test_auth_is_user_colon_password():
    assert parse_auth("ann:se:cret") == ("ann", "se:cret")
    assert parse_auth(None) is None
    for bad in ("ann", ":pw", "ann:"):
        with pytest.raises(SdloraError, match="user:password"):
            parse_auth(bad)


def test_a_pickle_only_base_folder_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "pickled"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(SdloraError, match=r"pickle weights \(unet/diffusion_pytorch_model.bin\)"):
        load_base(str(folder))


def test_user_folder_names_are_one_to_one_and_never_paths():
    assert user_folder_name("ann") == "ann"
    assert user_folder_name("../x") == "%2E%2E%2Fx"
    assert user_folder_name("a b") != user_folder_name("a_b")
