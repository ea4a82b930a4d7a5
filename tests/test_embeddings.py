"""Textual-inversion embeddings: the file layouts A1111 and diffusers read and write, `sdlora
convert --to embedding|diffusers-embedding` and `info`, and loading them in `render` and the
session (an --embeddings-dir, or bundled in a LoRA), with their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factories import random_adapter
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdlora.adapters.embeddings import Embedding, read_embedding_file
from sdlora.adapters.read import read_adapter_file
from sdlora.adapters.write import save_adapter
from sdlora.base.tiny import build_tiny_pipeline
from sdlora.cli import main
from sdlora.render.png import read_png_texts
from sdlora.render.prompt_embeds import encode_prompts
from sdlora.render.session import GenerationSession, ImageRequest

FAST = dict(steps=1, width=64, height=64)


def vectors(family: str, count: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    components = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    return {component: torch.randn(count, 32, generator=generator) for component in components}


def bundled_lora(family: str, path: Path, name: str = "s1", seed: int = 0) -> Path:
    adapter = random_adapter(build_tiny_pipeline(family), path.stem)
    adapter.embeddings = {name: Embedding(name, vectors(family, seed=seed))}
    return save_adapter(adapter, path)


def file_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return sorted(handle.keys())


# -- files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_bundle_uses_a1111_keys_and_reads_back(family, tmp_path):
    path = bundled_lora(family, tmp_path / "lora.safetensors")
    bundle = [key for key in file_keys(path) if key.startswith("bundle_emb.")]
    # the layout A1111's Lora extension (networks.py) reads from a LoRA file
    expected = (["bundle_emb.s1.clip_g", "bundle_emb.s1.clip_l"] if family == "sdxl"
                else ["bundle_emb.s1.string_to_param.*"])
    assert bundle == expected
    read = read_adapter_file(path)
    assert not read.ignored_keys
    for component, tensor in vectors(family).items():
        assert torch.allclose(read.adapter.embeddings["s1"].vectors[component], tensor, atol=1e-3)
    # the diffusers layout leaves them out: diffusers' load_lora_weights refuses such keys
    diffusers_file = save_adapter(read.adapter, tmp_path / "d.safetensors", layout="diffusers")
    assert not any(key.startswith("bundle_emb.") for key in file_keys(diffusers_file))


def test_convert_writes_files_that_diffusers_loads_sd1(tmp_path, capsys):
    lora = bundled_lora("sd1", tmp_path / "lora.safetensors")
    assert main(["convert", str(lora), "--to", "embedding", "--out", str(tmp_path / "a1111")]) == 0
    assert main(["convert", str(lora), "--to", "diffusers-embedding", "--out", str(tmp_path / "hf")]) == 0
    a1111 = tmp_path / "a1111" / "s1.safetensors"
    concept = tmp_path / "hf" / "s1"
    assert file_keys(a1111) == ["emb_params"]  # kohya's and A1111's standalone layout
    assert file_keys(concept / "learned_embeds.safetensors") == ["s1"]  # {token: vectors}
    expected = read_adapter_file(lora).adapter.embeddings["s1"].vectors["text_encoder"]

    pipeline = build_tiny_pipeline("sd1")
    pipeline.load_textual_inversion(str(concept))  # diffusers' own folder convention
    pipeline.load_textual_inversion(str(a1111), token="<a1111>")
    rows = pipeline.text_encoder.get_input_embeddings().weight
    ids = pipeline.tokenizer.convert_tokens_to_ids(["s1", "s1_1", "<a1111>", "<a1111>_1"])
    assert torch.equal(rows[ids[:2]], expected) and torch.equal(rows[ids[2:]], expected)


def test_convert_writes_sdxl_files_that_diffusers_loads(tmp_path):
    lora = bundled_lora("sdxl", tmp_path / "lora.safetensors")
    assert main(["convert", str(lora), "--to", "embedding", "--out", str(tmp_path / "out")]) == 0
    state = load_file(str(tmp_path / "out" / "s1.safetensors"))
    assert sorted(state) == ["clip_g", "clip_l"]
    pipeline = build_tiny_pipeline("sdxl")
    # as diffusers documents loading an SDXL embedding: one call per encoder
    for key, tokenizer, encoder in (("clip_l", pipeline.tokenizer, pipeline.text_encoder),
                                    ("clip_g", pipeline.tokenizer_2, pipeline.text_encoder_2)):
        pipeline.load_textual_inversion(state[key], token="s1", tokenizer=tokenizer, text_encoder=encoder)
        token = tokenizer.convert_tokens_to_ids("s1")
        assert torch.equal(encoder.get_input_embeddings().weight[token], state[key][0])


@pytest.mark.parametrize("shape", [(32,), (3, 32)], ids=["one-vector", "three-vectors"])
def test_reads_diffusers_learned_embeds(shape, tmp_path):
    """diffusers' textual-inversion script saves {placeholder token: vectors}."""
    tensor = torch.randn(*shape)
    save_file({"<cat-toy>": tensor}, str(tmp_path / "learned_embeds.safetensors"))
    embedding = read_embedding_file(tmp_path / "learned_embeds.safetensors", name="cat-toy")
    assert torch.equal(embedding.vectors["text_encoder"], tensor.reshape(-1, 32))


