"""Contact sheet: sampled images after normalization, each with its intensity histogram.

So a user sees what the model will see before spending GPU hours: a window that clips the
lungs to white or a percentile range dominated by background shows up at a glance (the
histogram titles give the fraction of pixels clipped at 0 and 1). Titles carry the file
name (not its folders) and label only; nothing from DICOM headers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from beitdomain.data.cache import CachedImages, dequantize_scale
from beitdomain.data.index import Manifest
from beitdomain.fileio import atomic_save, printable
from beitdomain.io import IntensitySpec, ReaderError, load_image


def _short(name: str, width: int = 22) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _samples(
    source: Any, spec: IntensitySpec, n: int, seed: int
) -> list[tuple[np.ndarray | None, str]]:
    """(image [C, H, W] float in [0, 1] or None if unreadable, title) for n sampled items."""
    rng = np.random.default_rng(seed)
    out: list[tuple[np.ndarray | None, str]] = []
    if isinstance(source, CachedImages):
        pick = np.sort(rng.choice(len(source), size=min(n, len(source)), replace=False))
        scale = dequantize_scale(source.images.dtype)
        for i in pick:
            path, frame = source.source(int(i))
            label = source.label(int(i))
            image = np.asarray(source[int(i)], dtype=np.float32) * np.float32(scale)
            out.append((image, _title(path, label, frame)))
        return out
    if isinstance(source, Manifest):
        files = [(source.abspath(e), e.label) for e in source.entries]
    else:
        files = [(Path(p), None) for p in source]
    pick = np.sort(rng.choice(len(files), size=min(n, len(files)), replace=False))
    for i in pick:
        path, label = files[int(i)]
        try:
            image, _ = load_image(path, spec)
        except ReaderError as e:
            out.append((None, _title(str(path), label) + f"\n{_short(e.reason, 40)}"))
            continue
        frame = None
        if image.ndim == 4:
            frame = image.shape[0] // 2
            image = image[frame]
        out.append((image, _title(str(path), label, frame)))
    return out


def _title(path: str, label: str | None, frame: int | None = None) -> str:
    text = _short(printable(Path(path).name))
    if frame:
        text += f" [{frame}]"
    return f"{text}\n{printable(label)}" if label is not None else text


def contact_sheet(
    source: Manifest | CachedImages | Sequence[str | os.PathLike],
    spec: IntensitySpec | None = None,
    out_png: str | os.PathLike = "contact_sheet.png",
    n: int = 16,
    seed: int = 0,
) -> Path:
    """Writes a PNG grid of ``n`` sampled images with per-image intensity histograms.

    Args:
        source: A manifest, a cache (shown as stored) or a list of image paths.
        spec: Normalization for files (ignored for a cache, which stores its own).
        out_png: Where to write the PNG.
        n: Number of images.
        seed: Sampling seed.

    Returns:
        The PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = spec or IntensitySpec()
    samples = _samples(source, spec, n, seed)
    if not samples:
        raise ValueError("nothing to show: the source holds no images")
    cols = math.ceil(math.sqrt(len(samples)))
    rows = math.ceil(len(samples) / cols)
    fig = plt.figure(figsize=(2.4 * cols, 3.3 * rows))
    grid = fig.add_gridspec(rows * 2, cols, height_ratios=[3, 1] * rows, hspace=0.55)
    for k, (image, title) in enumerate(samples):
        r, c = divmod(k, cols)
        ax_img = fig.add_subplot(grid[2 * r, c])
        ax_hist = fig.add_subplot(grid[2 * r + 1, c])
        ax_img.set_title(title, fontsize=7)
        ax_img.axis("off")
        if image is None:
            ax_img.text(0.5, 0.5, "unreadable", ha="center", va="center", color="red")
            ax_hist.axis("off")
            continue
        shown = image[0] if image.shape[0] == 1 else np.moveaxis(image[:3], 0, -1)
        ax_img.imshow(shown, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        values = image.ravel()
        ax_hist.hist(values, bins=64, range=(0.0, 1.0), color="0.3")
        low, high = float(np.mean(values <= 0.0)), float(np.mean(values >= 1.0))
        ax_hist.set_title(f"at 0: {low:.0%}  at 1: {high:.0%}", fontsize=6)
        ax_hist.set_yticks([])
        ax_hist.tick_params(labelsize=6)
    mode = spec.normalize if not isinstance(source, CachedImages) else "cache"
    fig.suptitle(f"{len(samples)} images after normalization ({mode})", fontsize=9)
    out_png = Path(out_png)
    atomic_save(out_png, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return out_png
