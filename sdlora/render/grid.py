"""Labelled image grids: the picture people look at after training, a weight sweep or the demo.

One painter for every grid sdlora writes (render's --grid, validation grids, the demo grid):
cells in rows and columns, column labels on top (wrapped to the cell's width), row labels at
the left (wrapped to a few words a line).
"""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

PADDING = 4
LINE_HEIGHT = 12  # PIL's default bitmap font is about 11 px tall
CHAR_WIDTH = 6
ROW_LABEL_CHARS = 24


def labelled_grid(
    rows: list[list[Image.Image]], row_labels: list[str], column_labels: list[str]
) -> Image.Image:
    """One RGB image of `rows[r][c]` with a label per column and per row (either may be empty).

    Cells may differ in size; each takes a slot as large as the largest cell.
    """
    cell_width = max(image.width for row in rows for image in row)
    cell_height = max(image.height for row in rows for image in row)
    font = ImageFont.load_default()
    wrap = max(8, (cell_width - 2 * PADDING) // CHAR_WIDTH)
    column_text = [textwrap.wrap(label, wrap)[:3] or [""] for label in column_labels]
    row_text = [
        textwrap.wrap(label, ROW_LABEL_CHARS)[: max(1, cell_height // LINE_HEIGHT)] or [""]
        for label in row_labels
    ]
    top = max(map(len, column_text)) * LINE_HEIGHT + 2 * PADDING if any(column_labels) else 0
    widest = max((len(line) for lines in row_text for line in lines), default=0)
    left = CHAR_WIDTH * widest + 2 * PADDING if any(row_labels) else 0
    columns = max(map(len, rows))
    grid = Image.new("RGB", (left + cell_width * columns, top + cell_height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for column, lines in enumerate(column_text):
        for number, line in enumerate(lines):
            position = (left + column * cell_width + PADDING, PADDING + number * LINE_HEIGHT)
            draw.text(position, line, fill="black", font=font)
    for row, cells in enumerate(rows):
        for number, line in enumerate(row_text[row] if row < len(row_text) else []):
            position = (PADDING, top + row * cell_height + PADDING + number * LINE_HEIGHT)
            draw.text(position, line, fill="black", font=font)
        for column, cell in enumerate(cells):
            grid.paste(cell.convert("RGB"), (left + column * cell_width, top + row * cell_height))
    return grid
