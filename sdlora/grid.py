"""Labelled image grids: the picture people look at after training or a weight sweep."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

_PAD = 4


def labelled_grid(rows: list[list[Image.Image]], row_labels: list[str],
                  column_labels: list[str]) -> Image.Image:
    """Paste rows of equally sized images into one RGB image with labels on top and on the left.

    rows[r][c] is the image in row r, column c; labels are drawn with PIL's default font.
    """
    font = ImageFont.load_default()
    cell_w = max(image.width for row in rows for image in row)
    cell_h = max(image.height for row in rows for image in row)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max((measure.textlength(label, font=font) for label in row_labels), default=0)
    left = int(label_w) + 2 * _PAD if any(row_labels) else 0
    top = 14 + 2 * _PAD if any(column_labels) else 0
    grid = Image.new("RGB", (left + cell_w * max(map(len, rows)), top + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels):
        draw.text((left + c * cell_w + _PAD, _PAD), _fit(draw, label, font, cell_w), fill="black",
                  font=font)
    for r, row in enumerate(rows):
        if r < len(row_labels):
            draw.text((_PAD, top + r * cell_h + cell_h // 2 - 6), row_labels[r], fill="black",
                      font=font)
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB"), (left + c * cell_w, top + r * cell_h))
    return grid


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Shorten a label with an ellipsis so it stays inside its column."""
    if draw.textlength(text, font=font) <= width - 2 * _PAD:
        return text
    while text and draw.textlength(text + "…", font=font) > width - 2 * _PAD:
        text = text[:-1]
    return text + "…"
