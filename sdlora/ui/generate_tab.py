"""The Generate tab: adapters with a slider each, the usual settings, a gallery, the CLI line.

Ticking an adapter renders its controls (`gr.render`): a weight slider, its trigger words with
a button that puts them in the prompt, and per-block weights in a collapsed section. Every
request sends the whole mix to `Studio.generate`, so each browser gets its own sliders' mix.
With "Render on release" ticked, letting go of any adapter slider renders at once, as Generate
does (only the last release of a quick series runs).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

import gradio as gr

from sdlora.errors import SdloraError
from sdlora.mix.block_weights import UNET_BLOCKS
from sdlora.render.defaults import DEFAULT_STEPS, MAX_CLIP_SKIP
from sdlora.render.schedulers import SAMPLERS
from sdlora.ui.folders import Folders
from sdlora.ui.studio import (
    MAX_BATCH,
    MAX_SEED,
    MAX_SIZE,
    MAX_STEPS,
    GenerationRequest,
    Studio,
)

WEIGHT_RANGE = (-1.0, 2.0)
# The multipliers under an adapter's slider: its text encoder(s), its UNet, then UNet blocks.
COMPONENT_PARTS = {"te": ("text_encoder", "text_encoder_2"), "unet": ("unet",)}
PARTS = (*COMPONENT_PARTS, *UNET_BLOCKS)
WEIGHT_STEP = 0.05


@dataclass
class AdapterPicker:
    """The adapter checkboxes and what is known about each adapter (name -> trigger words)."""

    box: gr.CheckboxGroup
    trigger_words: gr.State
    folders: Folders

    def refresh(self, ticked: list[str] | None = None):
        """New choices from the adapters folder; ticked adapters that still exist stay ticked."""
        found = {info.name: info.trigger_words for info in self.folders.list_adapters()}
        kept = [name for name in ticked or [] if name in found]
        return gr.update(choices=list(found), value=kept), found

    @property
    def outputs(self) -> list:
        return [self.box, self.trigger_words]


def element_id(prefix: str, name: str) -> str:
    return f"{prefix}-{re.sub(r'[^A-Za-z0-9_-]', '_', name)}"


def size_slider(label: str) -> gr.Slider:
    """Width or height in multiples of 8; 0 leaves it to the base."""
    return gr.Slider(0, MAX_SIZE, 0, step=8, label=f"{label} (0: the base's own)",
                     elem_id=label.lower(), interactive=True)


def generate_tab(folders: Folders, studio: Studio, base: gr.Dropdown) -> AdapterPicker:
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            with gr.Row():
                box = gr.CheckboxGroup([], label="Adapters", elem_id="adapters", scale=4)
                refresh = gr.Button("Refresh", elem_id="refresh-adapters", scale=1, size="sm")
            picker = AdapterPicker(box, gr.State({}), folders)
            adapter_controls = gr.Column()
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt", interactive=True)
            negative = gr.Textbox(label="Negative prompt", elem_id="negative", interactive=True)
            with gr.Row():
                seed = gr.Number(
                    0,
                    label="Seed",
                    precision=0,
                    minimum=-1,
                    maximum=MAX_SEED,
                    info="-1: a new random seed each time",
                    elem_id="seed",
                    interactive=True,
                )
                randomize = gr.Button("Random seed", elem_id="randomize", size="sm")
                steps = gr.Slider(
                    1, MAX_STEPS, DEFAULT_STEPS, step=1, label="Steps", elem_id="steps", interactive=True
                )
                cfg = gr.Slider(
                    1, 20, 7, step=0.5, label="CFG scale", elem_id="cfg", interactive=True
                )
            with gr.Row():
                width, height = size_slider("Width"), size_slider("Height")
                scheduler = gr.Dropdown(
                    list(SAMPLERS),
                    value="euler_a",
                    label="Scheduler",
                    elem_id="scheduler",
                    interactive=True,
                )
                clip_skip = gr.Slider(
                    1, MAX_CLIP_SKIP, 1, step=1, label="Clip skip", elem_id="clip-skip",
                    interactive=True,
                )
                batch = gr.Slider(
                    1, MAX_BATCH, 1, step=1, label="Batch count", elem_id="batch", interactive=True
                )
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                show_command = gr.Button("Show render command", elem_id="show-command")
                live = gr.Checkbox(True, label="Render on release", elem_id="live", interactive=True,
                                   info="render as soon as an adapter slider is let go")
            gallery = gr.Gallery(label="Images", columns=2, format="png", elem_id="gallery")
            captions = gr.State([])
            settings = gr.Textbox(
                label="Settings of the selected image", lines=3, elem_id="settings"
            )
            command = gr.Textbox(
                label="Equivalent command",
                lines=2,
                max_lines=6,
                buttons=["copy"],
                interactive=False,
                visible=False,
                elem_id="command",
            )

    settings_inputs = [
        base, prompt, negative, seed, steps, cfg, width, height, scheduler, clip_skip, batch
    ]
    refresh.click(picker.refresh, [box], picker.outputs)
    randomize.click(lambda: secrets.randbelow(MAX_SEED + 1), None, seed)
    gallery.select(_selected_caption, [captions], settings)

    with adapter_controls:

        @gr.render(inputs=[box, picker.trigger_words])
        def controls(ticked: list[str], words_by_name: dict[str, list[str]]):
            mix_inputs = []
            for name in ticked:
                mix_inputs += _adapter_controls(name, words_by_name.get(name, []), prompt)

            def run(*values):
                request = _request(
                    ticked, values[: len(settings_inputs)], values[len(settings_inputs) :]
                )
                images = _user_errors(studio.generate, request)
                texts = [image.caption for image in images]
                return [(str(image.path), image.caption) for image in images], texts, texts[0]

            def describe(*values):
                request = _request(
                    ticked, values[: len(settings_inputs)], values[len(settings_inputs) :]
                )
                return gr.update(value=_user_errors(studio.render_command, request), visible=True)

            def run_if_live(is_live: bool, *values):
                if not is_live:
                    return gr.skip(), gr.skip(), gr.skip()
                return run(*values)

            outputs = [gallery, captions, settings]
            generate.click(run, settings_inputs + mix_inputs, outputs)
            for slider in mix_inputs:
                slider.release(run_if_live, [live, *settings_inputs, *mix_inputs], outputs,
                               trigger_mode="always_last")
            show_command.click(describe, settings_inputs + mix_inputs, command)

    return picker


def _adapter_controls(name: str, words: list[str], prompt: gr.Textbox) -> list[gr.Slider]:
    """One adapter's weight, trigger words and block weights; returns its sliders."""
    with gr.Group(elem_id=element_id("adapter", name)):
        weight = gr.Slider(
            *WEIGHT_RANGE,
            value=1.0,
            step=WEIGHT_STEP,
            label=name,
            key=f"weight-{name}",
            elem_id=element_id("weight", name),
            interactive=True,
        )
        if words:
            with gr.Row():
                gr.Markdown(f"Trigger words: `{', '.join(words)}`")
                add = gr.Button(
                    "Add to prompt",
                    size="sm",
                    key=f"add-{name}",
                    elem_id=element_id("add-words", name),
                )
            add.click(lambda text: _with_words(text, words), prompt, prompt)
        with gr.Accordion("Per-part weights", open=False, key=f"blocks-{name}"):
            blocks = [
                gr.Slider(
                    *WEIGHT_RANGE,
                    value=1.0,
                    step=WEIGHT_STEP,
                    label=block,
                    key=f"{block}-{name}",
                    elem_id=element_id(block, name),
                    interactive=True,
                )
                for block in PARTS
            ]
    return [weight, *blocks]