def test_info_lists_bundled_and_standalone_embeddings(tmp_path, capsys):
    lora = bundled_lora("sdxl", tmp_path / "lora.safetensors")
    assert main(["info", str(lora)]) == 0
    assert "s1 (2 vectors of width 32+32; clip_l, clip_g)" in capsys.readouterr().out
    save_file({"emb_params": torch.zeros(4, 32)}, str(tmp_path / "neg.safetensors"))
    assert main(["info", str(tmp_path / "neg.safetensors")]) == 0
    assert "neg (4 vectors of width 32; one text encoder)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"a": torch.zeros(2, 32), "b": torch.zeros(2, 32)}, "no embedding vectors"),
        ({"emb_params": torch.zeros(0, 32)}, "no embedding vectors"),
        ({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(2, 32)}, "different numbers"),
    ],
    ids=["no-known-key", "empty", "uneven-sdxl"],
)
def test_files_without_usable_vectors_are_one_line_errors(tensors, message, tmp_path, capsys):
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    assert main(["info", str(tmp_path / "bad.safetensors")]) != 0
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error


def test_convert_of_a_lora_without_embeddings_is_an_error(tmp_path, capsys):
    lora = save_adapter(random_adapter(build_tiny_pipeline("sd1")), tmp_path / "plain.safetensors")
    assert main(["convert", str(lora), "--to", "embedding", "--out", str(tmp_path / "o")]) != 0
    assert "no bundled embeddings" in capsys.readouterr().err


# -- rendering ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embeddings_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("embeddings")
    save_file({"emb_params": vectors("sd1", 3, seed=1)["text_encoder"]}, str(folder / "EasyNeg.safetensors"))
    (folder / "cat-toy").mkdir()  # a diffusers concept folder
    save_file({"<concept>": torch.randn(32)}, str(folder / "cat-toy" / "learned_embeds.safetensors"))
    return folder


