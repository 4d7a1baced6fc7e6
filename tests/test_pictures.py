"""The TensorBoard pictures, pixel by pixel: each digit where it belongs at three times its size under
its title, and each confusion-matrix cell shaded by its count and showing it."""

import numpy as np
from PIL import Image

from mnist_cnn import pictures
from mnist_cnn.pictures import BLUES, GREY, MARGIN


def test_a_digit_grid_shows_each_digit_three_times_its_size_under_its_title(sample):
    (x, _), _ = sample
    images = x[:7] / 255.0
    grid = pictures.digit_grid(images, [f"#{i}: 3 as 5" for i in range(7)], columns=5)
    side, title, gap = 84, 16, 12
    assert grid.dtype == np.uint8 and grid.shape == (2 * MARGIN + 2 * (title + side + gap) - gap,
                                                     2 * MARGIN + 5 * (side + gap) - gap, 3)
    for i in range(len(images)):
        left, top = MARGIN + (i % 5) * (side + gap), MARGIN + (i // 5) * (title + side + gap)
        expected = np.kron(x[i], np.ones((3, 3), np.uint8))
        for channel in range(3):
            np.testing.assert_array_equal(grid[top + title : top + title + side, left : left + side, channel], expected)
        assert (grid[top : top + title, left : left + side] < 100).any()  # the title, in dark text
    empty = grid[MARGIN + side + gap + title :, MARGIN + 2 * (side + gap) :]  # where an eighth digit would be
    assert (empty == GREY).all()


def test_the_confusion_matrix_shades_each_cell_by_its_count_and_shows_nonzero_counts():
    matrix = np.zeros((10, 10), np.int64)
    matrix[np.arange(10), np.arange(10)] = 50
    matrix[3, 5], matrix[7, 1] = 4, 1
    picture = pictures.confusion_matrix(matrix, cell=34)
    left = 46

    def cell(row, col):
        return picture[MARGIN + row * 34 : MARGIN + (row + 1) * 34, left + col * 34 : left + (col + 1) * 34]

    def fill(row, col):  # the cell's colour: its top row of pixels, above the text
        return tuple(int(v) for v in cell(row, col)[1, 1])

    assert fill(0, 0) == tuple(BLUES[-1]) and fill(0, 1) == tuple(BLUES[0])  # the largest count, and zero
    shades = [sum(fill(row, col)) for row, col in ((0, 1), (7, 1), (3, 5), (0, 0))]  # counts 0, 1, 4, 50
    assert shades == sorted(shades, reverse=True) and len(set(shades)) == 4  # darker as the count grows
    for row, col in ((0, 0), (3, 5), (7, 1)):
        assert len(np.unique(cell(row, col).reshape(-1, 3), axis=0)) > 2, (row, col)  # its count is written
    assert len(np.unique(cell(0, 1).reshape(-1, 3), axis=0)) == 1  # a zero is left blank
    Image.fromarray(picture)  # a valid RGB picture
