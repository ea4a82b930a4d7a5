"""Prompt text -> the embeddings a diffusers SD / SDXL pipeline is called with, made as A1111 makes them.

    kwargs = encode_prompts(pipeline, "a (red:1.2) fox BREAK forest", "blurry", clip_skip=2)
    image = pipeline(**kwargs, num_inference_steps=20).images[0]

Per text encoder (one for SD 1.x/2.x, two for SDXL), as A1111's sd_hijack_clip does:
1. text -> BREAK-separated sections of (text, weight) fragments (`prompt_syntax`); each fragment
   is tokenized on its own, every token carrying its fragment's weight;
2. tokens -> chunks of at most 75: a BREAK ends a chunk, and a chunk that fills up with a comma
   among its last 20 tokens moves the words after that comma to the next chunk (A1111's
   default "comma padding backtrack" of 20), so a phrase is not cut in two;
3. each chunk [BOS] + tokens + [EOS] + padding to 77 is encoded on its own, at the clip-skip layer
   (`sdlora.base.clip_skip`);
4. weights: each token's embedding is multiplied by its weight, then the chunk is rescaled to
   its unweighted mean;
5. chunks are concatenated along the sequence: (1, 77 * chunks, width). SDXL concatenates the two
   encoders' states along the width and takes the pooled embedding from the first chunk.
The negative prompt is padded with empty-prompt chunks to the positive's count (and the other
way round), since classifier-free guidance batches the two. An empty SDXL negative prompt gives
zeros, as diffusers and A1111 both do for SDXL.

A prompt without syntax that fits 75 tokens gives exactly the pipeline's own `encode_prompt`.
Textual-inversion tokens loaded with `pipeline.load_textual_inversion` work as in diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sdlora.base.clip_skip import check_clip_skip, encode_layer
from sdlora.render.prompt_syntax import (
    Fragment,
    check_prompt_syntax,
    parse_prompt_attention,
    strip_extra_network_tags,
)

COMMA_BACKTRACK = 20  # A1111's default comma_padding_backtrack


@dataclass
class Chunk:
    """Up to 75 prompt tokens with their weights, before BOS/EOS/padding."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@torch.no_grad()  # rendering never back-propagates into the text encoders
def encode_prompts(pipeline, prompt: str, negative: str, clip_skip: int = 1) -> dict:
    """Keyword arguments for the pipeline call: `prompt_embeds` and `negative_prompt_embeds`
    (1, 77 * chunks, width), and for SDXL `pooled_prompt_embeds` and
    `negative_pooled_prompt_embeds` (1, width_2); in the text encoder's dtype, on the pipeline's
    execution device.

    Works for StableDiffusion(XL)Pipeline and their img2img/inpaint variants (same components).
    `<lora:...>` tags are left out of the text, as A1111 does (apply them with
    `prompts.parse_lora_tags`); bad syntax or clip skip is a SdloraError.
    """
    check_prompt_syntax(prompt, "prompt")
    check_prompt_syntax(negative, "negative prompt")
    sdxl = getattr(pipeline, "text_encoder_2", None) is not None
    pairs = [(pipeline.tokenizer, pipeline.text_encoder)]
    if sdxl:
        pairs.append((pipeline.tokenizer_2, pipeline.text_encoder_2))
    check_clip_skip(clip_skip, [encoder for _, encoder in pairs])
    # SDXL was trained with zeros, not the empty prompt's embedding, as its empty negative
    zero_negative = sdxl and not negative.strip() and pipeline.config.get("force_zeros_for_empty_prompt")
    device = pipeline._execution_device

    texts = {"positive": prompt, "negative": negative}
    hidden = {"positive": [], "negative": []}
    pooled = {}
    for tokenizer, encoder in pairs:
        chunks = {key: prompt_chunks(text, tokenizer, pipeline) for key, text in texts.items()}
        count = max(len(chunks["positive"]), len(chunks["negative"]))
        for key in texts:
            chunks[key] += [Chunk()] * (count - len(chunks[key]))  # empty-prompt chunks
            states, pooled[key] = encode_chunks(chunks[key], tokenizer, encoder, clip_skip, sdxl, device)
            hidden[key].append(states)
    embeds = {key: torch.cat(states, dim=-1) for key, states in hidden.items()}
    if zero_negative:
        embeds["negative"] = torch.zeros_like(embeds["negative"])
        pooled["negative"] = torch.zeros_like(pooled["negative"])
    dtype = pipeline.text_encoder.dtype
    kwargs = {
        "prompt_embeds": embeds["positive"].to(device, dtype),
        "negative_prompt_embeds": embeds["negative"].to(device, dtype),
    }
    if sdxl:
        kwargs["pooled_prompt_embeds"] = pooled["positive"].to(device, dtype)
        kwargs["negative_pooled_prompt_embeds"] = pooled["negative"].to(device, dtype)
    return kwargs


