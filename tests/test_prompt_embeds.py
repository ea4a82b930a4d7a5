"""Prompt embeddings as A1111 makes them, checked against diffusers' own encode_prompt."""

from __future__ import annotations

import pytest
import torch

from sdlora.base.tiny import build_tiny_pipeline
from sdlora.errors import SdloraError
from sdlora.render.prompt_embeds import encode_prompts, prompt_chunks

KEYS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds")
LONG = "cat " * 149 + "dog"  # 150 tokens: two chunks


@pytest.fixture(params=["sd1", "sdxl"])
def pipeline(request, sd1, sdxl):
    return {"sd1": sd1, "sdxl": sdxl}[request.param]


def encode(pipeline, prompt, negative="", clip_skip=1):
    with torch.inference_mode():
        return encode_prompts(pipeline, prompt, negative, clip_skip)


def diffusers_encode(pipeline, prompt, negative, **kwargs):
    with torch.inference_mode():
        embeds = pipeline.encode_prompt(prompt, device=pipeline.device, num_images_per_prompt=1,
                                        do_classifier_free_guidance=True,
                                        negative_prompt=negative, **kwargs)
    return dict(zip(KEYS, embeds))


@pytest.mark.parametrize("negative", ["blurry, ugly", None])
def test_plain_prompt_equals_the_pipelines_own_encoding(pipeline, negative):
    ours = encode(pipeline, "a red fox in a forest, oil painting", negative or "")
    theirs = diffusers_encode(pipeline, "a red fox in a forest, oil painting", negative)
    sdxl = pipeline.text_encoder_2 is not None if hasattr(pipeline, "text_encoder_2") else False
    assert set(ours) == set(KEYS if sdxl else KEYS[:2])
    for key, value in ours.items():
        assert value.shape == theirs[key].shape and value.dtype == pipeline.text_encoder.dtype
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=1e-6)
    if sdxl and negative is None:  # SDXL's empty negative prompt is zeros, as in diffusers
        assert not ours["negative_prompt_embeds"].any()


def test_weights_change_embeddings_and_weight_one_changes_nothing(pipeline):
    plain = encode(pipeline, "a red fox")["prompt_embeds"]
    assert torch.equal(encode(pipeline, "a (red:1.0) fox")["prompt_embeds"], plain)
    weighted = encode(pipeline, "a (red:1.5) fox")["prompt_embeds"]
    assert not torch.allclose(weighted, plain)
    # A1111's emphasis keeps the mean; "red" (token 2 after BOS, "a") moved more than the rest
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-5, abs=1e-7)
    change = (weighted - plain).abs().sum(-1)[0]
    assert change[2] > 1.4 * change[1]


def test_long_prompt_is_not_truncated(pipeline):
    ids = pipeline.tokenizer(LONG, add_special_tokens=False).input_ids
    assert len(ids) == 150
    embeds = encode(pipeline, LONG)
    assert embeds["prompt_embeds"].shape[1] == 2 * 77
    # negative padded to the same number of chunks, with the empty prompt's embedding
    assert embeds["negative_prompt_embeds"].shape == embeds["prompt_embeds"].shape
    changed = encode(pipeline, LONG.replace("dog", "castle"))["prompt_embeds"]
    assert torch.equal(changed[:, :77], embeds["prompt_embeds"][:, :77])
    assert not torch.allclose(changed[:, 77:], embeds["prompt_embeds"][:, 77:])


def test_negative_longer_than_prompt_pads_the_prompt(sd1):
    embeds = encode(sd1, "a cat", LONG)
    empty = encode(sd1, "")["prompt_embeds"]
    assert embeds["prompt_embeds"].shape[1] == embeds["negative_prompt_embeds"].shape[1] == 154
    torch.testing.assert_close(embeds["prompt_embeds"][:, 77:], empty, rtol=0, atol=1e-6)


def test_break_starts_a_new_chunk(pipeline):
    chunks = prompt_chunks("a red fox BREAK a forest", pipeline.tokenizer)
    assert [len(chunk.tokens) for chunk in chunks] == [3, 2]
    broken = encode(pipeline, "a red fox BREAK a forest")["prompt_embeds"]
    assert broken.shape[1] == 2 * 77
    # chunks encoded as one batch: equal to one at a time up to float rounding
    close = dict(rtol=0, atol=1e-6)
    torch.testing.assert_close(broken[:, :77], encode(pipeline, "a red fox")["prompt_embeds"], **close)
    torch.testing.assert_close(broken[:, 77:], encode(pipeline, "a forest")["prompt_embeds"], **close)


