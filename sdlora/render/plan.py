"""The render plan: every image `sdlora render` will write, decided before any model loads.

Command-line arguments + prompt rows -> adapter files by name -> `Job`s (one per image, with its
seed, mix and file name) and `Grid`s (which jobs form which labelled grid). Everything the user
can get wrong (a missing adapter, an unknown <lora:> name, a bad weight, size or grid spec) is
found here, so a mistake costs no model loading and overwrites nothing.

Seeds: image k (of --batch) of prompt row i has seed S + k, where S is the row's own seed when
the prompt file gives one, else --seed + i * batch. So every image of a plain run has its own
seed, and grid cells of one prompt share theirs (only the weight changes along a grid).

Weights: each image's mix starts from the --lora weights; a row's own weights (<lora:> tags,
the loras field) override them for that row, and adapters named only elsewhere stay at 0.

File names are `{job index:05d}-{seed}.png`, stable across runs of the same command, which is
what lets an interrupted run resume by skipping files that exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.render.prompts import PromptRow, check_size, parse_lora_spec, prompt_row, read_prompts


@dataclass
class Job:
    index: int
    row: PromptRow
    row_index: int
    batch_index: int
    seed: int
    weights: dict[str, float]  # every adapter of the run, 0 where unused

    @property
    def filename(self) -> str:
        return f"{self.index:05d}-{self.seed}.png"


@dataclass
class Grid:
    filename: str
    cells: list[list[Job]]  # [row][column]
    column_labels: list[str]
    row_labels: list[str]


@dataclass
class RenderPlan:
    adapter_files: dict[str, Path]  # adapter name -> file
    jobs: list[Job]
    grids: list[Grid] = field(default_factory=list)


def plan_render(args) -> RenderPlan:
    """Check the arguments and list every image to render (see the module docstring)."""
    check_size(args.width, args.height, "command line")
    if args.batch < 1 or args.steps < 1:
        raise SdloraError("--batch and --steps must be at least 1")
    adapter_files, weights = adapters_from_specs(args.lora)
    if args.prompts:
        rows = read_prompts(args.prompts)
    else:
        rows = [prompt_row(args.prompt, args.negative or None)]
    grids = [_parse_grid(spec) for spec in args.grid]
    if len(grids) > 2:
        raise SdloraError("at most two --grid options (columns, then rows)")
    if len(grids) == 2 and grids[0][0] == grids[1][0]:
        raise SdloraError(f"both --grid options name {grids[0][0]!r}")

    resolver = _AdapterResolver(adapter_files, args.adapters_dir)
    for row in rows:
        for name in row.loras:
            resolver.resolve(name, f"{args.prompts}:{row.line}" if args.prompts else "--prompt")
    for name, _ in grids:
        resolver.resolve(name, "--grid")
    weights = {name: weights.get(name, 0.0) for name in adapter_files}
    return _jobs_and_grids(args, rows, weights, grids, adapter_files)


def adapters_from_specs(specs: list[str]) -> tuple[dict[str, Path], dict[str, float]]:
    """--lora PATH[:WEIGHT] options -> {name: file}, {name: weight}; the name is the file stem."""
    files, weights = {}, {}
    for spec in specs:
        path, weight = parse_lora_spec(spec)
        if not path.is_file():
            raise SdloraError(f"adapter file {str(path)!r} not found")
        if path.stem in files and files[path.stem] != path:
            raise SdloraError(
                f"two adapters are named {path.stem!r}: {files[path.stem]} and {path}"
            )
        files[path.stem] = path
        weights[path.stem] = weight
    return files, weights


class _AdapterResolver:
    """Finds named adapters: --lora files first, then DIR/name.safetensors in --adapters-dir."""

    def __init__(self, files: dict[str, Path], directory: str | None):
        self.files = files
        self.directory = Path(directory) if directory else None
        if self.directory is not None and not self.directory.is_dir():
            raise SdloraError(f"--adapters-dir {directory!r} is not a folder")

    def resolve(self, name: str, where: str) -> None:
        if name in self.files:
            return
        if self.directory is not None:
            candidate = self.directory / f"{name}.safetensors"
            if candidate.is_file():
                self.files[name] = candidate
                return
        known = sorted(self.files)
        if self.directory is not None:
            known = sorted(set(known) | {p.stem for p in self.directory.glob("*.safetensors")})
        hint = f"available: {', '.join(known)}" if known else "no adapters available"
        if self.directory is None:
            hint += "; pass --adapters-dir or --lora"
        raise SdloraError(f"{where}: unknown adapter {name!r} ({hint})")


def _parse_grid(spec: str) -> tuple[str, list[float]]:
    name, equals, values = spec.partition("=")
    try:
        weights = [float(value) for value in values.split(",")]
    except ValueError:
        weights = []
    if not equals or not name.strip() or not weights:
        raise SdloraError(f"--grid {spec!r} is not NAME=w1,w2,... with numeric weights")
    return name.strip(), weights


def _jobs_and_grids(args, rows, weights, grids, adapter_files) -> RenderPlan:
    """One job per image; with --grid, one job per grid cell and the grids that show them.

    One --grid gives one grid: a row per prompt image, a column per weight. Two give one grid
    per prompt image: columns over the first adapter's weights, rows over the second's.
    """
    x_name, x_weights = grids[0] if grids else (None, [None])
    y_name, y_weights = grids[1] if len(grids) == 2 else (None, [None])
    jobs: list[Job] = []
    result = RenderPlan(adapter_files=adapter_files, jobs=jobs)
    column_labels = [f"{x_name}={x:g}" for x in x_weights] if x_name else []
    shared = Grid(f"grid-{x_name}.png", [], column_labels, [])
    for row_index, row in enumerate(rows):
        row_seed = row.seed if row.seed is not None else args.seed + row_index * args.batch
        for batch_index in range(args.batch):
            cells = []
            for y in y_weights:
                cells.append([])
                for x in x_weights:
                    mix = {**weights, **row.loras}
                    mix.update({name: w for name, w in ((x_name, x), (y_name, y)) if name})
                    job = Job(len(jobs), row, row_index, batch_index, row_seed + batch_index, mix)
                    jobs.append(job)
                    cells[-1].append(job)
            if y_name:
                result.grids.append(
                    Grid(
                        f"grid-{cells[0][0].index:05d}-{x_name}-{y_name}.png",
                        cells,
                        column_labels,
                        [f"{y_name}={y:g}" for y in y_weights],
                    )
                )
            elif x_name:
                shared.cells.extend(cells)
                label = row.prompt if args.batch == 1 else f"{row.prompt} (#{batch_index + 1})"
                shared.row_labels.append(label)
    if x_name and not y_name:
        result.grids.append(shared)
    return result