def _request(names: list[str], settings: tuple, mix: tuple) -> GenerationRequest:
    base, prompt, negative, seed, steps, cfg, width, height, scheduler, clip_skip, batch = settings
    per_adapter = [
        mix[index : index + 1 + len(PARTS)]
        for index in range(0, len(mix), 1 + len(PARTS))
    ]
    return GenerationRequest(
        prompt=prompt or "",
        base=base or "",
        negative=negative or "",
        seed=int(seed or 0),
        steps=int(steps),
        cfg=float(cfg),
        width=int(width) or None,
        height=int(height) or None,
        scheduler=scheduler,
        clip_skip=int(clip_skip),
        batch=int(batch),
        weights={name: float(values[0]) for name, values in zip(names, per_adapter)},
        block_weights={
            name: {
                block: float(value)
                for block, value in zip(PARTS, values[1:])
                if block in UNET_BLOCKS and float(value) != 1.0
            }
            for name, values in zip(names, per_adapter)
        },
        component_weights={
            name: {
                component: float(value)
                for part, value in zip(PARTS, values[1:])
                if float(value) != 1.0
                for component in COMPONENT_PARTS.get(part, ())
            }
            for name, values in zip(names, per_adapter)
        },
    )


def _user_errors(function, *args):
    """Call `function`; a mistake the user can fix is shown in the browser, not as a crash."""
    try:
        return function(*args)
    except SdloraError as error:
        raise gr.Error(str(error)) from None


def _with_words(prompt: str, words: list[str]) -> str:
    missing = [word for word in words if word not in (prompt or "")]
    return ", ".join(filter(None, [(prompt or "").strip(), *missing]))


def _selected_caption(captions: list[str], event: gr.SelectData) -> str:
    return captions[event.index] if event.index < len(captions) else ""
