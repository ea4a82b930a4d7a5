"""Validation grids: the same prompts and seeds rendered without and with the adapter.

The "without" row is rendered once, before the first step (the base never changes); each
validation step adds the "with" row (and, for a run on before/after pairs, one at half
strength, where the style should be about half-way) and writes
`{output.dir}/validation/step-000100.png`.
Prompts are passed as embeddings so the text encoder may already be freed when it is frozen.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from sdlora.files import atomic_write
from sdlora.render.grid import labelled_grid
from sdlora.train.conditioning import TextEmbedding


class Validator:
    def __init__(self, pipeline, prompts: list[str], embed, resolution: int, steps: int,
                 guidance: float, seed: int, out_dir: Path):
        """`embed(list_of_prompts) -> TextEmbedding` encodes with the current text encoders."""
        self.pipeline = pipeline
        self.prompts = prompts
        self.embed = embed
        self.resolution = resolution
        self.steps = steps
        self.guidance = guidance
        self.seed = seed
        self.out_dir = out_dir
        self.negative = embed([""])
        self.base_row = self.render(embed(prompts))

    @torch.no_grad()
    def render(self, prompts: TextEmbedding) -> list[Image.Image]:
        images = []
        for index in range(len(self.prompts)):
            kwargs = {"prompt_embeds": prompts.hidden[index : index + 1],
                      "negative_prompt_embeds": self.negative.hidden}
            if prompts.pooled is not None:
                kwargs["pooled_prompt_embeds"] = prompts.pooled[index : index + 1]
                kwargs["negative_pooled_prompt_embeds"] = self.negative.pooled
            generator = torch.Generator("cpu").manual_seed(self.seed + index)
            output = self.pipeline(num_inference_steps=self.steps, guidance_scale=self.guidance,
                                   height=self.resolution, width=self.resolution,
                                   generator=generator, **kwargs)
            images.append(output.images[0])
        return images

    def grid_for_step(self, step: int, at_strength,
                      strengths: tuple[float, ...]) -> tuple[Path, Image.Image]:
        """One row per strength s, rendered inside `at_strength(s)` (a context that runs the
        adapter at strength s)."""
        rows, labels = [self.base_row], ["base"]
        for strength in strengths:
            with at_strength(strength), torch.no_grad():
                rows.append(self.render(self.embed(self.prompts)))
            labels.append(f"step {step}" + (f" at {strength}" if len(strengths) > 1 else ""))
        grid = labelled_grid(rows, labels, self.prompts)
        path = self.out_dir / f"step-{step:06d}.png"
        atomic_write(path, lambda temp: grid.save(temp, format="PNG"))
        return path, grid
