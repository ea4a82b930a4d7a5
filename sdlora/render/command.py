"""`sdlora render`: prompts + a weighted mix of adapters -> PNG files with their settings inside.

Flow, top to bottom:
1. plan (sdlora.render.plan): arguments, prompt rows and adapter names become a list of jobs,
   one per image; every user mistake is reported here, before a model is loaded.
2. shard: under `accelerate launch -m sdlora render ...` (GPUs) or
   `torchrun --nproc_per_node N -m sdlora render ...` (any machine) each process takes the jobs
   with index % num_processes == rank.
3. a `GenerationSession` (the same one the web UI uses) loads the base and the adapters; per
   job, an existing file is re-used only when its recorded settings are the job's (so an
   interrupted run resumes); otherwise the picture is drawn and written under a free name.
4. grids: once every process is done, the main process assembles labelled grids from the
   cell files the jobs ended up in.
"""

from __future__ import annotations

import secrets
import sys
import tempfile
from pathlib import Path

import torch

from sdlora.errors import SdloraError
from sdlora.malloc import keep_large_blocks_in_the_heap
from sdlora.render.grid import labelled_grid
from sdlora.render.outputs import find_or_free, grid_record
from sdlora.render.plan import Job, plan_render
from sdlora.render.png import write_png
from sdlora.render.schedulers import get_sampler


def render_command(args) -> None:
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    get_sampler(args.scheduler)
    # Without cpu=True accelerate would not see a torchrun-launched CPU job as distributed.
    state = PartialState(cpu=not torch.cuda.is_available())
    drawn = [secrets.randbelow(2**32)]
    if state.num_processes > 1:
        broadcast_object_list(drawn)  # every process must plan the same random seeds
    if args.seed == -1:
        print(f"seed -1: random seed {drawn[0]}", file=sys.stderr)
    plan = plan_render(args, random_seed=drawn[0])
    out = Path(args.out)
    ensure_writable(out)

    from sdlora.render.session import GenerationSession

    if state.device.type == "cpu":
        keep_large_blocks_in_the_heap()  # the same blocks every step: re-used, not faulted in
    session = GenerationSession(args.base, state.device, embeddings_dir=args.embeddings_dir)
    session.use_adapters(plan.adapter_files)
    shard = plan.jobs[state.process_index :: state.num_processes]
    written = 0
    for job in _progress(shard, state):
        record = session.record(job.request, job.init, **job.place)
        path, exists = find_or_free(out, job.name, record)
        if not exists:
            session.generate(job.request, job.init, record).write(path)
            written += 1
    where = (
        f" (process {state.process_index + 1}/{state.num_processes})"
        if state.num_processes > 1
        else ""
    )
    images = f"{written} image{'' if written == 1 else 's'} written"
    print(f"{images}, {len(shard) - written} already there, in {out}{where}", file=sys.stderr)

    state.wait_for_everyone()
    if state.is_main_process:
        for grid in plan.grids:
            write_grid(grid, out, session)
    if plan.refused:
        for refused in plan.refused:
            print(f"skipped {refused}", file=sys.stderr)
        raise SdloraError(
            f"{len(plan.refused)} input file(s) could not be used (listed above); "
            "the others were rendered"
        )


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


def write_grid(grid, out: Path, session) -> None:
    """Paste the grid's cells (the files their jobs were written to or found in) into one PNG;
    a grid file of other cells is kept and the new grid gets a free name."""
    from PIL import Image

    cell_paths = [
        [find_or_free(out, job.name, session.record(job.request, job.init, **job.place))[0]
         for job in row]
        for row in grid.cells
    ]
    record = grid_record(cell_paths, grid.row_labels, grid.column_labels)
    path, exists = find_or_free(out, Path(grid.filename).stem, record)
    if exists:
        return
    cells = []
    for row in cell_paths:
        images = []
        for cell in row:
            with Image.open(cell) as image:
                images.append(image.convert("RGB"))
        # rows of a prompt file may differ in size; the grid needs one cell size
        images = [image.resize(cells[0][0].size if cells else images[0].size) for image in images]
        cells.append(images)
    write_png(labelled_grid(cells, grid.row_labels, grid.column_labels), path, record)


def _progress(jobs: list[Job], state):
    from tqdm import tqdm

    return tqdm(jobs, desc="render", unit="image", disable=not state.is_main_process)
