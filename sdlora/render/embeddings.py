"""Textual-inversion embeddings in a generation session: which ones a request uses, and loading them.

Where embeddings come from (A1111's conventions):
    --embeddings-dir DIR   DIR/<name>.safetensors (A1111, kohya or diffusers layout) and
                           DIR/<name>/learned_embeds.safetensors (a diffusers concept folder);
                           the name is the word that calls it in a prompt or negative prompt
    a LoRA's bundle        its `bundle_emb.<name>.*` embeddings, while the LoRA is in the mix
                           (weight != 0); a bundled name wins over a folder file of that name
A name is found case-insensitively as a whole word (letters, digits, _ and - make up words;
`<lora:...>` tags are not searched); the longest name wins where names overlap.

    request -> `used(prompt, negative, adapters)` -> {name: UsedEmbedding} (name, file, hash:
        recorded in the PNG, so another embedding file is another picture)
    -> `activate(used)`: each tokenizer is re-created from the base's, each token-embedding
       matrix cut back to the base's rows, then every used embedding is loaded with diffusers'
       `load_textual_inversion` under a placeholder token `<sdlora-emb-K>` (vectors 2.. as
       `<sdlora-emb-K>_1`, ..., which diffusers' `maybe_convert_prompt` expands)
    -> `rewrite(text, used)`: each name in the text becomes its placeholder.
So the tokens a picture sees depend on its request alone, never on what was loaded before, and an
adapter's tokens are gone once it leaves the mix.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

from sdlora.adapters.embeddings import Embedding, read_embedding_file
from sdlora.errors import SdloraError
from sdlora.files import PICKLE_SUFFIXES
from sdlora.render.png import file_sha256
from sdlora.render.prompt_syntax import EXTRA_NETWORK_TAG

DIFFUSERS_FILE = "learned_embeds.safetensors"
_ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


@dataclass
class UsedEmbedding:
    """An embedding a request calls: where it came from (recorded) and its vectors."""

    name: str
    path: Path  # the embedding file, or the LoRA file it is bundled in
    hash: str  # A1111's short hash: sha256 of the file, 12 hex digits
    embedding: Embedding

    def record(self) -> dict:
        return {"path": str(self.path), "hash": self.hash}


def placeholder(slot: int) -> str:
    """The token the `slot`-th used embedding is loaded under; never a word of any prompt."""
    return f"<sdlora-emb-{slot}>"


class SessionEmbeddings:
    """The embeddings one session can use, and the pipeline's tokenizers and token embeddings."""

    def __init__(self, pipeline, directory: str | Path | None = None):
        self.pipeline = pipeline
        self.directory = Path(directory) if directory else None
        if self.directory is not None and not self.directory.is_dir():
            raise SdloraError(f"--embeddings-dir {str(directory)!r} is not a folder")
        self.encoders = [
            (tokenizer, encoder) for tokenizer, encoder in _ENCODERS
            if getattr(pipeline, encoder, None) is not None
        ]
        # never changed: `activate` loads embeddings into copies of them
        self._base_tokenizers = {name: getattr(pipeline, name) for name, _ in self.encoders}
        self._base_rows = {
            encoder: getattr(pipeline, encoder).get_input_embeddings().num_embeddings
            for _, encoder in self.encoders
        }
        self._bundled: dict[str, list[UsedEmbedding]] = {}  # adapter name -> its embeddings
        self._files: dict[tuple[Path, int], UsedEmbedding] = {}  # (file, mtime ns) -> read
        self._loaded: tuple[tuple[str, str], ...] = ()  # (name, hash) of what the pipeline holds

    def set_bundled(self, adapter: str, path: Path, embeddings: dict[str, Embedding], hash: str) -> None:
        """The embeddings bundled in adapter `adapter` (file `path`, short hash `hash`)."""
        self._bundled[adapter] = [UsedEmbedding(e.name, path, hash, e) for e in embeddings.values()]

    # -- which embeddings a request uses -----------------------------------------------------

    def used(self, prompt: str, negative: str, adapters: list[str]) -> dict[str, UsedEmbedding]:
        """The embeddings `prompt` and `negative` name, in the order first named; `adapters` are
        the adapters in the mix. A name that cannot be used is a SdloraError."""
        available = self._folder_names()
        bundled = {e.name.lower(): e for a in adapters for e in self._bundled.get(a, [])}
        available.update(dict.fromkeys(bundled))
        if not available:
            return {}
        pattern = _name_pattern(available)
        used: dict[str, UsedEmbedding] = {}
        for text in (prompt, negative):
            for match in _outside_tags(text, pattern):
                key = match.group(0).lower()
                if key not in used:
                    used[key] = bundled.get(key) or self._read(available[key])
        for item in used.values():
            self._check(item)
        return {item.name: item for item in used.values()}

    def _folder_names(self) -> dict[str, Path | None]:
        """{lower-case name: file} of the --embeddings-dir (pickles included, to refuse them)."""
        if self.directory is None:
            return {}
        names: dict[str, Path | None] = {}
        for path in sorted(self.directory.iterdir()):
            if path.is_dir() and (path / DIFFUSERS_FILE).is_file():
                names[path.name.lower()] = path / DIFFUSERS_FILE
            elif path.suffix.lower() == ".safetensors" or (
                # a pickle is listed only to be refused when named; a .safetensors file wins
                path.suffix.lower() in PICKLE_SUFFIXES and path.stem.lower() not in names
            ):
                names[path.stem.lower()] = path
        return names

    def _read(self, path: Path) -> UsedEmbedding:
        name = path.parent.name if path.name == DIFFUSERS_FILE else path.stem
        key = (path, path.stat().st_mtime_ns)
        if key not in self._files:
            embedding = read_embedding_file(path, name=name)
            self._files[key] = UsedEmbedding(name, path, file_sha256(path)[:12], embedding)
        return self._files[key]

    def _check(self, item: UsedEmbedding) -> None:
        """The embedding fits the base: the same text encoders, of the same widths, and its
        name is not a word the tokenizer already knows (that word would be lost)."""
        where = f"embedding {item.name!r} ({item.path})"
        wanted = [encoder for _, encoder in self.encoders]
        if sorted(item.embedding.vectors) != sorted(wanted):
            held = "SDXL's two" if "text_encoder_2" in item.embedding.vectors else "one"
            raise SdloraError(
                f"{where} holds vectors for {held} text encoder(s) but the base has {len(wanted)}; "
                "it was made for another model family"
            )
        for component, vectors in item.embedding.vectors.items():
            width = getattr(self.pipeline, component).get_input_embeddings().embedding_dim
            if vectors.shape[1] != width:
                raise SdloraError(
                    f"{where} has vectors of width {vectors.shape[1]} but the base's {component} "
                    f"takes {width}; it was made for another model"
                )
        tokenizer = self._base_tokenizers["tokenizer"]
        pieces = tokenizer.tokenize(item.name)
        if len(pieces) == 1 and pieces[0] != tokenizer.unk_token:
            raise SdloraError(
                f"{where} is named like the word {item.name!r} of the tokenizer's vocabulary, "
                "which it would replace; rename it"
            )

    # -- loading them ------------------------------------------------------------------------

    def activate(self, used: dict[str, UsedEmbedding]) -> None:
        """Make the pipeline's tokenizers and token embeddings the base's plus exactly `used`."""
        wanted = tuple((item.name, item.hash) for item in used.values())
        if wanted == self._loaded:
            return
        for tokenizer_name, encoder_name in self.encoders:
            base = self._base_tokenizers[tokenizer_name]
            setattr(self.pipeline, tokenizer_name, copy.deepcopy(base) if used else base)
            getattr(self.pipeline, encoder_name).resize_token_embeddings(self._base_rows[encoder_name])
        self._loaded = ()
        for slot, item in enumerate(used.values()):
            for tokenizer_name, encoder_name in self.encoders:
                self.pipeline.load_textual_inversion(
                    item.embedding.vectors[encoder_name],
                    token=placeholder(slot),
                    tokenizer=getattr(self.pipeline, tokenizer_name),
                    text_encoder=getattr(self.pipeline, encoder_name),
                )
        self._loaded = wanted

    @staticmethod
    def rewrite(text: str, used: dict[str, UsedEmbedding]) -> str:
        """`text` with each used embedding's name replaced by its placeholder token."""
        if not used:
            return text
        slots = {name.lower(): placeholder(slot) for slot, name in enumerate(used)}
        pattern = _name_pattern(slots)
        pieces, end = [], 0
        for match in _outside_tags(text, pattern):
            pieces += [text[end : match.start()], slots[match.group(0).lower()]]
            end = match.end()
        return "".join(pieces) + text[end:]


def _name_pattern(names) -> re.Pattern:
    """Whole-word, case-insensitive alternation of `names`, longest first."""
    alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE)


def _outside_tags(text: str, pattern: re.Pattern) -> list[re.Match]:
    """Matches of `pattern` in `text` that are not inside a `<lora:...>`-style tag."""
    tags = [match.span() for match in EXTRA_NETWORK_TAG.finditer(text)]
    return [
        match for match in pattern.finditer(text)
        if not any(start <= match.start() < end for start, end in tags)
    ]

