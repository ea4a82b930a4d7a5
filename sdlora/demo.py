"""`sdlora demo`: the whole job on the embedded tiny base, offline, on a CPU, in minutes.

    samples/demo/{plain,sepia,stripes}/*.png + .txt captions (made by samples/make_demo_samples.py)
    -> configs/demo.yaml, one run of sdlora.train.loop.train per style, paired with plain/
    -> {out}/{style}/{style}.safetensors
    -> the demo base + Mixer: base, each style at 0.5 and 1.0, both mixed (modes add, orthogonal;
       then the stripes on the late half of the steps)
    -> {out}/demo-grid.png (one labelled grid) and the path of every file printed

The styles are the base's own pictures (one per training prompt, kept when `measure` reads
them as their prompt) given a colour grade (sepia: a warm brown filter, darker, lower
saturation) or a texture (stripes: horizontal bands 16 pixels apart), so an adapter has only
the style to learn.
The unstyled pictures are kept in plain/ and given as data.before_dir, so each adapter learns the style at
every strength and its slider scales it (at 0.5, half the style, not a faint trace of it);
`sdlora.base.demo_base.saturation` and `stripe_energy` show its strength and
`sdlora.base.demo_content.read_content` shows the content staying right (colours named as the
style draws them: `styled_as`).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sdlora.base import demo_base
from sdlora.errors import SdloraError

REPO = Path(__file__).resolve().parents[1]
SAMPLES_DIR = REPO / "samples" / "demo"
CONFIG_PATH = REPO / "configs" / "demo.yaml"
STYLES = ("sepia", "stripes")
ORIGINALS = "plain"  # the unstyled pictures, beside the styles' folders
STRIPE_PERIOD = 16
# What the grid shows: one column per prompt, the same seed for every row.
GRID_PROMPTS = (("red", "circle", "blue"), ("yellow", "square", "green"),
                ("blue", "triangle", "yellow"), ("purple", "circle", "red"))
# (label, weights, mix mode, schedules): both styles at 1.0 mixed by each mode (sdlora.mix.modes),
# then with the stripes on the late half of the steps only (sdlora.mix.schedules).
GRID_ROWS = (
    ("base", {}, "add", {}),
    ("sepia 0.5", {"sepia": 0.5}, "add", {}), ("sepia 1.0", {"sepia": 1.0}, "add", {}),
    ("stripes 0.5", {"stripes": 0.5}, "add", {}), ("stripes 1.0", {"stripes": 1.0}, "add", {}),
    ("sepia 1 + stripes 1, add", {"sepia": 1.0, "stripes": 1.0}, "add", {}),
    ("sepia 1 + stripes 1, orthogonal", {"sepia": 1.0, "stripes": 1.0}, "orthogonal", {}),
    ("sepia 1 + stripes 1@0.5-1, orthogonal", {"sepia": 1.0, "stripes": 1.0}, "orthogonal",
     {"stripes": "@0.5-1"}),
)
RENDER = {"num_inference_steps": 20, "guidance_scale": 4.0}


# --- the styles ---------------------------------------------------------------------------------

def sepia(image: Image.Image, amount: float = 0.5, shade: float = 0.9,
          warmth=(1.0, 0.85, 0.7)) -> Image.Image:
    """Blend `amount` of the classic sepia tone matrix into the image (less saturated), then
    filter it warm brown: every channel scaled by `shade` (the matrix brightens, its rows sum to
    1.35, 1.20, 0.94, which reads as a pale wash) and by `warmth` (less green, less blue). Its
    training pictures average RGB (132, 93, 74), hue 20 degrees (the plain ones: hue 321).

    The filter, not a stronger toning, is what makes it brown, and it is no darker because the
    demo base's VAE has to draw it with the stripes over it: the base's renders of the held-out
    prompts, styled, encoded and decoded, read as their prompt (`demo_content.read_content`)
    0.925 of the time under sepia, under stripes and under both. With shade 0.8 and stripes
    darkened to 0.55 they read 0.925, 0.863 and 0.775 (0.819, 0.844 and 0.606 before the VAE's
    decoder learnt toned pictures, scripts/train_demo_base.py); toning 0.8 turns blue grey.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    matrix = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]],
                      dtype=np.float32)
    toned = np.clip(pixels @ matrix.T, 0, 255)
    filtered = shade * (pixels + amount * (toned - pixels)) * np.asarray(warmth, dtype=np.float32)
    return Image.fromarray(np.uint8(np.round(filtered)))


