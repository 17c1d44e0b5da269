"""Contact sheet: sampled images after normalization, each with its intensity histogram.

So a user sees what the model will see before spending GPU hours: a window that clips the
lungs to white or a percentile range dominated by background shows up at a glance (the
histogram titles give the fraction of pixels clipped at 0 and 1). Titles carry the file
name (not its folders) and label only; nothing from DICOM headers.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from beitdomain.data.cache import CachedImages, dequantize_scale
from beitdomain.data.index import Manifest
from beitdomain.fileio import atomic_save, printable
from beitdomain.io import IntensitySpec, ReaderError, load_image

log = logging.getLogger(__name__)
FLAT_FRACTION = 0.98  # an image with this share of pixels at 0 or at 1 shows nothing


def _name_tail(name: str, width: int = 22) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _samples(
    source: Any, spec: IntensitySpec, n: int, seed: int, modalities: list[str] | None = None
) -> list[tuple[np.ndarray | None, str]]:
    """(image [C, H, W] float in [0, 1] or None if unreadable, title) for n sampled items.

    `modalities`, when given, receives the DICOM modality of each file read ('' otherwise).
    """
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
            image, meta = load_image(path, spec)
            if modalities is not None:
                modalities.append(str(meta.get("modality") or ""))
        except ReaderError as e:
            out.append((None, _title(str(path), label) + f"\n{_name_tail(e.reason, 40)}"))
            continue
        frame = None
        if image.ndim == 4:
            frame = image.shape[0] // 2
            image = image[frame]
        out.append((image, _title(str(path), label, frame)))
    return out


def _title(path: str, label: str | None, frame: int | None = None) -> str:
    text = _name_tail(printable(Path(path).name))
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
    modalities: list[str] = []
    samples = _samples(source, spec, n, seed, modalities)
    if not samples:
        raise ValueError("nothing to show: the source holds no images")
    warn_flat(samples, spec, modalities)
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
    mode = describe_spec(spec) if not isinstance(source, CachedImages) else "as cached"
    fig.suptitle(f"{len(samples)} images after normalization ({mode})", fontsize=9)
    out_png = Path(out_png)
    atomic_save(out_png, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return out_png


def describe_spec(spec: IntensitySpec) -> str:
    """What the normalization does, in words: 'window ct-lung', 'percentile 0.5-99.5', ..."""
    if spec.window is not None and spec.normalize in ("auto", "window"):
        w = spec.window
        text = f"window {w}" if isinstance(w, str) else f"window center {w[0]:g}, width {w[1]:g}"
        return text if spec.normalize == "window" else f"auto: {text}"
    if spec.normalize == "percentile":
        lo, hi = spec.percentiles
        return f"percentile {lo:g}-{hi:g}"
    if spec.normalize == "auto":
        return "auto: the file's window (DICOM), else percentiles"
    return spec.normalize


def warn_flat(
    samples: list[tuple[np.ndarray | None, str]], spec: IntensitySpec, modalities: list[str]
) -> int:
    """Warns when normalization left images flat (nearly every pixel at 0 or at 1).

    A CT window (Hounsfield units) on MR or ultrasound frames does exactly that, silently;
    the warning names the modalities seen and what to use instead. Returns the flat count.
    """
    images = [im for im, _ in samples if im is not None]
    flat = sum(
        1
        for im in images
        if max(float(np.mean(im <= 0.0)), float(np.mean(im >= 1.0))) >= FLAT_FRACTION
        or float(np.ptp(im)) < 1e-3
    )
    if not flat:
        return 0
    seen = Counter(m for m in modalities if m)
    non_ct = {m: c for m, c in seen.items() if m != "CT"}
    ct_window = isinstance(spec.window, str) and spec.window.startswith("ct-")
    why = ""
    if spec.window is not None:
        why = (
            f" {describe_spec(spec)} is in Hounsfield units, which only CT images have"
            if ct_window
            else f" {describe_spec(spec)} does not fit their values"
        )
        if non_ct:
            why += " (modalities here: " + ", ".join(f"{m} {c}" for m, c in non_ct.items()) + ")"
        why += "; for non-CT images use --normalize percentile (or a window in their own units)"
    log.warning(
        "%d of %d images are flat after normalization (%s): %d%%+ of their pixels are at 0 or "
        "at 1, so they show nothing.%s",
        flat,
        len(images),
        describe_spec(spec),
        round(100 * FLAT_FRACTION),
        why,
    )
    return flat
