"""Validation grids: the same prompts and seeds rendered without and with the adapter.

The "without" row is rendered once, before the first step (the base never changes); each
validation step adds the "with" row and writes `{output.dir}/validation/step-000100.png`.
Prompts are passed as embeddings so the text encoder may already be freed when it is frozen.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from sdlora.files import atomic_write
from sdlora.grid import labelled_grid
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

    def grid_for_step(self, step: int) -> tuple[Path, Image.Image]:
        with torch.no_grad():
            adapter_row = self.render(self.embed(self.prompts))
        grid = labelled_grid([self.base_row, adapter_row], ["base", f"step {step}"], self.prompts)
        path = self.out_dir / f"step-{step:06d}.png"
        atomic_write(path, lambda temp: grid.save(temp, format="PNG"))
        return path, grid
