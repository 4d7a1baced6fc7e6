"""The pictures a run shows in TensorBoard: digits in a grid under their titles, and the confusion
matrix. Drawn with Pillow into uint8 RGB arrays, which ``tf.summary.image`` takes as they are
(``callbacks`` writes them; no TensorFlow here).

Pillow rather than matplotlib: these are drawn after every epoch, and matplotlib's text layout made a
confusion matrix cost ~0.1 CPU-s and a grid of 25 titled digits ~0.07 (docs/performance.md).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# ColorBrewer's 9-class "Blues", light to dark (matplotlib's Blues colormap is made of the same colours)
BLUES = np.array([(247, 251, 255), (222, 235, 247), (198, 219, 239), (158, 202, 225), (107, 174, 214),
                  (66, 146, 198), (33, 113, 181), (8, 81, 156), (8, 48, 107)], np.float64)
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (217, 217, 217)
MARGIN = 8


@functools.cache
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own font at ``size`` pixels (its fixed-size bitmap font where Pillow lacks FreeType)."""
    return ImageFont.load_default(size=size)


def text_centered(draw: ImageDraw.ImageDraw, center_x: float, top: float, text: str, size: int,
                  fill=BLACK) -> None:
    """``text`` centred on ``center_x``, its top at ``top``. Measured, not anchored: a bitmap font
    has no anchors."""
    face = font(size)
    draw.text((round(center_x - draw.textlength(text, font=face) / 2), round(top)), text, font=face, fill=fill)


def blues(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as uint8 RGB colours of ``BLUES`` (0: the lightest), interpolated linearly."""
    position = np.clip(values, 0.0, 1.0) * (len(BLUES) - 1)
    low = np.minimum(np.floor(position).astype(int), len(BLUES) - 2)
    fraction = (position - low)[..., None]
    return np.round(BLUES[low] * (1 - fraction) + BLUES[low + 1] * fraction).astype(np.uint8)


def digit_grid(images: np.ndarray, titles: list[str], columns: int = 5, scale: int = 3) -> np.ndarray:
    """``images`` (28x28 values in [0, 1], white ink on black) ``scale`` times their size in a grid of
    ``columns`` on light grey, each under its title: an (H, W, 3) uint8 picture."""
    side, title_height, gap = 28 * scale, 16, 12
    rows = max(1, math.ceil(len(images) / columns))
    cell_w, cell_h = side + gap, title_height + side + gap
    canvas = np.empty((2 * MARGIN + rows * cell_h - gap, 2 * MARGIN + columns * cell_w - gap, 3), np.uint8)
    canvas[:] = GREY
    corners = [(MARGIN + (i % columns) * cell_w, MARGIN + (i // columns) * cell_h) for i in range(len(images))]
    for (x, y), image in zip(corners, images, strict=True):
        pixels = np.round(np.clip(np.reshape(image, (28, 28)), 0.0, 1.0) * 255).astype(np.uint8)
        y += title_height
        canvas[y : y + side, x : x + side] = np.kron(pixels, np.ones((scale, scale), np.uint8))[..., None]
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for (x, y), title in zip(corners, titles, strict=False):  # titles beyond the images are not drawn
        text_centered(draw, x + side / 2, y, title, 12)
    return np.asarray(picture)


def confusion_matrix(matrix: np.ndarray, cell: int = 34) -> np.ndarray:
    """A 10x10 confusion matrix (rows: true digit, columns: predicted digit) as an (H, W, 3) uint8
    picture: each cell coloured by log(1 + count) and showing its count when not zero."""
    matrix = np.asarray(matrix)
    left, bottom = 46, 40  # room for the row labels and "true digit", the column labels and "predicted digit"
    n = len(matrix)
    width, height = left + n * cell + MARGIN, MARGIN + n * cell + bottom
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = WHITE
    shade = np.log1p(matrix) / max(np.log1p(matrix.max()), 1e-9)
    cells = np.kron(blues(shade), np.ones((cell, cell, 1), np.uint8))
    canvas[MARGIN : MARGIN + n * cell, left : left + n * cell] = cells
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    draw.rectangle((left - 1, MARGIN - 1, left + n * cell, MARGIN + n * cell), outline=BLACK)
    dark = matrix.max() / 2  # counts above it are written in white on their dark cells
    for (row, col), count in np.ndenumerate(matrix):
        if count:
            color = WHITE if count > dark else BLACK
            text_centered(draw, left + (col + 0.5) * cell, MARGIN + (row + 0.5) * cell - 6, str(count), 11, color)
    for k in range(n):
        text_centered(draw, left + (k + 0.5) * cell, MARGIN + n * cell + 4, str(k), 12)  # predicted digits
        text_centered(draw, left - 12, MARGIN + (k + 0.5) * cell - 7, str(k), 12)  # true digits
    text_centered(draw, left + n * cell / 2, height - 18, "predicted digit", 12)
    label = Image.new("RGB", (n * cell, 16), WHITE)
    text_centered(ImageDraw.Draw(label), n * cell / 2, 1, "true digit", 12)
    picture.paste(label.rotate(90, expand=True), (4, MARGIN))
    return np.asarray(picture)
