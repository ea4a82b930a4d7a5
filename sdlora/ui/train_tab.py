"""The Train tab: images, a preset and a few choices in; live step, loss, ETA and validation out.

Start runs `Trainer.start` and then streams the job's progress to the browser that started it
(the job lives in that browser's session state, so only it can cancel it). When the adapter is
written, the Generate tab's adapter list is refreshed.
"""

from __future__ import annotations

import time

import gradio as gr
from PIL import Image

from sdlora.errors import SdloraError
from sdlora.train.dataset import IMAGE_SUFFIXES
from sdlora.ui.folders import Folders
from sdlora.ui.generate_tab import AdapterPicker
from sdlora.ui.training import CAPTION_SUFFIX, MAX_RANK, Trainer, TrainingJob, TrainingRequest

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
            before_folder = gr.Textbox(
                label="Optional: the same pictures without the style, a folder inside the data "
                      "folder (same file names): the slider then scales the style",
                interactive=folders.data is not None,
                elem_id="before-folder",
                placeholder="folder name" if folders.data else "start the app with --data-dir",
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
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="start")
                cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
        with gr.Column():
            status = gr.Markdown("No training run yet.", elem_id="train-status")
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

    def run(
        job,
        base_choice,
        files,
        folder_name,
        before_folder_name,
        preset_name,
        adapter_name,
        word,
        step_count,
        lora_rank,
        ticked,
    ):
        if job is not None and job.running:
            raise gr.Error("this page already has a run in progress; cancel it first")
        request = TrainingRequest(
            preset=preset_name or "",
            name=adapter_name or "",
            trigger_word=word or "",
            steps=int(step_count or 0),
            rank=int(lora_rank or 0),
            base=base_choice or "",
            uploads=[str(path) for path in files or []],
            folder=folder_name or "",
            before_folder=before_folder_name or "",
        )
        try:
            job = trainer.start(request)
        except SdloraError as error:
            raise gr.Error(str(error)) from None
        shown = 0
        while job.running:
            images = job.validation_images()
            grids = _grids(images) if len(images) != shown else gr.skip()
            shown = len(images)
            yield job, describe(job), grids, gr.skip(), gr.skip()
            time.sleep(POLL_SECONDS)
        choices, words = picker.refresh(ticked)
        yield job, describe(job), _grids(job.validation_images()), choices, words

    def stop(job):
        if job is None or not job.running:
            return "Nothing to cancel."
        job.cancel()
        return describe(job) + "\n\nCancelling after this step..."

    start.click(
        run,
        [job_state, base, uploads, folder, before_folder, preset, name, trigger, steps, rank,
         picker.box],
        [job_state, status, validation, *picker.outputs],
        concurrency_limit=None,
    )
    cancel.click(stop, job_state, status)


def describe(job: TrainingJob) -> str:
    """Step, loss and ETA while training; the outcome when done."""
    name = job.config.output.name
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
