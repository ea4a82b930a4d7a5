"""The Generate tab: adapter cards and a slider each, the settings form, the new images, the
CLI line.

Ticking an adapter renders its controls (`gr.render`): a weight slider, its trigger words with
a button that puts them in the prompt, and per-part weights (text encoder, UNet, UNet blocks)
in a collapsed section. Their values live in the mix state, so re-creating the controls when
another adapter is ticked keeps every value. Every request sends the whole mix to
`Studio.generate`, so each browser gets its own sliders' mix. With "Render on release" ticked,
letting go of an adapter slider, or leaving its number box (Tab or Enter), renders at once
(only the last of a quick series runs).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

import gradio as gr

from sdlora.ui.adapter_cards import AdapterPicker, adapter_cards
from sdlora.ui.adapter_cards import wire as wire_cards
from sdlora.ui.folders import Folders
from sdlora.ui.generate_form import PARTS, GenerateForm, MixState, generate_form, unit_mix
from sdlora.ui.studio import MAX_SEED, Studio
from sdlora.ui.users import user_errors, username

WEIGHT_RANGE = (-1.0, 2.0)
WEIGHT_STEP = 0.05
# Enter in an adapter's number box leaves the box, which is what renders (as Tab does); an
# arrow key let go on an adapter's slider is a release, as letting go of the mouse is (Gradio
# sends a slider's release on pointerup only).
ENTER_LEAVES_WEIGHT_BOXES = """
<script>
document.addEventListener("keydown", (event) => {
  const box = event.target;
  if (event.key === "Enter" && box.matches?.(".adapter-weight input[type=number]")) box.blur();
});
document.addEventListener("keyup", (event) => {
  const slider = event.target;
  const keys = ["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown", "PageUp", "PageDown",
                "Home", "End"];
  if (keys.includes(event.key) && slider.matches?.(".adapter-weight input[type=range]")) {
    slider.dispatchEvent(new PointerEvent("pointerup", {bubbles: true}));
  }
});
</script>
"""


@dataclass
class GenerateTab:
    picker: AdapterPicker
    form: GenerateForm
    mix: gr.State  # MixState: the adapter sliders' values
    reload: gr.State  # bumped when the mix is set from outside: the sliders are re-created
    results: gr.Gallery


def element_id(prefix: str, name: str) -> str:
    return f"{prefix}-{re.sub(r'[^A-Za-z0-9_-]', '_', name)}"


def generate_tab(app: gr.Blocks, folders: Folders, studio: Studio,
                 base: gr.Dropdown) -> GenerateTab:
    with gr.Row():
        with gr.Column(scale=1, min_width=320):
            picker = adapter_cards(folders, studio)
            adapter_controls = gr.Column()
        with gr.Column(scale=2):
            form = generate_form(base)
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                randomize = gr.Button("Random seed", elem_id="randomize")
                show_command = gr.Button("Show render command", elem_id="show-command")
                live = gr.Checkbox(True, label="Render on release", elem_id="live",
                                   interactive=True,
                                   info="render as soon as an adapter weight is let go")
            results = gr.Gallery(label="Images", columns=2, format="png", elem_id="gallery",
                                 interactive=False)
            captions = gr.State([])
            settings = gr.Textbox(label="Settings of the selected image", lines=3,
                                  elem_id="settings")
            command = gr.Textbox(label="Equivalent command", lines=2, max_lines=6,
                                 buttons=["copy"], interactive=False, visible=False,
                                 elem_id="command")
    tab = GenerateTab(picker, form, gr.State({}), gr.State(0), results)
    wire_cards(picker, base)
    randomize.click(lambda: secrets.randbelow(MAX_SEED + 1), None, form.seed)
    results.select(_selected_caption, [captions], settings)

    with adapter_controls:

        @gr.render(inputs=[picker.box, picker.trigger_words, tab.mix],
                   triggers=[app.load, picker.box.change, tab.reload.change])
        def controls(ticked: list[str], words_by_name: dict, mix: MixState):
            if not ticked:
                gr.Markdown("Click a card (or tick an adapter) to mix it in.", elem_id="no-mix")
            sliders = {
                name: _adapter_controls(name, words_by_name.get(name, []),
                                        mix.get(name) or unit_mix(), form.prompt)
                for name in ticked
            }
            every_slider = [slider for group in sliders.values() for slider in group]

            def current_mix(values: dict) -> MixState:
                return {name: [float(values[slider]) for slider in group]
                        for name, group in sliders.items()}

            def run(values: dict, request: gr.Request):
                user = username(request)
                generation = form.request(values, current_mix(values), studio.history(user))
                images = user_errors(studio.generate, generation, user)
                texts = [image.caption for image in images]
                return [(str(image.path), image.caption) for image in images], texts, texts[0]

            def released(values: dict, request: gr.Request):
                """A weight let go: kept in the mix state (for re-created sliders), and
                rendered when live; one request does both."""
                mix = {**values[tab.mix], **current_mix(values)}
                if not values[live]:
                    return mix, gr.skip(), gr.skip(), gr.skip()
                return mix, *run(values, request)

            def describe(values: dict, request: gr.Request):
                user = username(request)
                generation = form.request(values, current_mix(values), studio.history(user))
                command_line = user_errors(studio.render_command, generation, user)
                return gr.update(value=command_line, visible=True)

            inputs = {*form.components, *every_slider}
            outputs = [results, captions, settings]
            generate.click(run, inputs, outputs)
            show_command.click(describe, inputs, command)
            # One event per release: it saves the weights and renders. (A .change event
            # saving them as well would cost a round trip on every release, which the render
            # waited behind; arrow keys on a slider end in a release too, see ENTER_LEAVES_WEIGHT_BOXES.)
            for slider in every_slider:
                slider.release(released, {live, tab.mix, *inputs}, [tab.mix, *outputs],
                               trigger_mode="always_last", queue=False)

    return tab


def _adapter_controls(name: str, words: list[str], values: list[float],
                      prompt: gr.Textbox) -> list[gr.Slider]:
    """One adapter's weight, trigger words and per-part weights; returns its sliders."""
    weight, *parts = values
    with gr.Group(elem_id=element_id("adapter", name)):
        sliders = [_weight_slider(name, weight, element_id("weight", name))]
        if words:
            with gr.Row():
                gr.Markdown(f"Trigger words: `{', '.join(words)}`")
                add = gr.Button("Add to prompt", size="sm", elem_id=element_id("add-words", name))
            add.click(lambda text: _with_words(text, words), prompt, prompt)
        with gr.Accordion("Per-part weights (text encoder, UNet, UNet blocks)", open=False):
            sliders += [_weight_slider(part, value, element_id(part, name))
                        for part, value in zip(PARTS, parts)]
    return sliders


def _weight_slider(label: str, value: float, elem_id: str) -> gr.Slider:
    return gr.Slider(*WEIGHT_RANGE, value=value, step=WEIGHT_STEP, label=label,
                     elem_id=elem_id, elem_classes="adapter-weight", interactive=True,
                     preserved_by_key=None)


def _with_words(prompt: str, words: list[str]) -> str:
    missing = [word for word in words if word not in (prompt or "")]
    return ", ".join(filter(None, [(prompt or "").strip(), *missing]))


def _selected_caption(captions: list[str], event: gr.SelectData) -> str:
    return captions[event.index] if event.index < len(captions) else ""