def test_a_full_chunk_moves_the_words_after_its_last_comma_to_the_next(sd1):
    # 70 words, a comma, then 10 more: A1111 cuts after the comma, not at token 75
    prompt = "cat " * 70 + ", " + "dog " * 10
    assert [len(chunk.tokens) for chunk in prompt_chunks(prompt, sd1.tokenizer)] == [71, 10]
    # with the comma more than 20 tokens back, the cut stays at 75
    prompt = "cat " * 50 + ", " + "dog " * 30
    assert [len(chunk.tokens) for chunk in prompt_chunks(prompt, sd1.tokenizer)] == [75, 6]


def test_sdxl_pooled_embedding_comes_from_the_first_chunk(sdxl):
    long = encode(sdxl, "a red fox BREAK a forest")
    short = encode(sdxl, "a red fox")
    torch.testing.assert_close(long["pooled_prompt_embeds"], short["pooled_prompt_embeds"],
                               rtol=0, atol=1e-6)


def test_clip_skip_2_is_the_penultimate_layer_through_the_final_norm(sd1):
    ids = sd1.tokenizer("a red fox", padding="max_length", max_length=77,
                        return_tensors="pt").input_ids
    with torch.inference_mode():
        states = sd1.text_encoder(ids, output_hidden_states=True).hidden_states
        expected = sd1.text_encoder.final_layer_norm(states[-2])
    skipped = encode(sd1, "a red fox", clip_skip=2)["prompt_embeds"]
    torch.testing.assert_close(skipped, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(skipped, encode(sd1, "a red fox")["prompt_embeds"])


def test_sdxl_clip_skip_counts_from_its_penultimate_default():
    pipeline = build_tiny_pipeline("sdxl")
    for name in ("text_encoder", "text_encoder_2"):  # 4 layers, so that clip skip 3 exists
        old = getattr(pipeline, name)
        old.config.num_hidden_layers = 4
        setattr(pipeline, name, type(old)(old.config).eval())
    default = encode(pipeline, "a red fox", "blurry")
    assert all(torch.equal(default[key], value)
               for key, value in encode(pipeline, "a red fox", "blurry", clip_skip=2).items())
    skipped = encode(pipeline, "a red fox", "blurry", clip_skip=3)
    theirs = diffusers_encode(pipeline, "a red fox", "blurry", clip_skip=1)  # diffusers' k = N - 2
    # (diffusers applies its clip_skip to the prompt only; A1111 and sdlora to both prompts)
    for key in ("prompt_embeds", "pooled_prompt_embeds"):
        torch.testing.assert_close(skipped[key], theirs[key], rtol=0, atol=1e-6)
    for key in ("prompt_embeds", "negative_prompt_embeds"):
        assert not torch.allclose(skipped[key], default[key])


@pytest.mark.parametrize("clip_skip", [0, 3, 1.5, True])
def test_clip_skip_out_of_range_is_a_one_line_error(sd1, clip_skip):
    with pytest.raises(SdloraError, match=r"clip skip must be a whole number from 1 to 2"):
        encode(sd1, "a cat", clip_skip=clip_skip)


def test_bad_syntax_and_tags(sd1):
    with pytest.raises(SdloraError, match=r"negative prompt: weight 'abc'"):
        encode(sd1, "a cat", "(ugly:abc)")
    # adapter tags are left out of the text, as A1111 does
    assert torch.equal(encode(sd1, "a <lora:style:0.5:1> cat")["prompt_embeds"],
                       encode(sd1, "a cat")["prompt_embeds"])


def test_textual_inversion_tokens_expand_as_in_diffusers(sd1):
    pipeline = build_tiny_pipeline("sd1")
    pipeline.load_textual_inversion({"<style>": torch.randn(3, 32)}, token="<style>")
    ours = encode(pipeline, "a cat in <style>", "blurry")
    theirs = diffusers_encode(pipeline, "a cat in <style>", "blurry")
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=1e-6)


def test_weights_change_the_image_in_txt2img_and_img2img(sd1, sdxl):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    def draw(pipeline, prompt, **kwargs):
        with torch.inference_mode():
            return pipeline(**encode(pipeline, prompt, "blurry"), num_inference_steps=2,
                            generator=torch.Generator().manual_seed(0), output_type="np",
                            **kwargs).images[0]

    plain, weighted = (draw(sd1, prompt, width=64, height=64) for prompt in ("a red fox", "a (red:1.6) fox"))
    assert abs(plain - weighted).max() > 1e-4
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl)
    image = torch.rand(1, 3, 64, 64)
    plain, long = (draw(img2img, prompt, image=image, strength=0.9) for prompt in ("a red fox", LONG))
    assert plain.shape == long.shape == (64, 64, 3) and abs(plain - long).max() > 1e-4
