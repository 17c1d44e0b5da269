"""Reconstruction grids: pairs aligned for any count, tiles legible, rows labelled."""

from __future__ import annotations

import numpy as np
import pytest

from beitdomain.eval.grids import LABEL_WIDTH, PAD, paired_grid


@pytest.mark.parametrize("n", [1, 5, 8, 11])
def test_each_original_sits_above_its_own_reconstruction(n):
    values = (np.arange(n) + 1) / (n + 2)
    top = np.ones((n, 1, 16, 16)) * values[:, None, None, None]
    bottom = top.copy()  # a perfect reconstruction: same value right below
    img = np.asarray(paired_grid(top, bottom, per_row=4, min_tile=96))
    tile = 96  # 16 px enlarged x6
    per_row = min(4, n)
    assert img.shape[1] == LABEL_WIDTH + per_row * (tile + PAD) + PAD
    chunks = -(-n // 4)
    assert img.shape[0] == chunks * 2 * (tile + PAD) + PAD
    for i in range(4 * chunks):
        c, j = divmod(i, 4)
        if j >= per_row:
            continue
        x = LABEL_WIDTH + j * (tile + PAD) + PAD + tile // 2
        y_top = (2 * c) * (tile + PAD) + PAD + tile // 2
        y_bot = y_top + tile + PAD
        if i < n:
            expect = round(values[i] * 255)
            assert img[y_top, x, 0] == expect and img[y_bot, x, 0] == expect, i
        else:  # padding of the last, shorter chunk stays blank
            assert img[y_top, x, 0] == 255 and img[y_bot, x, 0] == 255


def test_rows_are_labelled_and_small_images_are_enlarged():
    top = np.random.default_rng(0).random((3, 1, 8, 8))
    img = np.asarray(paired_grid(top, top, min_tile=64, title="step 100"))
    label_area = img[:, : LABEL_WIDTH - PAD]
    assert (label_area < 128).any()  # text drawn in the label column
    assert img.shape[0] >= 2 * 64  # 8 px tiles shown at 64 px


def test_mismatched_counts_are_refused():
    with pytest.raises(ValueError, match="3 top images but 2 bottom"):
        paired_grid(np.zeros((3, 1, 4, 4)), np.zeros((2, 1, 4, 4)))
