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

Weight schedules over the steps (`<lora:name:1@0.5-1>`, sdlora.mix.schedules) come from a
row's tags and apply to that row; --mix-mode applies to every image.

Per-component and per-block weights (--block-weights NAME=SPEC, sdlora.mix.block_weights)
apply to that adapter in every image.

File names are `{job index:05d}-{seed}.png`, stable across runs of the same command, which is
what lets an interrupted run resume: an existing file is re-used only when its recorded
settings are those of the job (sdlora.render.outputs); otherwise the picture gets a new name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.mix.block_weights import parse_block_spec
from sdlora.render.init_images import (
    DEFAULT_HIRES_STRENGTH,
    DEFAULT_STRENGTH,
    InitImage,
    Refused,
    check_image_options,
    read_init_images,
)
from sdlora.render.png_settings import settings_from_png
from sdlora.render.prompts import PromptRow, check_size, parse_lora_spec, prompt_row, read_prompts
from sdlora.render.session import ImageRequest


@dataclass
class Job:
    index: int
    request: ImageRequest  # loras: every adapter of the run, 0 where unused
    row_index: int
    batch_index: int
    label: str  # the grid's row label
    init: InitImage | None = None  # img2img / inpainting input
    stem: str | None = None  # set for img2img: the input's name

    @property
    def name(self) -> str:
        """The file's stem; a file of other settings there makes it `{name}-2`, ..."""
        return self.stem or f"{self.index:05d}-{self.request.seed}"

    @property
    def place(self) -> dict[str, int]:
        return {"index": self.index, "prompt_index": self.row_index, "batch_index": self.batch_index}


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
    refused: list[Refused] = field(default_factory=list)  # unusable files of an input folder


def plan_render(args, random_seed: int = 0) -> RenderPlan:
    """Check the arguments and list every image to render (see the module docstring).

    `random_seed` stands in for --seed -1 (and drives rows whose seed is -1), so that every
    process of a sharded run draws the same seeds."""
    check_size(args.width, args.height, "command line")
    if args.batch < 1 or args.steps < 1:
        raise SdloraError("--batch and --steps must be at least 1")
    if args.seed == -1:
        args.seed = random_seed
    if args.embeddings_dir and not Path(args.embeddings_dir).is_dir():
        raise SdloraError(f"--embeddings-dir {args.embeddings_dir!r} is not a folder")
    adapter_files, weights = adapters_from_specs(args.lora)
    from_png: dict = {}
    if args.prompts and Path(args.prompts).suffix.lower() == ".png":
        from_png, recorded_files = settings_from_png(args.prompts)
        for name, path in recorded_files.items():
            if name not in adapter_files and not args.adapters_dir and path.is_file():
                adapter_files[name] = path
        rows = [_png_row(from_png, args.prompts)]
        for key in ("init_image", "mask", "strength", "hires_scale", "hires_strength"):
            if getattr(args, key) is None and from_png.get(key) is not None:
                setattr(args, key, from_png[key])
    elif args.prompts:
        rows = read_prompts(args.prompts)
    else:
        rows = [prompt_row(args.prompt, args.negative or None)]
    check_image_options(init_image=args.init_image, mask=args.mask, strength=args.strength,
                        hires_scale=args.hires_scale, hires_strength=args.hires_strength)
    inits, refused = (
        read_init_images(args.init_image, args.mask) if args.init_image else ([None], [])
    )
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
    parts = _block_weights(args.block_weights, resolver)
    weights = {name: weights.get(name, 0.0) for name in adapter_files}
    plan = _jobs_and_grids(args, inits, rows, weights, grids, adapter_files, random_seed)
    plan.refused = refused
    for job in plan.jobs:
        # a prompt's <lora:name:te:unet> tag decides that adapter's components in its row
        job.request.lora_components = {
            **{name: comps for name, (comps, _) in parts.items() if comps},
            **job.request.lora_components,
        }
        job.request.lora_blocks = {name: blocks for name, (_, blocks) in parts.items() if blocks}
        for key in ("scheduler", "clip_skip", "lora_components", "lora_blocks", "mix_mode",
                    "lora_schedules"):
            if key in from_png:
                setattr(job.request, key, from_png[key])
        job.request.check()
    return plan


