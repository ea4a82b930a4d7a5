"""The Generate tab's settings: the form, the request it makes, and the form filled back from
a picture's settings (a history image, or any PNG with A1111's or sdlora's parameters).

The mix (which adapters, at which weights) lives in `MixState`: {name: [weight, *PARTS]},
the values the adapter sliders show. Sliders are re-created when adapters are ticked, so they
take their values from it; a picture's settings fill it and the sliders follow.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from sdlora.mix.block_weights import UNET_BLOCKS
from sdlora.mix.modes import DEFAULT_MIX_MODE, MIX_MODES
from sdlora.render.defaults import DEFAULT_CFG, DEFAULT_SCHEDULER, DEFAULT_STEPS, MAX_CLIP_SKIP
from sdlora.render.init_images import DEFAULT_HIRES_STRENGTH, DEFAULT_STRENGTH
from sdlora.render.prompts import prompt_row
from sdlora.render.schedulers import SAMPLERS
from sdlora.ui.folders import Folders
from sdlora.ui.history import ImageHistory
from sdlora.ui.studio import MAX_BATCH, MAX_SEED, MAX_SIZE, MAX_STEPS, GenerationRequest

# The multipliers under an adapter's slider: its text encoder(s), its UNet, then UNet blocks.
COMPONENT_PARTS = {"te": ("text_encoder", "text_encoder_2"), "unet": ("unet",)}
PARTS = (*COMPONENT_PARTS, *UNET_BLOCKS)
MixState = dict[str, list[float]]


def unit_mix() -> list[float]:
    return [1.0] * (1 + len(PARTS))


@dataclass
class GenerateForm:
    base: gr.Dropdown
    prompt: gr.Textbox
    negative: gr.Textbox
    seed: gr.Number
    steps: gr.Slider
    cfg: gr.Slider
    width: gr.Slider
    height: gr.Slider
    scheduler: gr.Dropdown
    clip_skip: gr.Slider
    batch: gr.Slider
    init: gr.ImageMask
    strength: gr.Slider
    hires_scale: gr.Slider
    hires_strength: gr.Slider
    mix_mode: gr.Dropdown

    @property
    def components(self) -> list:
        return [getattr(self, item.name) for item in fields(self)]

    def request(self, values: dict, mix: MixState, history: ImageHistory) -> GenerationRequest:
        """The request for the form's `values` ({component: value}) and the ticked `mix`; an
        init image (and the mask painted on it) is kept in the user's outputs folder."""
        init, mask = _init_files(values[self.init], history)
        hires = float(values[self.hires_scale])
        return GenerationRequest(
            prompt=values[self.prompt] or "",
            base=values[self.base] or "",
            negative=values[self.negative] or "",
            seed=int(values[self.seed] or 0),
            steps=int(values[self.steps]),
            cfg=float(values[self.cfg]),
            width=int(values[self.width]) or None,
            height=int(values[self.height]) or None,
            scheduler=values[self.scheduler],
            clip_skip=int(values[self.clip_skip]),
            batch=int(values[self.batch]),
            weights={name: parts[0] for name, parts in mix.items()},
            block_weights={
                name: {part: value for part, value in zip(PARTS, parts[1:])
                       if part in UNET_BLOCKS and value != 1.0}
                for name, parts in mix.items()
            },
            component_weights={
                name: {component: value for part, value in zip(PARTS, parts[1:])
                       if value != 1.0 for component in COMPONENT_PARTS.get(part, ())}
                for name, parts in mix.items()
            },
            init_image=str(init) if init else None,
            mask=str(mask) if mask else None,
            strength=float(values[self.strength]) if init else None,
            hires_scale=hires if hires > 1 and not init else None,
            hires_strength=float(values[self.hires_strength]) if hires > 1 and not init else None,
            mix_mode=values[self.mix_mode],
        )

    def filled(self, settings: dict, folders: Folders, user: str | None,
               history: ImageHistory) -> tuple[dict, list[str], MixState]:
        """({component: value}, ticked adapters, mix) for a picture's settings
        (`settings_from_png`); adapters missing from the user's list are left out, with a
        warning."""
        row = prompt_row(settings.get("prompt", ""), settings.get("negative"), where="PNG")
        loras = {**settings.get("loras", {}), **row.loras}
        components = {**settings.get("lora_components", {}), **row.lora_components}
        blocks = settings.get("lora_blocks", {})
        # a weight schedule lives in its prompt tag (<lora:name:1@0.5-1>): put it back there
        schedules = {**settings.get("lora_schedules", {}), **row.lora_schedules}
        tags = "".join(f" <lora:{name}:{loras[name]:g}{schedule}>"
                       for name, schedule in schedules.items() if name in loras)
        known = {info.name for info in folders.list_adapters(user)}
        missing = sorted(name for name in loras if name not in known)
        if missing:
            gr.Warning(f"not in your adapters, left out: {', '.join(missing)}")
        mix = {name: _parts(weight, components.get(name, {}), blocks.get(name, {}))
               for name, weight in loras.items() if name in known}
        values = {
            self.prompt: row.prompt + tags,
            self.negative: row.negative or "",
            self.seed: settings.get("seed", 0),
            self.steps: settings.get("steps", DEFAULT_STEPS),
            self.cfg: settings.get("cfg", DEFAULT_CFG),
            self.width: settings.get("width") or 0,
            self.height: settings.get("height") or 0,
            self.scheduler: settings.get("scheduler", DEFAULT_SCHEDULER),
            self.clip_skip: settings.get("clip_skip", 1),
            self.strength: settings.get("strength") or DEFAULT_STRENGTH,
            self.hires_scale: settings.get("hires_scale") or 1,
            self.hires_strength: settings.get("hires_strength") or DEFAULT_HIRES_STRENGTH,
            self.init: _editor_value(settings.get("init_image"), settings.get("mask"), history),
            self.mix_mode: settings.get("mix_mode", DEFAULT_MIX_MODE),
        }
        return values, list(mix), mix