def stripes(image: Image.Image, darken: float = 0.7) -> Image.Image:
    """Darken every other horizontal band of STRIPE_PERIOD / 2 pixels to `darken` of its
    brightness (not darker: the demo base's VAE draws red triangles under darker bands as bells,
    see `sepia`)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    rows = (np.arange(pixels.shape[0]) // (STRIPE_PERIOD // 2)) % 2 == 0
    pixels = pixels * np.where(rows, darken, 1.0)[:, None, None]
    return Image.fromarray(np.uint8(np.round(pixels)))


STYLE_FUNCTIONS = {"sepia": sepia, "stripes": stripes}


# configs/demo.yaml suits a colour grade; a texture is learnt more slowly. Not longer: at 450
# steps and lr 3e-3 (before paired_target: change) the stripes bent the shapes (56% of held-out
# prompts drawn right); now 96%, and half the weight shows 0.21 of the stripes (450 steps: 0.23).
STYLE_OVERRIDES = {"sepia": (), "stripes": ("train.steps=300", "train.learning_rate=2e-3")}


def styled_as(weights: dict[str, float]):
    """What the styles at `weights` do to a picture, as their training pairs teach it: each
    style's picture blended with its original by the style's weight. A mix's colours are named
    by what this makes of each plain colour (`demo_content.styled_palette`)."""
    def style(image: Image.Image) -> Image.Image:
        for name in STYLES:
            if weights.get(name, 0.0):
                image = Image.blend(image, STYLE_FUNCTIONS[name](image), weights[name])
        return image
    return style


def make_style_samples(folder: Path = SAMPLES_DIR, count: int = 24, seed: int = 0) -> None:
    """Write {folder}/{style}/NNN.png with a same-stem .txt caption of the image's content, and
    the unstyled pictures as {folder}/plain/NNN.png.

    The images are the demo base's own pictures, styled: so an adapter trained on them has
    only the style to learn, not another way of drawing shapes. Only pictures that `measure`
    reads as their prompt are kept, so every caption is true.
    """
    import torch

    pipeline = load_plain_base()
    rng = random.Random(seed)
    combos = demo_base.training_combinations()
    kept: list[tuple[Image.Image, str]] = []
    for attempt in range(10 * count):
        combo = rng.choice(combos)
        image = pipeline(demo_base.prompt(*combo), generator=torch.Generator().manual_seed(attempt),
                         **RENDER).images[0]
        if demo_base.measure(image).matches(*combo):
            kept.append((image, demo_base.prompt(*combo)))
        if len(kept) == count:
            break
    else:
        raise SdloraError(f"the demo base drew only {len(kept)} of {10 * count} prompts as told; "
                          "retrain it with python scripts/train_demo_base.py")
    write_styles(folder, kept, {ORIGINALS: Image.Image.copy, **STYLE_FUNCTIONS})


def restyle(folder: Path = SAMPLES_DIR, styles=STYLES) -> None:
    """Re-write {folder}/{style} for `styles` from the pictures already in {folder}/plain (after
    a change to a style function; re-drawing them could change the originals too)."""
    originals = sorted((folder / ORIGINALS).glob("*.png"))
    kept = [(Image.open(path).convert("RGB"), path.with_suffix(".txt").read_text("utf-8").strip())
            for path in originals]
    write_styles(folder, kept, {style: STYLE_FUNCTIONS[style] for style in styles or STYLES})


def write_styles(folder: Path, kept, functions) -> None:
    for style, function in functions.items():
        # Written beside the target, then renamed: an interrupted run leaves no half-filled style.
        partial = folder / f".{style}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for index, (image, caption) in enumerate(kept):
            function(image).save(partial / f"{index:03d}.png")
            (partial / f"{index:03d}.txt").write_text(caption + "\n", encoding="utf-8")
        shutil.rmtree(folder / style, ignore_errors=True)
        partial.rename(folder / style)


def load_plain_base():
    from sdlora.base.models import load_base

    pipeline = load_base("demo").pipeline
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# --- the demo -----------------------------------------------------------------------------------

@dataclass
class DemoResult:
    adapters: dict[str, Path]  # style -> adapter file
    grid: Path
    seconds: float


def style_config(style: str, out: Path, samples: Path = SAMPLES_DIR, overrides: tuple[str, ...] = ()):
    """configs/demo.yaml, pointed at one style's images and output folder; `overrides`
    (`key=value`) on top (bench/mix_interference.py trains with other seeds)."""
    from sdlora.train.config import load_config

    if not CONFIG_PATH.is_file():
        raise SdloraError(f"{CONFIG_PATH} is missing: sdlora demo runs from a checkout of sdlora")
    return load_config(CONFIG_PATH, overrides=[
        f"data.instance_dir={samples / style}", f"data.before_dir={samples / ORIGINALS}",
        f"output.dir={out / style}",
        f"output.name={style}", *STYLE_OVERRIDES[style], *overrides,
    ])


def run_demo(out: Path, samples: Path = SAMPLES_DIR) -> DemoResult:
    """Train both styles with the sdlora trainer, then render the grid through the Mixer.

    Runs on one CPU thread: the tiny model gains nothing from more, and on a busy machine
    two threads were 35x slower per step than one (threads waiting for each other).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(out, samples)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, samples: Path) -> DemoResult:
    from tqdm.auto import tqdm

    from sdlora.train.loop import train

    started = time.time()
    if not all((samples / style).is_dir() for style in (ORIGINALS, *STYLES)):
        samples = out / "samples"
        make_style_samples(samples)
    adapters = {}
    for number, style in enumerate(STYLES, 1):
        tqdm.write(f"[{number}/{len(STYLES) + 1}] training the {style} style "
                   f"from {samples / style}")
        adapters[style] = train(style_config(style, out, samples), overwrite=True)  # a re-run redoes it
    tqdm.write(f"[{len(STYLES) + 1}/{len(STYLES) + 1}] rendering the grid")
    grid = render_grid(adapters, out / "demo-grid.png")
    return DemoResult(adapters=adapters, grid=grid, seconds=time.time() - started)