def _png_row(settings: dict, path: str) -> PromptRow:
    """A PNG's settings as the one prompt row of the run (its adapters' weights included)."""
    row = prompt_row(settings["prompt"], settings.get("negative") or None, where=path)
    for key in ("seed", "steps", "cfg", "width", "height"):
        if key in settings:
            setattr(row, key, settings[key])
    row.loras.update(settings.get("loras", {}))
    return row


def _block_weights(specs: list[str], resolver: _AdapterResolver) -> dict[str, tuple[dict, dict]]:
    """--block-weights NAME=SPEC options -> {name: (component weights, block weights)}."""
    parts = {}
    for spec in specs:
        name, equals, weights = spec.partition("=")
        where = f"--block-weights {spec!r}"
        if not equals or not name.strip():
            raise SdloraError(f"{where} is not NAME=SPEC (e.g. oil=te=0.5,down=0)")
        resolver.resolve(name.strip(), where)
        parts[name.strip()] = parse_block_spec(weights, None, where)
    return parts


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


def _jobs_and_grids(args, inits, rows, weights, grids, adapter_files, random_seed) -> RenderPlan:
    """One job per image; with --grid, one job per grid cell and the grids that show them.

    One --grid gives one grid: a row per prompt image, a column per weight. Two give one grid
    per prompt image: columns over the first adapter's weights, rows over the second's.
    With init images, every input gets the jobs a prompt-only run would have (the same
    seeds), named after the input.
    """
    x_name, x_weights = grids[0] if grids else (None, [None])
    y_name, y_weights = grids[1] if len(grids) == 2 else (None, [None])
    jobs: list[Job] = []
    result = RenderPlan(adapter_files=adapter_files, jobs=jobs)
    column_labels = [f"{x_name}={x:g}" for x in x_weights] if x_name else []
    shared = Grid(f"grid-{x_name}.png", [], column_labels, [])
    for init, row_index, row in ((i, r, row) for i in inits for r, row in enumerate(rows)):
        row_seed = row.seed if row.seed is not None else args.seed + row_index * args.batch
        if row_seed == -1:
            row_seed = (random_seed + row_index * args.batch) % 2**32
        for batch_index in range(args.batch):
            label = row.prompt if args.batch == 1 else f"{row.prompt} (#{batch_index + 1})"
            label = f"{init.name}: {label}" if init else label
            cells = []
            for y in y_weights:
                cells.append([])
                for x in x_weights:
                    mix = {**weights, **row.loras}
                    mix.update({name: w for name, w in ((x_name, x), (y_name, y)) if name})
                    request = _request(args, row, row_seed + batch_index, mix, init)
                    job = Job(len(jobs), request, row_index, batch_index, label, init)
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
                shared.row_labels.append(label)
    if x_name and not y_name:
        result.grids.append(shared)
    _name_after_inputs(jobs)
    return result


def _name_after_inputs(jobs: list[Job]) -> None:
    """An input's only picture is named like the input; several are numbered after it."""
    by_input: dict[str, list[Job]] = {}
    for job in jobs:
        if job.init is not None:
            by_input.setdefault(job.init.name, []).append(job)
    for name, group in by_input.items():
        for number, job in enumerate(group, start=1):
            job.stem = name if len(group) == 1 else f"{name}-{number:03d}"


def _request(args, row: PromptRow, seed: int, mix: dict[str, float], init) -> ImageRequest:
    """One image's settings: the row's own values, else the command line's."""
    hires_strength = args.hires_strength
    if args.hires_scale is not None and hires_strength is None:
        hires_strength = DEFAULT_HIRES_STRENGTH
    return ImageRequest(
        prompt=row.prompt,
        negative=row.negative if row.negative is not None else args.negative,
        seed=seed,
        steps=row.steps or args.steps,
        cfg=row.cfg if row.cfg is not None else args.cfg,
        width=row.width or args.width,
        height=row.height or args.height,
        scheduler=args.scheduler,
        clip_skip=args.clip_skip,
        loras=mix,
        lora_components=dict(row.lora_components),
        lora_schedules=dict(row.lora_schedules),
        mix_mode=args.mix_mode,
        init_image=str(init.path) if init else None,
        mask=str(init.mask_path) if init and init.mask_path else None,
        strength=(DEFAULT_STRENGTH if args.strength is None else args.strength) if init else None,
        hires_scale=args.hires_scale,
        hires_strength=hires_strength,
    )