def generate_form(base: gr.Dropdown) -> GenerateForm:
    """The prompt and settings controls (laid out where called)."""
    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt", interactive=True)
    negative = gr.Textbox(label="Negative prompt", elem_id="negative", interactive=True)
    with gr.Row():
        seed = gr.Number(0, label="Seed", precision=0, minimum=-1, maximum=MAX_SEED,
                         info="-1: a new random seed each time", elem_id="seed",
                         interactive=True)
        steps = gr.Slider(1, MAX_STEPS, DEFAULT_STEPS, step=1, label="Steps", elem_id="steps",
                          interactive=True)
        cfg = gr.Slider(1, 20, DEFAULT_CFG, step=0.5, label="CFG scale", elem_id="cfg",
                        interactive=True)
    with gr.Row():
        width, height = _size_slider("Width"), _size_slider("Height")
        scheduler = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SCHEDULER, label="Scheduler",
                                elem_id="scheduler", interactive=True)
        clip_skip = gr.Slider(1, MAX_CLIP_SKIP, 1, step=1, label="Clip skip",
                              elem_id="clip-skip", interactive=True)
        batch = gr.Slider(1, MAX_BATCH, 1, step=1, label="Batch count", elem_id="batch",
                          interactive=True)
        mix_mode = gr.Dropdown(list(MIX_MODES), value=DEFAULT_MIX_MODE, label="Mix mode",
                               info="orthogonal: what two adapters share counts once",
                               elem_id="mix-mode", interactive=True)
    with gr.Accordion("img2img, inpainting, hires fix", open=False, elem_id="image-options"):
        init = gr.ImageMask(label="Init image: paint where to repaint (no paint: img2img)",
                            type="pil", elem_id="init-image", height=320, interactive=True)
        with gr.Row():
            strength = gr.Slider(0, 1, DEFAULT_STRENGTH, step=0.05, label="Denoising strength",
                                 elem_id="strength", interactive=True)
            hires_scale = gr.Slider(1, 4, 1, step=0.25, label="Hires upscale (1: off)",
                                    elem_id="hires-scale", interactive=True)
            hires_strength = gr.Slider(0, 1, DEFAULT_HIRES_STRENGTH, step=0.05,
                                       label="Hires denoising strength",
                                       elem_id="hires-strength", interactive=True)
    return GenerateForm(base, prompt, negative, seed, steps, cfg, width, height, scheduler,
                        clip_skip, batch, init, strength, hires_scale, hires_strength, mix_mode)


def _size_slider(label: str) -> gr.Slider:
    """Width or height in multiples of 8; 0 leaves it to the base (or the init image)."""
    return gr.Slider(0, MAX_SIZE, 0, step=8, label=f"{label} (0: the base's own)",
                     elem_id=label.lower(), interactive=True)


def _parts(weight: float, components: dict, blocks: dict) -> list[float]:
    te = components.get("text_encoder", components.get("text_encoder_2", 1.0))
    finer = sorted(set(blocks) - set(UNET_BLOCKS))
    if finer:
        gr.Warning(f"block weights {', '.join(finer)} have no slider here and are left out")
    return [float(weight), float(te), float(components.get("unet", 1.0)),
            *(float(blocks.get(block, 1.0)) for block in UNET_BLOCKS)]


def _init_files(editor: dict | None, history: ImageHistory) -> tuple[Path | None, Path | None]:
    """The editor's picture and (when something is painted) its mask, saved as inputs."""
    background = (editor or {}).get("background")
    if background is None:
        return None, None
    init = history.save_input(background.convert("RGB"))
    painted = [np.asarray(layer.convert("RGBA"))[..., 3] for layer in editor.get("layers") or []]
    if not painted or not any(alpha.any() for alpha in painted):
        return init, None
    mask = np.maximum.reduce(painted) > 0
    return init, history.save_input(Image.fromarray((mask * 255).astype(np.uint8), "L"))


def _editor_value(init: str | None, mask: str | None, history: ImageHistory):
    """A recorded init image (and mask, as a painted layer) for the editor, when it is one of
    the user's inputs; else the editor is emptied."""
    if not init or not history.owns(Path(init)) or not Path(init).is_file():
        return None
    with Image.open(init) as image:
        background = image.convert("RGB")
    layers = []
    if mask and history.owns(Path(mask)) and Path(mask).is_file():
        with Image.open(mask) as painted:
            layer = Image.new("RGBA", background.size, (255, 255, 255, 0))
            layer.putalpha(painted.convert("L").resize(background.size))
            layers.append(layer)
    return {"background": background, "layers": layers, "composite": background}
