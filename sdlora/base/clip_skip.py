"""Which text-encoder layer conditions the UNet: clip skip, counted as AUTOMATIC1111 counts it.

"Clip skip: N" takes the hidden state N layers from the end of the CLIP text encoder.

SD 1.x / 2.x: N=1 (the default) is the last layer's output; N=2 is the penultimate layer's
hidden state passed through the final layer norm, as A1111 and ComfyUI do (anime models are
trained on it). diffusers counts from 0: its `clip_skip=k` is A1111's N = k + 1.

SDXL: the UNet was trained on the penultimate hidden state of both encoders, without the final
layer norm. A1111 ignores its clip-skip setting for SDXL and ComfyUI's SDXL default is layer -2,
so here N=1 and N=2 both mean that penultimate layer (diffusers' default, so a plain SDXL render
is unchanged). A larger N goes further back in both encoders, as ComfyUI's "CLIP Set Last
Layer" at -N does; diffusers' SDXL `clip_skip=k` is N = k + 2. SDXL's pooled embedding (the
second encoder's projection of the end token) is the same for every N.

Training and rendering both call `encode_layer`, so an adapter trained with clip skip 2 is drawn
with exactly the embeddings it was trained on.
"""

from __future__ import annotations

import torch

from sdlora.errors import SdloraError

# hidden_states[-1] is the last layer; the SDXL UNet reads hidden_states[-2]
SDXL_LAYER_FROM_END = 2


def max_clip_skip(text_encoders: list[torch.nn.Module]) -> int:
    """The largest clip skip every encoder can give: its number of transformer layers."""
    return min(encoder.config.num_hidden_layers for encoder in text_encoders)


def check_clip_skip(clip_skip, text_encoders: list[torch.nn.Module], what: str = "clip skip") -> None:
    """A whole number from 1 to the encoders' layer count (12 for SD 1.x and SDXL, 23 for SD 2.x)."""
    highest = max_clip_skip(text_encoders)
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= highest:
        raise SdloraError(
            f"{what} must be a whole number from 1 to {highest} "
            f"(the text encoder has {highest} layers), got {clip_skip!r}"
        )


def encode_layer(encoder: torch.nn.Module, ids: torch.Tensor, clip_skip: int, sdxl: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (batch, 77) -> (hidden state at clip skip `clip_skip`: (batch, 77, width),
    pooled projection (batch, projection width) when the encoder has one, else None).

    `sdxl` says the encoder is one of SDXL's two (see the module docstring for the layers).
    """
    from_end = max(clip_skip, SDXL_LAYER_FROM_END) if sdxl else clip_skip
    output = encoder(ids, output_hidden_states=from_end > 1)
    if from_end == 1:
        hidden = output.last_hidden_state
    elif sdxl:
        hidden = output.hidden_states[-from_end]
    else:
        # transformers 5's CLIPTextModel holds the norm itself; 4.x and the projection model
        # hold it in .text_model (where diffusers' own clip_skip looks, failing on 5.x)
        text_model = getattr(encoder, "text_model", encoder)
        hidden = text_model.final_layer_norm(output.hidden_states[-from_end])
    return hidden, getattr(output, "text_embeds", None)