def prompt_chunks(text: str, tokenizer, pipeline=None) -> list[Chunk]:
    """A prompt's tokens and weights cut into chunks of at most 75 (see the module docstring).

    `pipeline` (optional) expands multi-vector textual-inversion tokens, as diffusers does.
    """
    size = tokenizer.model_max_length - 2
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks, chunk = [], Chunk()
    sections = parse_prompt_attention(strip_extra_network_tags(text))
    for section_index, section in enumerate(sections):
        if section_index:
            chunks.append(chunk)  # BREAK: the chunk ends here, however short
            chunk = Chunk()
        last_comma = -1
        for token, weight in _weighted_tokens(section, tokenizer, pipeline):
            if token == comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == size and last_comma >= 0 and size - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                chunks.append(Chunk(chunk.tokens[:cut], chunk.weights[:cut]))
                chunk, last_comma = Chunk(chunk.tokens[cut:], chunk.weights[cut:]), -1
            if len(chunk.tokens) == size:
                chunks.append(chunk)
                chunk, last_comma = Chunk(), -1
            chunk.tokens.append(token)
            chunk.weights.append(weight)
    if chunk.tokens or not chunks:
        chunks.append(chunk)
    return chunks


def _weighted_tokens(fragments: list[Fragment], tokenizer, pipeline) -> list[tuple[int, float]]:
    texts = [text for text, _ in fragments]
    if hasattr(pipeline, "maybe_convert_prompt"):
        texts = [pipeline.maybe_convert_prompt(text, tokenizer) for text in texts]
    # no truncation: long prompts are what chunks are for (verbose=False: no length warning)
    ids = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids
    return [(token, weight) for tokens, (_, weight) in zip(ids, fragments) for token in tokens]


def encode_chunks(chunks: list[Chunk], tokenizer, encoder, clip_skip: int, sdxl: bool, device
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunks -> (weighted hidden states (1, 77 * chunks, width), the first chunk's pooled
    projection (1, width) or None)."""
    length = tokenizer.model_max_length
    ids, weights = [], []
    for chunk in chunks:
        padding = length - 2 - len(chunk.tokens)
        ids.append([tokenizer.bos_token_id, *chunk.tokens, tokenizer.eos_token_id]
                   + [tokenizer.pad_token_id] * padding)
        weights.append([1.0, *chunk.weights, 1.0] + [1.0] * padding)
    hidden, pooled = encode_layer(encoder, torch.tensor(ids, device=device), clip_skip, sdxl)
    weights = torch.tensor(weights, device=device, dtype=hidden.dtype).unsqueeze(-1)
    # A1111's emphasis: scale the tokens, then give each chunk back its mean, so that weights
    # shift attention between tokens rather than the overall strength of the conditioning
    weighted = hidden * weights
    weighted_mean = weighted.mean(dim=(1, 2), keepdim=True)
    rescale = hidden.mean(dim=(1, 2), keepdim=True) / weighted_mean
    # A chunk without weights stays exactly as encoded: A1111 rescales it by mean / mean, 1. So
    # does a chunk whose states a layer norm without bias centres (random test encoders): its
    # means are rounding noise, and their ratio would scale the whole chunk by chance
    emphasised = (weights != 1).any(dim=1, keepdim=True)
    centred = weighted_mean.abs() <= 1e-4 * weighted.abs().mean(dim=(1, 2), keepdim=True)
    weighted = weighted * torch.where(emphasised & ~centred, rescale, torch.ones_like(rescale))
    return weighted.reshape(1, -1, hidden.shape[-1]), None if pooled is None else pooled[:1]
