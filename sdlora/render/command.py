"""`sdlora render`: prompts + a weighted mix of adapters -> PNG files with their settings inside.

Flow, top to bottom:
1. plan (sdlora.render.plan): arguments, prompt rows and adapter names become a list of jobs,
   one per image; every user mistake is reported here, before a model is loaded.
2. shard: under `accelerate launch -m sdlora render ...` (GPUs) or
   `torchrun --nproc_per_node N -m sdlora render ...` (any machine) each process takes the jobs
   with index % num_processes == rank, and skips jobs whose file exists (so an interrupted run
   resumes; each image is written once).
3. load the base and the adapters into a `Mixer` (all at weight 0), then per job: set the job's
   mix (fused into the weights), build its scheduler, generate with a CPU generator seeded
   with the job's seed (the same noise on any device), write the PNG atomically.
4. grids: once every process is done, the main process assembles labelled grids from the
   cell files.

Precision: float16 on CUDA, float32 elsewhere.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

import sdlora
from sdlora.errors import SdloraError
from sdlora.render.grid import labelled_grid
from sdlora.render.plan import Job, RenderPlan, plan_render
from sdlora.render.png import a1111_parameters, lora_hash, model_hash, write_png
from sdlora.render.schedulers import build_scheduler, get_sampler


def render_command(args) -> None:
    from accelerate import PartialState

    sampler = get_sampler(args.scheduler)
    plan = plan_render(args)
    out = Path(args.out)
    ensure_writable(out)

    # Without cpu=True accelerate would not see a torchrun-launched CPU job as distributed.
    state = PartialState(cpu=not torch.cuda.is_available())
    shard = plan.jobs[state.process_index :: state.num_processes]
    todo = [job for job in shard if not (out / job.filename).exists()]
    if todo:
        renderer = Renderer(args, plan, sampler, state.device)
        for job in _progress(todo, state):
            renderer.render(job, out)
    skipped = len(shard) - len(todo)
    where = (
        f" (process {state.process_index + 1}/{state.num_processes})"
        if state.num_processes > 1
        else ""
    )
    written = f"{len(todo)} image{'' if len(todo) == 1 else 's'} written"
    print(f"{written}, {skipped} already there, in {out}{where}", file=sys.stderr)

    state.wait_for_everyone()
    if state.is_main_process:
        for grid in plan.grids:
            write_grid(grid, out)


def ensure_writable(out: Path) -> None:
    """Fail now, not after loading a model, when the output folder cannot take files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise SdloraError(
            f"output folder {str(out)!r} is not writable ({error.strerror or error})"
        ) from None


class Renderer:
    """The loaded base and mixer; renders one job at a time."""

    def __init__(self, args, plan: RenderPlan, sampler, device: torch.device):
        import diffusers
        import transformers

        from sdlora.base.models import load_base
        from sdlora.mix.mixer import Mixer

        # our bar counts images; the libraries' loading bars would only interleave with it
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

        self.args = args
        self.sampler = sampler
        self.device = device
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.base = load_base(args.base, torch_dtype=dtype)
        self.pipeline = self.base.pipeline.to(device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.scheduler_config = self.pipeline.scheduler.config
        self.mixer = Mixer(self.pipeline)
        self.files = plan.adapter_files
        load_into_mixer(self.mixer, plan.adapter_files)
        self.model_hash = model_hash(args.base)
        source = Path(args.base.rstrip("/\\"))
        self.model_name = source.stem if source.is_file() else source.name
        self.lora_hashes = {name: lora_hash(path) for name, path in plan.adapter_files.items()}

    def render(self, job: Job, out: Path) -> None:
        settings = self.settings(job)
        self.pipeline.scheduler = build_scheduler(self.args.scheduler, self.scheduler_config)
        generator = torch.Generator("cpu").manual_seed(job.seed)
        with self.mixer.using(job.weights), torch.inference_mode():
            image = self.pipeline(
                prompt=settings["prompt"],
                negative_prompt=settings["negative"] or None,
                num_inference_steps=settings["steps"],
                guidance_scale=settings["cfg"],
                width=settings["width"],
                height=settings["height"],
                generator=generator,
            ).images[0]
        texts = {
            "parameters": a1111_parameters(
                settings, self.sampler, self.model_hash, self.model_name, self.lora_hashes
            ),
            "sdlora": json.dumps(settings, sort_keys=True),
        }
        write_png(image, out / job.filename, texts)

    def settings(self, job: Job) -> dict:
        """Everything that decides the image, as written into the `sdlora` PNG chunk."""
        row, args = job.row, self.args
        default_size = self.base.native_size
        loras = {name: weight for name, weight in job.weights.items() if weight}
        return {
            "version": sdlora.__version__,
            "base": args.base,
            "model_hash": self.model_hash,
            "family": self.base.family.name,
            "prompt": row.prompt,
            "negative": row.negative if row.negative is not None else args.negative,
            "seed": job.seed,
            "steps": row.steps or args.steps,
            "cfg": row.cfg if row.cfg is not None else args.cfg,
            "width": row.width or args.width or default_size,
            "height": row.height or args.height or default_size,
            "scheduler": args.scheduler,
            "loras": loras,
            "lora_files": {
                name: {"path": str(self.files[name]), "hash": self.lora_hashes[name]}
                for name in loras
            },
            "index": job.index,
            "prompt_index": job.row_index,
            "batch_index": job.batch_index,
        }


def load_into_mixer(mixer, files: dict[str, Path], weights: dict[str, float] | None = None) -> None:
    """Read each adapter file and add it to `mixer` (which warns about layers the base lacks)."""
    from sdlora.adapters.read import load_adapter

    for name, path in files.items():
        mixer.add(load_adapter(path, name=name), (weights or {}).get(name, 0.0))


def write_grid(grid, out: Path) -> None:
    from PIL import Image

    cells = []
    for row in grid.cells:
        images = []
        for job in row:
            with Image.open(out / job.filename) as image:
                images.append(image.convert("RGB"))
        # rows of a prompt file may differ in size; the grid needs one cell size
        images = [image.resize(cells[0][0].size if cells else images[0].size) for image in images]
        cells.append(images)
    texts = {"sdlora": json.dumps({"grid": [[job.filename for job in row] for row in grid.cells]})}
    write_png(labelled_grid(cells, grid.row_labels, grid.column_labels), out / grid.filename, texts)


def _progress(jobs: list[Job], state):
    from tqdm import tqdm

    return tqdm(jobs, desc="render", unit="image", disable=not state.is_main_process)