def demo_pipeline(adapters: dict[str, Path]):
    """The demo base with every adapter loaded into a Mixer at weight 0."""
    from sdlora.adapters.read import load_adapter
    from sdlora.mix.mixer import Mixer

    pipeline = load_plain_base()
    mixer = Mixer(pipeline)
    for style, path in adapters.items():
        mixer.add(load_adapter(path, name=style), weight=0.0)
    return pipeline, mixer


def render(pipeline, mixer, weights: dict[str, float], combos, seeds, mode: str = "add",
           schedules: dict[str, str] | None = None) -> list[Image.Image]:
    """One image per (combo, seed) with exactly `weights` set (adapters not named at 0), mixed
    by `mode`, the adapters of `schedules` (name -> "@0.5-1", sdlora.mix.schedules) re-weighted
    on the UNet before each step as a render does; the mixer is left in the mode it had."""
    import torch

    from sdlora.mix.schedules import schedule_hook
    from sdlora.render.pipelines import step_callback

    full = {name: weights.get(name, 0.0) for name in mixer.weights}
    with mixer.using(full), _mode(mixer, mode):
        step_hook = schedule_hook(mixer, full, schedules or {})
        callback = None
        if step_hook is not None:
            step_hook(0, RENDER["num_inference_steps"])
            callback = step_callback(step_hook)
        try:
            return pipeline([demo_base.prompt(*combo) for combo in combos],
                            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
                            callback_on_step_end=callback, **RENDER).images
        finally:
            mixer.set_step_weights(dict.fromkeys(mixer.weights))


@contextlib.contextmanager
def _mode(mixer, mode: str):
    before = mixer.mode
    mixer.set_mode(mode)
    try:
        yield
    finally:
        mixer.set_mode(before)


def render_grid(adapters: dict[str, Path], path: Path, cell: int = 128) -> Path:
    from sdlora.render.grid import labelled_grid

    pipeline, mixer = demo_pipeline(adapters)
    seeds = range(len(GRID_PROMPTS))
    rows = [[image.resize((cell, cell), Image.Resampling.BICUBIC)
             for image in render(pipeline, mixer, weights, GRID_PROMPTS, seeds, mode, schedules)]
            for _, weights, mode, schedules in GRID_ROWS]
    columns = [f"{colour} {shape} on {background}" for colour, shape, background in GRID_PROMPTS]
    labelled_grid(rows, [label for label, *_ in GRID_ROWS], columns).save(path)
    return path


def demo_command(args) -> None:
    result = run_demo(Path(args.out))
    print(f"sdlora demo finished in {result.seconds:.0f} s")
    for style, path in result.adapters.items():
        print(f"  {style} adapter: {path}")
    print(f"  grid (base, each style at 0.5 and 1.0, both mixed by add and by orthogonal, "
          "and with the stripes on the late steps only): "
          f"{result.grid}")
    print("  next: sdlora render --base demo --lora "
          f"{result.adapters['sepia']}:0.7 --prompt 'a red circle on a blue background' "
          f"--out {Path(args.out) / 'render'}")