def test_prompt_word_conditions_as_diffusers_loaded_token(tiny_sd1, embeddings_dir):
    session = GenerationSession(str(tiny_sd1), torch.device("cpu"), embeddings_dir=embeddings_dir)
    prompt, negative = "a (easyneg:1.2) Cat-Toy, house <lora:easyneg:1>", "EASYNEG"
    used = session.embeddings.used(prompt, negative, [])
    assert list(used) == ["EasyNeg", "cat-toy"]
    session.embeddings.activate(used)
    ours = encode_prompts(session.pipeline, *(session.embeddings.rewrite(t, used) for t in (prompt, negative)))

    reference = type(session.pipeline).from_pretrained(str(tiny_sd1))
    reference.load_textual_inversion(str(embeddings_dir / "EasyNeg.safetensors"), token="easyneg")
    reference.load_textual_inversion(str(embeddings_dir / "cat-toy"), token="concept-token")
    theirs = encode_prompts(reference, "a (easyneg:1.2) concept-token, house <lora:easyneg:1>", "easyneg")
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_render_records_the_embedding_and_redraws_when_its_file_changes(
    tiny_sd1, embeddings_dir, tmp_path, capsys
):
    folder = tmp_path / "emb"
    folder.mkdir()
    save_file({"emb_params": torch.randn(2, 32)}, str(folder / "neg.safetensors"))
    args = ["render", "--base", str(tiny_sd1), "--out", str(tmp_path / "out"), "--steps", "1",
            "--width", "64", "--height", "64", "--prompt", "a house", "--negative", "neg, blurry",
            "--embeddings-dir", str(folder)]
    assert main(args) == 0
    texts = read_png_texts(tmp_path / "out" / "00000-0.png")
    record = json.loads(texts["sdlora"])
    assert record["embeddings"]["neg"]["path"] == str(folder / "neg.safetensors")
    assert f"TI hashes: \"neg: {record['embeddings']['neg']['hash']}\"" in texts["parameters"]
    capsys.readouterr()
    assert main(args) == 0
    assert "1 already there" in capsys.readouterr().err
    save_file({"emb_params": torch.randn(2, 32)}, str(folder / "neg.safetensors"))
    assert main(args) == 0
    assert "1 image written" in capsys.readouterr().err
    assert (tmp_path / "out" / "00000-0-2.png").is_file()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_bundled_embedding_loads_with_its_lora_and_leaves_with_it(family, request, tmp_path):
    base = request.getfixturevalue(f"tiny_{family}")
    lora = bundled_lora(family, tmp_path / "pivotal.safetensors", name="<s1>")
    session = GenerationSession(str(base), torch.device("cpu"))
    session.use_adapters({"pivotal": lora})
    base_rows = len(session.pipeline.tokenizer)
    with_lora = session.generate(ImageRequest("a <s1> dog", loras={"pivotal": 1.0}, **FAST))
    assert with_lora.record["embeddings"]["<s1>"]["hash"] == session.lora_hashes["pivotal"]
    expected = read_adapter_file(lora).adapter.embeddings["<s1>"].vectors
    for tokenizer, component in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        if component in expected:
            ids = getattr(session.pipeline, tokenizer).convert_tokens_to_ids(
                ["<sdlora-emb-0>", "<sdlora-emb-0>_1"])
            rows = getattr(session.pipeline, component).get_input_embeddings().weight[ids]
            assert torch.equal(rows, expected[component])

    without = session.generate(ImageRequest("a <s1> dog", loras={"pivotal": 0.0}, **FAST))
    assert "embeddings" not in without.record
    assert len(session.pipeline.tokenizer) == base_rows
    assert session.pipeline.text_encoder.get_input_embeddings().num_embeddings == base_rows
    fresh = type(session.pipeline).from_pretrained(str(base))
    ours, theirs = encode_prompts(session.pipeline, "a <s1> dog", ""), encode_prompts(fresh, "a <s1> dog", "")
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def _write(folder: Path, name: str, tensors: dict) -> None:
    save_file(tensors, str(folder / f"{name}.safetensors"))


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("wide", lambda f: _write(f, "wide", {"emb_params": torch.zeros(1, 768)}), "width 768"),
        ("xlemb", lambda f: _write(f, "xlemb", {"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 32)}),
         "another model family"),
        ("cat", lambda f: _write(f, "cat", {"emb_params": torch.zeros(1, 32)}), "named like the word"),
        ("old", lambda f: (f / "old.pt").write_bytes(b"pickle"), "pickle"),
        ("empty", lambda f: _write(f, "empty", {"x.weight": torch.zeros(1, 32), "y": torch.zeros(1)}),
         "no embedding vectors"),
    ],
    ids=["other-width", "sdxl-on-sd1", "vocabulary-word", "pickle", "no-vectors"],
)
def test_unusable_embeddings_are_one_line_errors(name, make, message, tiny_sd1, tmp_path, capsys):
    folder = tmp_path / "emb"
    folder.mkdir()
    make(folder)
    code = main(["render", "--base", str(tiny_sd1), "--out", str(tmp_path / "out"), "--steps", "1",
                 "--width", "64", "--height", "64", "--prompt", f"a {name} house",
                 "--embeddings-dir", str(folder)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and message in error, error
    assert not list((tmp_path / "out").glob("*.png"))


def test_embeddings_dir_must_be_a_folder(tmp_path, capsys):
    code = main(["render", "--base", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"),
                 "--prompt", "x", "--embeddings-dir", str(tmp_path / "missing")])
    assert code != 0 and "is not a folder" in capsys.readouterr().err
