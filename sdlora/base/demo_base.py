"""The embedded tiny base model: where it lives, what it knows, and how to check what it drew.

    demo_base_path() -> sdlora/assets/demo_base (a diffusers StableDiffusionPipeline folder)

The base is the real SD1 architecture (AutoencoderKL, UNet2DConditionModel, CLIPTextModel with
the real CLIP vocabulary, a DDIM scheduler), only small, trained by scripts/train_demo_base.py
on the procedural images drawn here: one shape on a plain background, captioned
"a {colour} {shape} on a {colour} background". `measure` reads such an image back (colour of
the shape, its kind, colour of the background) without any model, so tests can tell whether
the base draws what it is told and whether a style adapter keeps the content.
"""

from __future__ import annotations

import colorsys
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sdlora.errors import SdloraError

DEMO_BASE_DIR = Path(__file__).parents[1] / "assets" / "demo_base"
RESOLUTION = 64
TEXT_WIDTH = 64

COLOURS = {  # name -> RGB; hues about 0, 55, 130, 225 and 280 degrees
    "red": (220, 35, 35),
    "yellow": (235, 215, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "purple": (150, 55, 200),
}
SHAPES = ("circle", "square", "triangle")
# Combinations the base never sees in training; every word still appears in other combinations.
HELD_OUT = (
    ("red", "circle", "blue"), ("yellow", "square", "purple"), ("green", "triangle", "red"),
    ("blue", "square", "yellow"), ("purple", "circle", "green"), ("red", "triangle", "yellow"),
    ("green", "square", "blue"), ("blue", "triangle", "purple"),
)


def demo_base_path() -> Path:
    """The folder of the committed tiny base (what `--base demo` loads)."""
    if not (DEMO_BASE_DIR / "model_index.json").is_file():
        raise SdloraError(f"the demo base is missing from {DEMO_BASE_DIR}; "
                          "rebuild it with python scripts/train_demo_base.py")
    return DEMO_BASE_DIR


def prompt(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (colour, shape, background) with two different colours."""
    return [(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c]


def training_combinations() -> list[tuple[str, str, str]]:
    return [combo for combo in all_combinations() if combo not in HELD_OUT]


# --- drawing ------------------------------------------------------------------------------------

def draw(shape: str, colour, background, size: float, centre: tuple[float, float],
         resolution: int = RESOLUTION) -> Image.Image:
    """One anti-aliased shape; colours are names or RGB tuples, size and centre in pixels."""
    scale = 4
    fill = COLOURS.get(colour, colour) if isinstance(colour, str) else tuple(colour)
    back = COLOURS.get(background, background) if isinstance(background, str) else tuple(background)
    image = Image.new("RGB", (resolution * scale,) * 2, back)
    pen = ImageDraw.Draw(image)
    x, y, half = centre[0] * scale, centre[1] * scale, size * scale / 2
    if shape == "circle":
        pen.ellipse((x - half, y - half, x + half, y + half), fill=fill)
    elif shape == "square":
        pen.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    elif shape == "triangle":
        pen.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image.resize((resolution, resolution), Image.Resampling.BOX)


def random_placement(rng: random.Random, resolution: int = RESOLUTION) -> tuple[float, tuple]:
    """A size between 40% and 70% of the image and a centre that keeps the shape inside."""
    size = rng.uniform(0.4, 0.7) * resolution
    margin = size / 2 + 3
    return size, (rng.uniform(margin, resolution - margin), rng.uniform(margin, resolution - margin))


def random_example(rng: random.Random, combos) -> tuple[Image.Image, str]:
    """A captioned training image: one of `combos` at a random size and position."""
    colour, shape, background = rng.choice(combos)
    size, centre = random_placement(rng)
    return draw(shape, colour, background, size, centre), prompt(colour, shape, background)


# --- measuring ----------------------------------------------------------------------------------

@dataclass
class Reading:
    colour: str | None
    shape: str | None
    background: str | None

    def matches(self, colour: str, shape: str, background: str) -> bool:
        return (self.colour, self.shape, self.background) == (colour, shape, background)


def chroma(image: Image.Image) -> np.ndarray:
    """(H, W, 2): saturation x (cos hue, sin hue); unchanged when brightness is scaled."""
    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float32) / 255.0
    angle = hsv[..., 0] * 2 * np.pi
    return np.stack([hsv[..., 1] * np.cos(angle), hsv[..., 1] * np.sin(angle)], axis=-1)


def hue_name(point: np.ndarray) -> str:
    """The COLOURS name nearest in hue to a chroma point."""
    angle = np.degrees(np.arctan2(point[1], point[0])) % 360
    hues = {name: colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] * 360
            for name, rgb in COLOURS.items()}
    return min(hues, key=lambda name: min(abs(angle - hues[name]), 360 - abs(angle - hues[name])))


def measure(image: Image.Image) -> Reading:
    """Read back shape colour, shape and background colour.

    Background = the border's median chroma; the shape = pixels whose chroma is far from it,
    named by `shape_name`.
    Working on chroma ignores brightness, so darkening textures such as stripes do not move it.
    """
    points = chroma(image)
    border = np.concatenate([points[:2].reshape(-1, 2), points[-2:].reshape(-1, 2),
                             points[:, :2].reshape(-1, 2), points[:, -2:].reshape(-1, 2)])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(points - background, axis=-1)
    far = np.percentile(distance, 99)
    if far < 0.08:
        return Reading(None, None, hue_name(background))
    mask = distance > far / 2
    return Reading(hue_name(np.median(points[mask], axis=0)), shape_name(mask),
                   hue_name(background))


def shape_name(mask: np.ndarray) -> str | None:
    """Triangle: its top quarter is much narrower than its bottom quarter; otherwise square or
    circle by how much of the bounding box it fills (1 against 0.79; blurred, 0.86 splits them)."""
    rows, columns = np.nonzero(mask.sum(axis=1) >= 2)[0], np.nonzero(mask.sum(axis=0) >= 2)[0]
    if not len(rows) or not len(columns):
        return None
    top, bottom, left, right = rows.min(), rows.max() + 1, columns.min(), columns.max() + 1
    quarter = max((bottom - top) // 4, 1)
    taper = mask[top:top + quarter].sum() / max(mask[bottom - quarter:bottom].sum(), 1)
    if taper < 0.6:
        return "triangle"
    fill = mask.sum() / max((bottom - top) * (right - left), 1.0)
    return "square" if fill >= 0.86 else "circle"


def saturation(image: Image.Image) -> float:
    """Mean HSV saturation in [0, 1]: the statistic a colour-grading style moves."""
    return float(np.asarray(image.convert("HSV"), dtype=np.float32)[..., 1].mean() / 255.0)


def stripe_energy(image: Image.Image, period: int = 16) -> float:
    """Relative amplitude of horizontal bands of `period` pixels in the brightness profile."""
    value = np.asarray(image.convert("HSV"), dtype=np.float32)[..., 2] / 255.0
    profile = value.mean(axis=1)
    spectrum = np.abs(np.fft.rfft(profile - profile.mean())) / len(profile)
    return float(spectrum[len(profile) // period] / max(profile.mean(), 1e-3))


# --- the architecture ---------------------------------------------------------------------------

def build_demo_pipeline(seed: int = 0):
    """The untrained demo base: SD1 classes, small widths (the text encoder is 64 wide)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from sdlora.base.tiny import clip_tokenizer, tiny_scheduler, tiny_text_encoder, tiny_vae

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=16, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
    )
    return StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(hidden_size=TEXT_WIDTH),
        tokenizer=clip_tokenizer(), unet=unet, scheduler=tiny_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
