"""Training new prompt words with the LoRA (sdlora.train.embeddings): bundled in the adapter,
pivotal phases, bit-exact resume, validation grids and `render` using the trained words."""

from __future__ import annotations

import pytest
import torch
from test_train import interrupt_at, tiny_config

from sdlora.adapters.read import read_adapter_file
from sdlora.base.tiny import build_tiny_pipeline
from sdlora.errors import SdloraError
from sdlora.render.session import GenerationSession, ImageRequest
from sdlora.train.loop import train

WORDS = {"tokens": ["<s1>"], "init": ["dog"], "num_vectors": 2, "learning_rate": 1e-2}


def dog_vector(family: str, component: str) -> torch.Tensor:
    pipeline = build_tiny_pipeline(family)  # the same seed as the saved tiny base
    tokenizer = pipeline.tokenizer if component == "text_encoder" else pipeline.tokenizer_2
    ids = tokenizer("dog", add_special_tokens=False).input_ids
    return getattr(pipeline, component).get_input_embeddings().weight[ids].mean(0).detach()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_words_train_from_their_init_and_are_bundled(family, request, tmp_path):
    base = request.getfixturevalue(f"tiny_{family}")
    config = tiny_config(base, tmp_path, embeddings=WORDS,
                         data={"instance_prompt": "a painting of <s1>"},
                         validation={"prompts": ["<s1> on grass"], "every": 3, "steps": 1})
    adapter = read_adapter_file(train(config)).adapter
    embedding = adapter.embeddings["<s1>"]
    components = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    assert sorted(embedding.vectors) == components
    for component in components:
        start = dog_vector(family, component)
        vectors = embedding.vectors[component]
        assert vectors.shape == (2, 32)
        assert not torch.allclose(vectors, start.expand(2, -1), atol=1e-4)  # it learned
        assert (vectors - start).abs().max() < 1.0  # from the init word, not from random
    assert (tmp_path / "out" / "validation" / "step-000003.png").is_file()

    session = GenerationSession(str(base), torch.device("cpu"))
    session.use_adapters({"style": config.adapter_path})
    record = session.generate(ImageRequest("<s1> in a field", loras={"style": 1.0}, steps=1,
                                           width=64, height=64)).record
    assert record["embeddings"]["<s1>"]["hash"] == session.lora_hashes["style"]


def test_pivot_steps_train_the_words_alone_then_the_lora_alone(tiny_sd1, tmp_path):
    pivotal = dict(WORDS, pivot_steps=2)
    steps = {}
    for stop in (2, 4):
        config = tiny_config(tiny_sd1, tmp_path / str(stop), embeddings=pivotal,
                             train={"steps": stop}, output={"dtype": "fp32"})
        steps[stop] = read_adapter_file(train(config)).adapter
    at_pivot, after = steps[2], steps[4]
    # during the pivot the LoRA stays at its start (B = 0: no update at all)
    assert all(layer.up.abs().max() == 0 for layer in at_pivot.layers.values())
    assert any(layer.up.abs().max() > 0 for layer in after.layers.values())
    words = [s.embeddings["<s1>"].vectors["text_encoder"] for s in (at_pivot, after)]
    assert torch.equal(words[0], words[1])  # frozen after the pivot


def test_resume_with_words_equals_the_uninterrupted_run(tiny_sd1, tmp_path):
    settings = dict(embeddings=dict(WORDS, pivot_steps=3), train={"steps": 6},
                    output={"dtype": "fp32"})
    straight = read_adapter_file(train(tiny_config(tiny_sd1, tmp_path / "a", **settings))).adapter
    config = tiny_config(tiny_sd1, tmp_path / "b", **settings)
    with pytest.raises(KeyboardInterrupt):
        train(config, on_step=interrupt_at(2))
    resumed = read_adapter_file(train(config, resume="latest")).adapter
    assert torch.equal(straight.embeddings["<s1>"].vectors["text_encoder"],
                       resumed.embeddings["<s1>"].vectors["text_encoder"])
    assert all(torch.equal(straight.layers[k].up, resumed.layers[k].up) for k in straight.layers)


@pytest.mark.parametrize("words, message", [
    ({"tokens": ["dog"]}, "a word of the tokenizer's vocabulary"),
    ({"tokens": ["<s1>"], "init": ["a", "b"]}, "one entry"),
    ({"tokens": ["s.1"]}, "without dots"),
], ids=["vocabulary-word", "init-count", "dotted"])
def test_bad_words_are_one_line_errors(words, message, tiny_sd1, tmp_path):
    with pytest.raises(SdloraError, match=message) as error:
        train(tiny_config(tiny_sd1, tmp_path, embeddings=words))
    assert "\n" not in str(error.value)
