"""The Train tab: images, a preset and a few choices in; live step, loss chart, ETA and
validation previews out.

Start queues the run (`Trainer.start`) and then streams the job's progress to the browser that
started it (the job lives in that browser's session state, so only it can cancel it). When the
adapter is written, the Generate tab's cards are refreshed: it shows with its newest preview.
"""

from __future__ import annotations

import time

import gradio as gr
import pandas as pd
from PIL import Image

from sdlora.errors import SdloraError
from sdlora.train.dataset import IMAGE_SUFFIXES
from sdlora.ui.adapter_cards import AdapterPicker
from sdlora.ui.folders import Folders
from sdlora.ui.training import CAPTION_SUFFIX, MAX_RANK, Trainer, TrainingJob, TrainingRequest
from sdlora.ui.users import username

POLL_SECONDS = 0.5


def train_tab(folders: Folders, trainer: Trainer, base: gr.Dropdown, picker: AdapterPicker) -> None:
    presets = list(folders.presets())
    with gr.Row():
        with gr.Column():
            uploads = gr.File(
                label="Images (and optional .txt captions)",
                file_count="multiple",
                file_types=[*IMAGE_SUFFIXES, CAPTION_SUFFIX],
                elem_id="uploads",
            )
            folder = gr.Textbox(
                label="...or an image folder inside the data folder",
                interactive=folders.data is not None,
                elem_id="folder",
                placeholder="folder name" if folders.data else "start the app with --data-dir",
            )
            with gr.Accordion("Optional: the same pictures without the style (same file "
                              "names): the slider then scales the style", open=False):
                before_uploads = gr.File(label="Originals", file_count="multiple",
                                         file_types=list(IMAGE_SUFFIXES), elem_id="before-uploads")
                before_folder = gr.Textbox(
                    label="...or a folder of originals inside the data folder",
                    interactive=folders.data is not None,
                    elem_id="before-folder",
                    placeholder="folder name" if folders.data else "start the app with --data-dir",
                )
                paired_target = gr.Dropdown(
                    [("the preset's", ""), ("the styled pictures", "picture"),
                     ("only what the style changes", "change")],
                    value="", label="Learn from the pairs", elem_id="paired-target",
                    info="'only what the style changes' keeps styles apart when mixed "
                         "(one more UNet pass per step)",
                )
            preset = gr.Dropdown(
                presets,
                value=presets[0] if presets else None,
                label="Preset config",
                elem_id="preset",
            )
            with gr.Row():
                name = gr.Textbox(label="Adapter name", elem_id="name")
                trigger = gr.Textbox("sks", label="Trigger word", elem_id="trigger")
            with gr.Row():
                steps = gr.Number(500, label="Steps", precision=0, minimum=1, elem_id="train-steps")
                rank = gr.Number(
                    16, label="Rank", precision=0, minimum=1, maximum=MAX_RANK, elem_id="rank"
                )
            with gr.Accordion("Advanced (blank: the preset's)", open=False):
                with gr.Row():
                    learning_rate = gr.Number(None, label="Learning rate", minimum=0,
                                              elem_id="learning-rate")
                    resolution = gr.Number(None, label="Resolution", precision=0, minimum=64,
                                           step=8, elem_id="resolution")
                with gr.Row():
                    targets = gr.Dropdown(["", "attention", "transformer", "full"], value="",
                                          label="Targets", elem_id="targets")
                    text_encoder = gr.Dropdown(["", "train", "frozen"], value="",
                                               label="Text encoder", elem_id="text-encoder")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="start")
                cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
        with gr.Column():
            status = gr.Markdown("No training run yet.", elem_id="train-status")
            chart = gr.LinePlot(_losses([]), x="step", y="loss", title="Loss", height=220,
                                elem_id="loss-chart")
            validation = gr.Gallery(
                label="Validation grids, newest first",
                columns=1,
                format="png",
                preview=False,
                object_fit="contain",
                height=480,
                elem_id="validation",
            )
    job_state = gr.State(None)

    def run(values: dict, request: gr.Request):
        job = values[job_state]
        if job is not None and job.running:
            raise gr.Error("this page already has a run in progress; cancel it first")
        training = TrainingRequest(
            preset=values[preset] or "",
            name=values[name] or "",
            trigger_word=values[trigger] or "",
            steps=int(values[steps] or 0),
            rank=int(values[rank] or 0),
            base=values[base] or "",
            uploads=[str(path) for path in values[uploads] or []],
            folder=values[folder] or "",
            before_folder=values[before_folder] or "",
            before_uploads=[str(path) for path in values[before_uploads] or []],
            learning_rate=values[learning_rate] or None,
            resolution=int(values[resolution]) if values[resolution] else None,
            targets=values[targets] or None,
            text_encoder={"train": True, "frozen": False}.get(values[text_encoder]),
            paired_target=values[paired_target] or None,
        )
        try:
            job = trainer.start(training, username(request))
        except SdloraError as error:
            raise gr.Error(str(error)) from None
        shown = 0
        while job.running:
            images = job.validation_images()
            grids = _grids(images) if len(images) != shown else gr.skip()
            shown = len(images)
            progress = describe(job, trainer.place_in_queue(job))
            yield {job_state: job, status: progress, validation: grids, chart: _losses(job.losses)}
            time.sleep(POLL_SECONDS)
        cards = picker.refresh(values[base], values[picker.search], values[picker.box], request)
        yield {job_state: job, status: describe(job), validation: _grids(job.validation_images()),
               chart: _losses(job.losses), **dict(zip(picker.outputs, cards))}

    def stop(job):
        if job is None or not job.running:
            return "Nothing to cancel."
        job.cancel()
        return describe(job) + "\n\nCancelling after this step..."

    start.click(
        run,
        {job_state, base, uploads, folder, before_folder, before_uploads, preset, name, trigger,
         steps, rank, learning_rate, resolution, targets, text_encoder, paired_target,
         picker.search, picker.box},
        [job_state, status, validation, chart, *picker.outputs],
        concurrency_limit=None,
    )
    cancel.click(stop, job_state, status)


def describe(job: TrainingJob, ahead: int = 0) -> str:
    """Place in the queue, then step, loss and ETA while training; the outcome when done."""
    name = job.config.output.name
    if job.state == "queued":
        return f"**{name}**: waiting for {ahead} run(s) before it to finish..."
    if job.state == "starting":
        return f"**{name}**: loading the base model and caching the images..."
    loss = f"{job.loss:.4f}" if job.loss is not None else "-"
    line = f"**{name}**: step {job.step} / {job.total_steps}, loss {loss}"
    if job.running:
        eta = job.eta_seconds()
        return line + (f", ETA {_duration(eta)}" if eta is not None else "")
    return f"{line}\n\n{job.state}: {job.message}"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _grids(paths) -> list[tuple[Image.Image, str]]:
    grids = []
    for path in reversed(paths):
        with Image.open(path) as image:
            grids.append((image.copy(), path.stem))
    return grids


def _losses(losses: list[tuple[int, float]]) -> pd.DataFrame:
    """Numeric columns also when empty: the chart keeps the axis types of its first value, and an
    empty frame's object columns would make both axes categorical (a rank plot, not a curve)."""
    frame = pd.DataFrame(losses, columns=["step", "loss"])
    return frame.astype({"step": "int64", "loss": "float64"})
