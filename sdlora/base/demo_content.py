"""Reading a demo picture's content (shape colour, shape kind, background colour) under a style.

    read_content(image, styled_palette(style)) -> demo_base.Reading

`demo_base.measure` reads the base's own pictures. A style changes what it sees without
changing the subject: a colour grade moves every hue (sepia turns blue into a brownish grey),
a texture darkens whole rows (stripes, which the tiny VAE also draws with shifted hues in the
dark bands). `read_content` reads the subject the prompt asks for, not the style:

- colours are named by the nearest colour of the palette on its way from plain to styled
  (`styled_palette`: each colour plain and as the style draws it, a flat picture of it styled),
  in chroma (saturation x hue), which ignores brightness and so the stripes' darkening. A
  segment, not the styled end alone: an adapter draws its style a little weaker or stronger in
  places, and the tiny VAE pulls faded colours back towards the ones it knows;
- the shape is the pixels far in chroma from the background; it must be one piece and convex,
  as every demo shape is (a shape broken into parts, holed or frayed into a blob is no shape);
- its kind comes from its outline, not from its texture: the kind whose ideal outline, drawn in
  the shape's bounding box, overlaps it most (intersection over union), and only when that
  overlap is close (else it is a blob, not a shape).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from sdlora.base import demo_base

# colour name -> (2, 2): its chroma (as `demo_base.chroma`) plain, then styled.
Palette = dict[str, np.ndarray]
# How closely a shape's outline must overlap its kind's ideal outline: set from the base's own
# drawings of the held-out prompts, a little below the least it reaches (its circles 0.9 and up,
# its squares, a little pinched, 0.85; its triangles, narrow with hollow sides, 0.7).
MIN_OVERLAP = {"circle": 0.8, "square": 0.75, "triangle": 0.65}
# One piece: the largest connected part holds this much of the shape...
MIN_PIECE = 0.9
# ...and fills this much of its convex hull (the base's pinched squares 0.88 and up; a notched
# triangle or a frayed blob less).
MIN_CONVEX = 0.85


def styled_palette(style: Callable[[Image.Image], Image.Image] | None = None) -> Palette:
    """Each demo colour plain and as `style` draws it (the median chroma of a flat picture of
    it, styled); without a style both ends are the plain colour."""
    def median_chroma(image: Image.Image) -> np.ndarray:
        return np.median(demo_base.chroma(image).reshape(-1, 2), axis=0)

    palette = {}
    for name, rgb in demo_base.COLOURS.items():
        flat = Image.new("RGB", (demo_base.RESOLUTION,) * 2, rgb)
        palette[name] = np.stack([median_chroma(flat), median_chroma(style(flat) if style else flat)])
    return palette


def colour_name(point: np.ndarray, palette: Palette) -> str:
    """The palette colour whose plain-to-styled segment passes nearest to `point`."""
    def distance(name: str) -> float:
        start, end = palette[name]
        along = end - start
        t = np.clip((point - start) @ along / max(float(along @ along), 1e-12), 0.0, 1.0)
        return float(np.linalg.norm(point - (start + t * along)))
    return min(palette, key=distance)


def closest_colours(palette: Palette) -> float:
    """How near the two closest palette colours come, plain or styled."""
    return min(float(np.linalg.norm(palette[a][end] - palette[b][end]))
               for a in palette for b in palette if a < b for end in (0, 1))


def read_content(image: Image.Image, palette: Palette | None = None) -> demo_base.Reading:
    """Shape colour, shape kind and background colour of `image`, colours named in `palette`
    (the plain colours when None). A shape that is broken, holed or fits no kind reads None."""
    palette = palette if palette is not None else styled_palette()
    points = demo_base.chroma(image)
    border = np.concatenate([points[:2].reshape(-1, 2), points[-2:].reshape(-1, 2),
                             points[:, :2].reshape(-1, 2), points[:, -2:].reshape(-1, 2)])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(points - background, axis=-1)
    far = np.percentile(distance, 99)
    # A shape differs from the background at least half as much as the palette's two closest
    # colours differ from each other; less is noise or a style's texture.
    if far < closest_colours(palette) / 2:
        return demo_base.Reading(None, None, colour_name(background, palette))
    mask = distance > far / 2
    colour = colour_name(np.median(points[mask], axis=0), palette)
    return demo_base.Reading(colour, shape_kind(mask), colour_name(background, palette))


def shape_kind(mask: np.ndarray) -> str | None:
    """'circle', 'square' or 'triangle' when `mask` is one convex piece whose outline fits that
    kind's ideal outline in its bounding box; else None."""
    piece = largest_piece(mask)
    if piece.sum() < MIN_PIECE * mask.sum() or piece.sum() < MIN_CONVEX * convex_hull(piece).sum():
        return None  # broken into parts, holed or frayed
    rows, columns = np.nonzero(piece.any(axis=1))[0], np.nonzero(piece.any(axis=0))[0]
    box = piece[rows.min():rows.max() + 1, columns.min():columns.max() + 1]
    overlaps = {kind: iou(box, ideal_outline(kind, *box.shape)) for kind in demo_base.SHAPES}
    kind = max(overlaps, key=overlaps.get)
    return kind if overlaps[kind] >= MIN_OVERLAP[kind] else None


def ideal_outline(kind: str, height: int, width: int) -> np.ndarray:
    """The mask of `kind` filling a height x width box, as `demo_base.draw` draws it (a triangle
    points up)."""
    y = (np.arange(height)[:, None] + 0.5) / height  # 0 at the top, 1 at the bottom
    x = (np.arange(width)[None, :] + 0.5) / width
    if kind == "square":
        return np.ones((height, width), dtype=bool)
    if kind == "circle":
        return (2 * x - 1) ** 2 + (2 * y - 1) ** 2 <= 1
    return np.abs(2 * x - 1) <= y  # triangle: as wide as the box at the bottom, a point on top


def iou(first: np.ndarray, second: np.ndarray) -> float:
    return float((first & second).sum() / max((first | second).sum(), 1))


def largest_piece(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected part of `mask`."""
    labels = connected_parts(mask)
    if not labels.any():
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def convex_hull(mask: np.ndarray) -> np.ndarray:
    """The pixels inside the convex hull of `mask`'s pixel centres (Andrew's monotone chain)."""
    points = sorted(zip(*np.nonzero(mask)[::-1]))  # (x, y)

    def turns_left(o, a, b) -> bool:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]) > 0

    chains = []
    for ordered in (points, points[::-1]):
        chain = []
        for point in ordered:
            while len(chain) >= 2 and not turns_left(chain[-2], chain[-1], point):
                chain.pop()
            chain.append(point)
        chains += chain[:-1]
    y, x = np.mgrid[:mask.shape[0], :mask.shape[1]]
    inside = mask.copy()
    if len(chains) >= 3:
        inside |= np.all([(b[0] - a[0]) * (y - a[1]) - (b[1] - a[1]) * (x - a[0]) >= 0
                          for a, b in zip(chains, chains[1:] + chains[:1])], axis=0)
    return inside


def connected_parts(mask: np.ndarray) -> np.ndarray:
    """Label the 8-connected parts of `mask` 1, 2, ... (0 off the mask). A flood fill: the
    pictures are 64 x 64."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    height, width = mask.shape
    count = 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        count += 1
        labels[start] = count
        stack = [start]
        while stack:
            y, x = stack.pop()
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] \
                            and not labels[ny, nx]:
                        labels[ny, nx] = count
                        stack.append((ny, nx))
    return labels
