"""Textual-inversion embeddings in files: the layouts A1111, kohya and diffusers use, read into one
form and written back.

An `Embedding` is a name (the word that calls it in a prompt) and its vectors per text encoder:

    {"text_encoder": (vectors, width)}                                    SD 1.x / 2.x
    {"text_encoder": (vectors, 768), "text_encoder_2": (vectors, 1280)}   SDXL (CLIP-L, CLIP-G)

Layouts (safetensors only: a .pt/.bin embedding is a pickle and is refused):

    A1111 / kohya file   `emb_params` (vectors, width); SDXL `clip_l` and `clip_g`. A1111 also
                         reads `string_to_param.*`, its .pt layout flattened into safetensors.
                         The file name is the prompt word.
    diffusers file       `learned_embeds.safetensors`: one key, the token, holding (vectors,
                         width) or (width,). For SDXL diffusers' scripts write clip_l / clip_g.
    bundled in a LoRA    `bundle_emb.<name>.string_to_param.*`; SDXL `bundle_emb.<name>.clip_l`
                         and `.clip_g` (what A1111's Lora extension reads from a LoRA file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlora.errors import SdloraError

BUNDLE_PREFIX = "bundle_emb."
# A1111's and kohya's names for SDXL's two encoders' vectors
SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
_SINGLE_ENCODER_KEYS = ("emb_params", "string_to_param.*")
# A bundled name sits between dots in a key, and a written one becomes a file name
_BAD_NAME = re.compile(r"[./\\\s]")


@dataclass
class Embedding:
    """A prompt word and its vectors, (vectors, width) per text encoder component."""

    name: str
    vectors: dict[str, torch.Tensor]

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def encoders(self) -> str:
        """"clip_l, clip_g" for SDXL, else "one text encoder"; as `sdlora info` shows it."""
        if "text_encoder_2" in self.vectors:
            return ", ".join(SDXL_KEYS)
        return "one text encoder"

    def describe(self) -> str:
        width = "+".join(str(tensor.shape[1]) for tensor in self.vectors.values())
        count = self.num_vectors
        return f"{self.name} ({count} vector{'' if count == 1 else 's'} of width {width}; {self.encoders})"


def check_name(name: str, where: str) -> None:
    if not name or _BAD_NAME.search(name):
        raise SdloraError(
            f"{where}: embedding name {name!r} must be non-empty, without dots, slashes or spaces"
        )


def embedding_from_tensors(name: str, tensors: dict[str, torch.Tensor], where: str) -> Embedding:
    """One embedding's tensors in any layout above (bundle prefix removed) -> `Embedding`."""
    if set(SDXL_KEYS) <= set(tensors):
        vectors = {component: tensors[key] for key, component in SDXL_KEYS.items()}
    else:
        found = [key for key in _SINGLE_ENCODER_KEYS if key in tensors]
        if found:
            vectors = {"text_encoder": tensors[found[0]]}
        elif len(tensors) == 1 and "." not in next(iter(tensors)):
            # diffusers: {token: vectors}; a dotted key is a model's weight, not a token
            vectors = {"text_encoder": next(iter(tensors.values()))}
        else:
            keys = ", ".join(sorted(tensors)[:4]) or "none"
            raise SdloraError(
                f"{where}: no embedding vectors (expected emb_params, clip_l + clip_g, "
                f"string_to_param.* or one token key; found {keys})"
            )
    vectors = {component: _as_matrix(tensor, where) for component, tensor in vectors.items()}
    counts = {tensor.shape[0] for tensor in vectors.values()}
    if len(counts) != 1:
        raise SdloraError(f"{where}: clip_l and clip_g hold different numbers of vectors")
    return Embedding(name=name, vectors=vectors)


def _as_matrix(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """(width,) or (vectors, width) -> (vectors, width) float32; nothing else is an embedding."""
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.shape[0] == 0 or not tensor.is_floating_point():
        raise SdloraError(
            f"{where}: no embedding vectors (a tensor of shape {tuple(tensor.shape)}, "
            "expected (vectors, width))"
        )
    return tensor.float()


def read_embedding_file(path: str | Path, name: str | None = None) -> Embedding:
    """A standalone embedding file (A1111, kohya or diffusers); `name` defaults to the file stem,
    as A1111 names an embedding after its file. Pickles and damaged files are one-line errors."""
    from sdlora.adapters.read import open_safetensors

    path = Path(path)
    with open_safetensors(path, kind="embedding") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    name = name or path.stem
    check_name(name, str(path))
    return embedding_from_tensors(name, tensors, str(path))


def split_bundle(tensors: dict[str, torch.Tensor], where: str) -> dict[str, Embedding]:
    """The embeddings bundled in a LoRA file's `bundle_emb.*` tensors, by name."""
    by_name: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, dot, rest = key[len(BUNDLE_PREFIX) :].partition(".")
        if not dot:
            raise SdloraError(f"{where}: bundled embedding key {key!r} names no vectors")
        by_name.setdefault(name, {})[rest] = tensor
    return {
        name: embedding_from_tensors(name, parts, f"{where} (bundled embedding {name!r})")
        for name, parts in by_name.items()
    }


def bundle_tensors(embeddings: dict[str, Embedding], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`bundle_emb.*` keys as A1111 reads them from a LoRA file."""
    tensors = {}
    for name, embedding in embeddings.items():
        for key, tensor in a1111_tensors(embedding, dtype, single_key="string_to_param.*").items():
            tensors[f"{BUNDLE_PREFIX}{name}.{key}"] = tensor
    return tensors


def a1111_tensors(
    embedding: Embedding, dtype: torch.dtype, single_key: str = "emb_params"
) -> dict[str, torch.Tensor]:
    """A1111's / kohya's standalone layout: `emb_params`, or SDXL's `clip_l` and `clip_g`."""
    if "text_encoder_2" in embedding.vectors:
        return {key: _stored(embedding.vectors[component], dtype) for key, component in SDXL_KEYS.items()}
    return {single_key: _stored(embedding.vectors["text_encoder"], dtype)}


def diffusers_tensors(embedding: Embedding, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """diffusers' learned_embeds layout: {token: (vectors, width)}; SDXL has no one-key form in
    diffusers, whose SDXL scripts write clip_l / clip_g (load each with `state_dict["clip_l"]`)."""
    if "text_encoder_2" in embedding.vectors:
        return a1111_tensors(embedding, dtype)
    return {embedding.name: _stored(embedding.vectors["text_encoder"], dtype)}


def _stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.detach().to("cpu", dtype).contiguous().clone()
