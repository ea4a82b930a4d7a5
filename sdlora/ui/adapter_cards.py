"""The adapter cards: a picture, name, family, rank, trigger words, steps and base of each
adapter the user may mix, a search box, and `sdlora info`'s description of the picked one.

Clicking a card ticks its adapter (the "Adapters" checkboxes under the cards hold what is
ticked). An adapter made for another family than the chosen base is greyed, with the reason,
and is not offered for ticking. "Render preview" draws a card picture for an adapter that has
none (its trigger words on the chosen base) and keeps it beside the adapter file.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
from PIL import Image, ImageDraw, ImageOps

from sdlora.adapters.command import describe
from sdlora.adapters.read import read_adapter_file
from sdlora.errors import SdloraError
from sdlora.ui.folders import AdapterInfo, Folders
from sdlora.ui.studio import Studio
from sdlora.ui.users import user_errors, username

THUMBNAIL = 160


@dataclass
class AdapterPicker:
    """The cards, the ticked adapters, and each adapter's trigger words (name -> words)."""

    folders: Folders
    studio: Studio
    search: gr.Textbox
    cards: gr.Gallery
    card_names: gr.State  # the names of the cards shown, in order
    box: gr.CheckboxGroup
    trigger_words: gr.State
    info: gr.Markdown
    refresh_button: gr.Button
    preview_button: gr.Button

    def usable(self, base: str, user: str | None) -> list[str]:
        """The adapters that can be ticked on `base`."""
        family = _family_or_none(self.studio, base)
        return [info.name for info in self.folders.list_adapters(user)
                if _refusal(info, family) is None]

    def refresh(self, base: str, query: str, ticked: list[str] | None, request: gr.Request):
        """Cards and checkboxes from the adapters folder for the chosen base; ticked adapters
        that are still offered stay ticked."""
        family = _family_or_none(self.studio, base)
        adapters = self.folders.list_adapters(username(request))
        usable = [info.name for info in adapters if _refusal(info, family) is None]
        shown = [info for info in adapters if _matches(info, query)]
        cards = [(_thumbnail(info, _refusal(info, family)), _caption(info, family))
                 for info in shown]
        kept = [name for name in ticked or [] if name in usable]
        words = {info.name: info.trigger_words for info in adapters}
        return cards, [info.name for info in shown], gr.update(choices=usable, value=kept), words

    @property
    def outputs(self) -> list:
        return [self.cards, self.card_names, self.box, self.trigger_words]

    @property
    def inputs(self) -> list:
        return [self.search, self.box]


def adapter_cards(folders: Folders, studio: Studio) -> AdapterPicker:
    """The cards section (search, cards, ticked adapters, details); events wired by `wire`."""
    search = gr.Textbox(placeholder="search name, trigger word, family", show_label=False,
                        elem_id="adapter-search", container=False)
    cards = gr.Gallery(label="Adapters: click a card to use it", columns=3, height=300,
                       allow_preview=False, interactive=False, elem_id="adapter-cards",
                       object_fit="cover")
    with gr.Row():
        box = gr.CheckboxGroup([], label="Adapters", elem_id="adapters", scale=4)
        refresh = gr.Button("Refresh", elem_id="refresh-adapters", scale=1, size="sm")
    with gr.Accordion("Details of the clicked adapter", open=False, elem_id="adapter-details"):
        info = gr.Markdown("Click a card to see its details.", elem_id="adapter-info")
        preview = gr.Button("Render preview", size="sm", elem_id="render-preview")
    return AdapterPicker(folders, studio, search, cards, gr.State([]), box, gr.State({}),
                         info, refresh, preview)


def wire(picker: AdapterPicker, base: gr.Dropdown) -> None:
    selected = gr.State(None)  # the name of the card clicked last

    def refresh(base_choice, query, ticked, request: gr.Request):
        return user_errors(picker.refresh, base_choice, query, ticked, request)

    inputs = [base, *picker.inputs]
    picker.refresh_button.click(refresh, inputs, picker.outputs)
    picker.search.change(refresh, inputs, picker.outputs, trigger_mode="always_last")
    base.change(refresh, inputs, picker.outputs)

    def pick(names, ticked, base_choice, event: gr.SelectData, request: gr.Request):
        name = names[event.index]
        adapter = user_errors(picker.folders.adapter, name, username(request))
        refusal = _refusal(adapter, _family_or_none(picker.studio, base_choice))
        if refusal:
            gr.Warning(f"{name}: {refusal}")
        elif name not in (ticked or []):
            ticked = [*(ticked or []), name]
        return name, ticked, _details(adapter)

    picker.cards.select(pick, [picker.card_names, picker.box, base],
                        [selected, picker.box, picker.info])

    def render_preview(name, base_choice, query, ticked, request: gr.Request):
        if not name:
            raise gr.Error("click a card first")
        adapter = user_errors(picker.folders.adapter, name, username(request))
        user_errors(picker.studio.render_preview, adapter, base_choice)
        return picker.refresh(base_choice, query, ticked, request)

    picker.preview_button.click(render_preview, [selected, *inputs], picker.outputs)


def _family_or_none(studio: Studio, base: str) -> str | None:
    try:
        return studio.loaded_family(base)
    except SdloraError:
        return None  # a refused base is reported where it is used


def _refusal(adapter: AdapterInfo, family: str | None) -> str | None:
    """Why the adapter cannot be mixed into the base, or None."""
    if family and adapter.family and adapter.family != family:
        return f"made for {adapter.family}, the base is {family}"
    return None


def _matches(adapter: AdapterInfo, query: str) -> bool:
    words = (query or "").lower().split()
    text = " ".join([adapter.name, adapter.family or "", *adapter.trigger_words]).lower()
    return all(word in text for word in words)


def _caption(adapter: AdapterInfo, family: str | None) -> str:
    facts = [adapter.name, adapter.family or "family unknown"]
    facts += [f"rank {adapter.rank}"] if adapter.rank else []
    facts += [f"{adapter.steps} steps"] if adapter.steps else []
    facts += [f"trigger: {', '.join(adapter.trigger_words)}"] if adapter.trigger_words else []
    refusal = _refusal(adapter, family)
    return " · ".join(facts) + (f" (unusable: {refusal})" if refusal else "")


def _thumbnail(adapter: AdapterInfo, refusal: str | None) -> Image.Image:
    """The adapter's preview (or its name on a plain tile), greyed when it cannot be used."""
    preview = adapter.preview
    if preview is not None:
        with Image.open(preview) as image:
            picture = ImageOps.fit(image.convert("RGB"), (THUMBNAIL, THUMBNAIL))
    else:
        picture = Image.new("RGB", (THUMBNAIL, THUMBNAIL), (70, 80, 100))
        ImageDraw.Draw(picture).text((10, THUMBNAIL // 2 - 6), adapter.name[:24], fill="white")
    if refusal:
        picture = Image.blend(ImageOps.grayscale(picture).convert("RGB"),
                              Image.new("RGB", picture.size, "white"), 0.6)
    return picture


def _details(adapter: AdapterInfo) -> str:
    """What `sdlora info` prints for the adapter, as it prints it."""
    try:
        source = read_adapter_file(adapter.path)
    except SdloraError as error:
        return f"**{adapter.name}**: {error}"
    lines = describe(source.adapter, source.layout, adapter.path.stat().st_size)
    text = "\n".join(f"{label + ':':<22}{value}" for label, value in lines)
    return f"**{adapter.name}** ({adapter.path.name})\n```\n{text}\n```"
