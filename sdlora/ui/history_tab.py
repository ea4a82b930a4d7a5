"""The History tab: the user's past images (from their outputs folder, so they survive a
restart), each one's settings one click from the Generate form, and "PNG info": any PNG with
A1111's or sdlora's parameters dropped here fills the form the same way.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from sdlora.render.png import read_png_texts
from sdlora.render.png_settings import settings_from_png
from sdlora.ui.generate_tab import GenerateTab
from sdlora.ui.studio import Studio
from sdlora.ui.users import user_errors, username

SHOWN = 100  # newest images in the gallery


def history_tab(studio: Studio, generate: GenerateTab, tabs: gr.Tabs):
    """Builds the tab; returns (function, outputs) that show the user's history, run when the
    tab is opened (not after every picture: the slider's render stays as fast as it can be)."""
    gallery = gr.Gallery(label="Your images, newest first", columns=6, height=520,
                         interactive=False, elem_id="history", format="png")
    paths = gr.State([])
    selected = gr.State(None)
    with gr.Row():
        text = gr.Textbox(label="Settings", lines=3, interactive=False, elem_id="history-settings",
                          scale=4)
        send = gr.Button("Send to Generate", variant="primary", elem_id="history-send", scale=1)
    png = gr.File(label="PNG info: drop a PNG (A1111's or sdlora's) to load its settings",
                  file_types=[".png"], elem_id="png-info")

    def shown(request: gr.Request):
        found = studio.history(username(request)).recent(SHOWN)
        return [str(path) for path in found], [str(path) for path in found]

    def select(names: list[str], event: gr.SelectData):
        path = names[event.index]
        return path, read_png_texts(path).get("parameters", "")

    form = generate.form
    filled_outputs = [*form.components[1:], generate.picker.box, generate.mix, generate.reload,
                      tabs]

    def fill(path: str | None, reload: int, base: str, request: gr.Request):
        if not path:
            raise gr.Error("pick an image first")
        user = username(request)
        history = studio.history(user)
        settings, _ = user_errors(settings_from_png, path)
        values, ticked, mix = form.filled(settings, studio.folders, user, history)
        usable = generate.picker.usable(base, user)
        left_out = [name for name in ticked if name not in usable]
        if left_out:
            gr.Warning(f"not usable on this base, left out: {', '.join(left_out)}")
        ticked = [name for name in ticked if name in usable]
        return {**values, generate.picker.box: ticked, generate.mix: mix,
                generate.reload: reload + 1, tabs: gr.Tabs(selected="generate")}

    def fill_from_upload(upload, reload, base, request: gr.Request):
        return fill(upload and str(Path(upload)), reload, base, request)

    gallery.select(select, [paths], [selected, text])
    send.click(fill, [selected, generate.reload, form.base], filled_outputs)
    png.upload(fill_from_upload, [png, generate.reload, form.base], filled_outputs)
    return shown, [gallery, paths]
