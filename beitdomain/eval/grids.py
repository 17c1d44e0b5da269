"""Labelled image grids: originals above their reconstructions, legible at any image size.

Each pair of rows holds up to `per_row` originals and, directly below each, its reconstruction;
a last, shorter chunk is padded with blank tiles so pairs never shift. Tiles are enlarged by a
whole factor (nearest neighbour, so pixels stay pixels) until they are at least `min_tile` px,
and every row is labelled on the left.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

LABEL_WIDTH = 110  # px of row labels on the left
PAD = 4  # px between tiles


def _to_uint8_hwc(x: np.ndarray) -> np.ndarray:
    """[C, H, W] float in [0, 1] -> [H, W, 3] uint8 (gray replicated)."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    if x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    elif x.shape[0] != 3:
        x = np.repeat(x[:1], 3, axis=0)  # more channels than RGB: show the first
    return (x.transpose(1, 2, 0) * 255).round().astype(np.uint8)


def paired_grid(
    top: np.ndarray,
    bottom: np.ndarray,
    labels: tuple[str, str] = ("original", "reconstruction"),
    per_row: int = 8,
    min_tile: int = 96,
    title: str | None = None,
) -> Image.Image:
    """An RGB image of `top[i]` above `bottom[i]` for every i, rows labelled.

    Args:
        top, bottom: `[N, C, H, W]` floats in [0, 1], the same N.
        labels: the row labels of each pair of rows.
        per_row: items per row.
        min_tile: tiles are enlarged by a whole factor to at least this many pixels.
        title: an optional line above the grid.
    """
    top, bottom = np.asarray(top), np.asarray(bottom)
    if top.shape[0] != bottom.shape[0]:
        raise ValueError(f"{top.shape[0]} top images but {bottom.shape[0]} bottom images")
    n = top.shape[0]
    per_row = max(1, min(per_row, n))
    h, w = top.shape[-2:]
    scale = max(1, -(-min_tile // max(h, w)))  # ceil
    th, tw = h * scale, w * scale
    chunks = -(-n // per_row)
    head = 22 if title else 0
    width = LABEL_WIDTH + per_row * (tw + PAD) + PAD
    height = head + chunks * 2 * (th + PAD) + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PAD, 4), title, fill="black")
    for c in range(chunks):
        for r, (images, label) in enumerate(((top, labels[0]), (bottom, labels[1]))):
            y = head + (2 * c + r) * (th + PAD) + PAD
            draw.text((PAD, y + th // 2 - 6), label, fill="black")
            for j in range(per_row):
                i = c * per_row + j
                if i >= n:
                    break  # blank tile: the pair above/below stays aligned
                tile = Image.fromarray(_to_uint8_hwc(images[i])).resize((tw, th), Image.NEAREST)
                canvas.paste(tile, (LABEL_WIDTH + j * (tw + PAD) + PAD, y))
    return canvas
