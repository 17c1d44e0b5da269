"""A contact sheet of a segmentation: one row per image, its truth and its prediction overlaid.

Drawn with plain NumPy and written as a PNG by PIL (no figure, no fonts): each row is the image,
the image with the true mask over it and the image with the predicted mask over it, every class
but the background in its own colour at half opacity, ignored pixels grey.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from beitdomain.fileio import atomic_write_bytes

__all__ = ["PALETTE", "mask_contact_sheet", "overlay"]

# Foreground colours (class 1, 2, ...), repeated when there are more classes.
PALETTE = np.array(
    [
        (230, 25, 75),
        (60, 180, 75),
        (0, 130, 200),
        (255, 225, 25),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
    ],
    dtype=np.float32,
)
GAP = 2  # pixels between tiles


def _gray_rgb(image: np.ndarray) -> np.ndarray:
    """``[C, H, W]`` in [0, 1] -> ``[H, W, 3]`` float32 in [0, 255]."""
    x = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    x = np.repeat(x[:1], 3, 0) if x.shape[0] != 3 else x
    return np.moveaxis(x, 0, -1) * 255.0


def overlay(
    image: np.ndarray, mask: np.ndarray, ignore_index: int | None = None, alpha: float = 0.5
) -> np.ndarray:
    """The image as RGB ``[H, W, 3]`` uint8 with each foreground class of `mask` tinted."""
    rgb = _gray_rgb(image)
    for k in np.unique(mask):
        if k == 0:
            continue
        colour = (
            np.full(3, 128.0, np.float32)
            if ignore_index is not None and k == ignore_index
            else PALETTE[(int(k) - 1) % len(PALETTE)]
        )
        where = mask == k
        rgb[where] = (1 - alpha) * rgb[where] + alpha * colour
    return np.clip(rgb, 0, 255).astype(np.uint8)


def mask_contact_sheet(
    images: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    path: str | Path,
    ignore_index: int | None = None,
) -> Path:
    """Writes the sheet (rows: image | truth | prediction) to `path`; returns it.

    Args:
        images: ``[C, H, W]`` in [0, 1], all of one size.
        truths, preds: ``[H, W]`` class indices, one per image.
    """
    import io

    from PIL import Image

    if not (len(images) == len(truths) == len(preds)) or not images:
        raise ValueError(
            f"{len(images)} images, {len(truths)} truths, {len(preds)} predictions: need as "
            "many of each, at least one"
        )
    h, w = np.asarray(truths[0]).shape
    rows = len(images)
    sheet = np.full((rows * (h + GAP) - GAP, 3 * (w + GAP) - GAP, 3), 255, np.uint8)
    for r, (image, truth, pred) in enumerate(zip(images, truths, preds)):
        tiles = (
            _gray_rgb(image).astype(np.uint8),
            overlay(image, np.asarray(truth), ignore_index),
            overlay(image, np.asarray(pred), ignore_index),
        )
        for c, tile in enumerate(tiles):
            y, x = r * (h + GAP), c * (w + GAP)
            sheet[y : y + h, x : x + w] = tile
    buf = io.BytesIO()
    Image.fromarray(sheet).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
