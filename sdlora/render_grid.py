"""Labelled XY grids: cells in rows and columns, column labels on top, row labels at the left."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

PADDING = 4
LINE_HEIGHT = 12  # PIL's default bitmap font is about 11 px tall
CHAR_WIDTH = 6


def grid_image(
    cells: list[list[Image.Image]], column_labels: list[str], row_labels: list[str]
) -> Image.Image:
    """One image of `cells[row][column]`, all of one size, with a label per column and row."""
    cell_width, cell_height = cells[0][0].size
    font = ImageFont.load_default()
    wrap = max(8, (cell_width - 2 * PADDING) // CHAR_WIDTH)
    column_text = [textwrap.wrap(label, wrap)[:3] or [""] for label in column_labels]
    row_text = [
        textwrap.wrap(label, 24)[: max(1, cell_height // LINE_HEIGHT)] or [""]
        for label in row_labels
    ]
    top = max(len(lines) for lines in column_text) * LINE_HEIGHT + 2 * PADDING
    left = max(CHAR_WIDTH * max(len(line) for line in lines) for lines in row_text) + 2 * PADDING
    grid = Image.new(
        "RGB",
        (left + cell_width * len(column_labels), top + cell_height * len(row_labels)),
        "white",
    )
    draw = ImageDraw.Draw(grid)
    for column, lines in enumerate(column_text):
        for number, line in enumerate(lines):
            draw.text(
                (left + column * cell_width + PADDING, PADDING + number * LINE_HEIGHT),
                line,
                fill="black",
                font=font,
            )
    for row, lines in enumerate(row_text):
        for number, line in enumerate(lines):
            draw.text(
                (PADDING, top + row * cell_height + PADDING + number * LINE_HEIGHT),
                line,
                fill="black",
                font=font,
            )
        for column, cell in enumerate(cells[row]):
            grid.paste(cell.convert("RGB"), (left + column * cell_width, top + row * cell_height))
    return grid
