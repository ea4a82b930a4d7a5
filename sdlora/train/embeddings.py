"""New prompt words trained with the LoRA (textual inversion; "pivotal tuning" when they train
first and alone).

    embeddings:
      tokens: ["<s1>"]      # new words; captions, the trigger word and validation prompts use them
      init: ["dog"]         # per token: a word whose token vectors (averaged) start it, or "random"
      num_vectors: 2        # vectors per token
      learning_rate: 5.0e-4
      pivot_steps: 0        # > 0: the first steps train the words alone, then the LoRA alone

Each word of `num_vectors` vectors becomes the tokens `word word_1 ...` (diffusers' naming) in
every tokenizer, and each text encoder's token embedding is wrapped by `NewTokens`: ids of the
base vocabulary read the frozen base matrix, the new ids read a trainable (words * vectors,
width) parameter. So the base rows never change and the optimizer holds state for the new
vectors only. Captions are expanded (`word` -> `word word_1`) before tokenizing. SDXL trains one
vector set per encoder. The text encoders then run every step: no text cache.
"""

from __future__ import annotations

import re

import torch

from sdlora.adapters.embeddings import Embedding, check_name
from sdlora.errors import SdloraError

RANDOM_INIT = "random"


class NewTokens(torch.nn.Module):
    """A token embedding with trainable rows after the base's: ids (batch, length) -> (batch,
    length, width)."""

    def __init__(self, base: torch.nn.Embedding, vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.new_vectors = torch.nn.Parameter(vectors.float())

    @property
    def weight(self) -> torch.Tensor:  # the base's rows, for code that reads the matrix
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.base.num_embeddings
        new = (ids >= rows).unsqueeze(-1)
        found = self.base(ids.clamp(max=rows - 1))
        added = self.new_vectors[(ids - rows).clamp(min=0)].to(found.dtype)
        return torch.where(new, added, found)


class TokenTraining:
    """The configured words added to `tokenizers` and trained in `text_encoders` (components
    named `components`)."""

    def __init__(self, config, components: list[str], tokenizers: list, text_encoders: list,
                 seed: int):
        self.config = config
        self.components = components
        inits = config.init or [RANDOM_INIT] * len(config.tokens)
        self.modules: list[NewTokens] = []
        generator = torch.Generator().manual_seed(seed)
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            embeddings = encoder.get_input_embeddings()
            base = embeddings.base if isinstance(embeddings, NewTokens) else embeddings
            vectors = [self._initial(word, init, tokenizer, base, generator)
                       for word, init in zip(config.tokens, inits)]
            added = [piece for word in config.tokens for piece in self.pieces(word)]
            tokenizer.add_tokens(added)
            ids = tokenizer.convert_tokens_to_ids(added)
            if ids != list(range(base.num_embeddings, base.num_embeddings + len(added))):
                raise SdloraError("the tokenizer already holds added tokens; embeddings: needs "
                                  "a base whose tokenizer is its vocabulary alone")
            module = NewTokens(base, torch.cat(vectors)).to(base.weight.device)
            encoder.set_input_embeddings(module)
            self.modules.append(module)

    def pieces(self, word: str) -> list[str]:
        return [word] + [f"{word}_{index}" for index in range(1, self.config.num_vectors)]

    def _initial(self, word: str, init: str, tokenizer, base: torch.nn.Embedding,
                 generator) -> torch.Tensor:
        """(num_vectors, width) start vectors: the init word's mean token vector, or random
        with the base vocabulary's spread."""
        check_name(word, "embeddings.tokens")
        pieces = tokenizer.tokenize(word)
        if len(pieces) == 1 and pieces[0] != tokenizer.unk_token:
            raise SdloraError(f"embeddings.tokens: {word!r} is a word of the tokenizer's "
                              "vocabulary; pick a new one such as '<s1>'")
        weight = base.weight.detach().float().cpu()
        if init == RANDOM_INIT:
            vector = torch.randn(weight.shape[1], generator=generator) * weight.std()
        else:
            ids = tokenizer(init, add_special_tokens=False).input_ids
            if not ids:
                raise SdloraError(f"embeddings.init: {init!r} has no tokens")
            vector = weight[ids].mean(dim=0)
        return vector.expand(self.config.num_vectors, -1).clone()

    def expand(self, captions: list[str]) -> list[str]:
        """Each word -> its vector tokens, as diffusers' maybe_convert_prompt does."""
        pattern = re.compile("|".join(re.escape(w) for w in sorted(self.config.tokens, key=len, reverse=True)))
        return [pattern.sub(lambda m: " ".join(self.pieces(m.group(0))), caption) for caption in captions]

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [module.new_vectors for module in self.modules]

    def param_group(self) -> dict:
        return {"params": self.parameters, "lr": self.config.learning_rate, "weight_decay": 0.0}

    def set_phase(self, step: int, lora_parameters: list[torch.nn.Parameter]) -> None:
        """Pivotal tuning: before `pivot_steps` only the words learn, afterwards only the LoRA.
        A parameter without gradient is skipped by the optimizer (state and all)."""
        if not self.config.pivot_steps:
            return
        pivot = step < self.config.pivot_steps
        for parameter in self.parameters:
            parameter.requires_grad_(pivot)
        for parameter in lora_parameters:
            parameter.requires_grad_(not pivot)

    def state(self) -> dict[str, torch.Tensor]:
        return {c: p.detach().cpu().clone() for c, p in zip(self.components, self.parameters)}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for component, parameter in zip(self.components, self.parameters):
                parameter.copy_(state[component])

    def export(self) -> dict[str, Embedding]:
        """{word: Embedding} with each encoder's (num_vectors, width) vectors."""
        count = self.config.num_vectors
        return {
            word: Embedding(word, {
                component: parameter.detach().float().cpu()[index * count:(index + 1) * count].clone()
                for component, parameter in zip(self.components, self.parameters)
            })
            for index, word in enumerate(self.config.tokens)
        }
