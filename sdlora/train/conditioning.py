"""What the UNet is conditioned on, per family: text embeddings and SDXL's size/crop ids.

SD 1.x/2.x: the hidden state of one CLIP text encoder at the clip-skip layer (the last layer
by default), (batch, 77, width).
SDXL: the penultimate hidden states of both encoders concatenated, (batch, 77, w1 + w2), plus
the pooled projection of the second, (batch, w2), and six "time ids" per image:
original (h, w), crop top-left (top, left), target (h, w).
Clip skip is counted as A1111 counts it (`sdlora.base.clip_skip`), and the renderer encodes
prompts through the same function, so an adapter is drawn with the embeddings it learned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdlora.base.clip_skip import encode_layer


@dataclass
class TextEmbedding:
    hidden: torch.Tensor  # (batch, 77, width)
    pooled: torch.Tensor | None  # (batch, width_2) for SDXL, None otherwise

    def to(self, device, dtype=None) -> TextEmbedding:
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        return TextEmbedding(self.hidden.to(device, dtype), pooled)

    def __getitem__(self, index) -> TextEmbedding:
        pooled = None if self.pooled is None else self.pooled[index]
        return TextEmbedding(self.hidden[index], pooled)

    @staticmethod
    def cat(embeddings: list[TextEmbedding]) -> TextEmbedding:
        hidden = torch.cat([e.hidden for e in embeddings])
        pooled = None if embeddings[0].pooled is None else torch.cat([e.pooled for e in embeddings])
        return TextEmbedding(hidden, pooled)


def encode_text(captions: list[str], tokenizers: list, text_encoders: list[torch.nn.Module],
                device: torch.device, clip_skip: int = 1) -> TextEmbedding:
    """Embed captions with one encoder (SD 1.x/2.x) or two (SDXL); keeps gradients."""
    hidden_states, pooled = [], None
    sdxl = len(text_encoders) == 2
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        hidden, projected = encode_layer(encoder, ids, clip_skip, sdxl)
        hidden_states.append(hidden)
        pooled = projected if projected is not None else pooled  # SDXL: the second encoder's
    return TextEmbedding(torch.cat(hidden_states, dim=-1), pooled)


def unet_conditioning(text: TextEmbedding, original_sizes, crops_top_left, target_sizes) -> dict:
    """Keyword arguments for `unet(...)`: encoder states and, for SDXL, added conditions."""
    kwargs = {"encoder_hidden_states": text.hidden}
    if text.pooled is not None:
        time_ids = torch.tensor(
            [list(o) + list(c) + list(t) for o, c, t in zip(original_sizes, crops_top_left, target_sizes)],
            dtype=text.hidden.dtype, device=text.hidden.device,
        )
        kwargs["added_cond_kwargs"] = {"text_embeds": text.pooled, "time_ids": time_ids}
    return kwargs
