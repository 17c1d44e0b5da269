"""Figures for run folders: confusion matrix, label-efficiency curve, training curves.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never through pyplot, so
nothing is registered in pyplot's global figure list (no leaks across a curve of 45 runs, no
display backend needed on a headless server). PNGs are written atomically.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from beitdomain.eval.report import METRIC_NAMES
from beitdomain.fileio import atomic_write_bytes

# Legend entries that still fit inside the curve's axes without hiding what they label.
LEGEND_INSIDE_MAX = 7


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def _save(fig: Figure, out_png: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(out_png, buf.getvalue())
    return Path(out_png)


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]] | np.ndarray,
    class_names: Sequence[str],
    out_png: str | Path,
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Draws a confusion matrix (rows: true class, columns: predicted) with counts in the cells.

    Args:
        cm: [K, K] counts, as in `classification_metrics(...)['confusion_matrix']`.
        class_names: the K class names.
        out_png: where to write the PNG.
        normalize: colour by the share of each true class (row), so small classes are visible;
            the cells then show "share (count)".
        title: figure title; default "Confusion matrix".

    Returns:
        The written path.
    """
    counts = np.asarray(cm, dtype=np.float64)  # [K, K]
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(f"confusion matrix has shape {list(counts.shape)}, expected [{k}, {k}]")
    rows = counts.sum(axis=1, keepdims=True)
    shown = (
        np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0) if normalize else counts
    )
    side = min(12.0, 2.5 + 0.6 * k)
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(1.0, shown.max()))
    fig.colorbar(im, ax=ax, label="share of true class" if normalize else "images")
    ax.set_xticks(range(k), [str(c) for c in class_names], rotation=45, ha="right")
    ax.set_yticks(range(k), [str(c) for c in class_names])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or "Confusion matrix")
    if k <= 30:  # beyond that the numbers are unreadable anyway
        thresh = 0.5 * (1 if normalize else max(1.0, shown.max()))
        for i in range(k):
            for j in range(k):
                text = (
                    f"{shown[i, j]:.2f}\n({int(counts[i, j])})"
                    if normalize
                    else f"{int(counts[i, j])}"
                )
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if shown[i, j] > thresh else "black",
                )
    return _save(fig, out_png)


def _row_float(row: Mapping[str, Any], key: str) -> float | None:
    v = row.get(key)
    if v is None or v == "":
        return None
    v = float(v)
    return None if math.isnan(v) else v


CHANCE_TOLERANCE = 0.01  # a baseline within this of chance at every point is "at chance"


def fraction_tick(fraction: float) -> str:
    """A realised label fraction at two significant figures: 18 of 1,771 labels (1.02%) reads
    1%, 8 of 28 (28.6%) reads 29%; the exact values are in curve.csv and report.md."""
    pct = float(f"{100 * fraction:.2g}")
    return f"{pct:g}%"


def plot_label_efficiency(
    summary: Sequence[Mapping[str, Any]],
    out_png: str | Path,
    metric: str,
    n_train_total: int | None = None,
    reference_init: str = "scratch",
    title: str | None = None,
    dashed: Iterable[str] = (),
    chance: float | None = None,
) -> Path:
    """Metric vs labelled fraction (log axis), one line per initialization, with ±std error
    bars where a point averages two seeds or more (a single seed has no spread to draw).

    Arms named in `dashed` (the classical baselines: logistic regressions on pixels or frozen
    features) are drawn as dashed lines without markers, so the fine-tuned arms stand out.
    `chance` (the metric at chance level) is drawn as a dotted line; dashed arms at chance at
    every point are named in its legend entry instead of as lines drawn over one another. The
    y axis spans at least 0.2 and takes in the chance line, so noise is not zoomed into a gap.

    A secondary x axis on top gives the number of labelled images; a dashed horizontal line marks
    `reference_init` trained on 100% of the labels, when that cell exists.

    Args:
        summary: rows from `report.summarize`: init, fraction, n_labels, `<metric>_mean`,
            `<metric>_std` (std may be None for a single seed: no band).
        out_png: where to write the PNG.
        metric: the plotted metric ('balanced_accuracy', 'accuracy', 'auroc', 'macro_f1').
        n_train_total: images in the train split (fraction 1.0); None: inferred from the rows.
        reference_init: the from-scratch initialization the dashed line refers to.
        title: figure title; default names the metric.

    Returns:
        The written path.
    """
    label = METRIC_NAMES.get(metric, metric)
    by_init: dict[str, list[tuple[float, float, float | None]]] = {}
    ratios = []
    for row in summary:
        mean = _row_float(row, f"{metric}_mean")
        frac = _row_float(row, "fraction")
        if mean is None or frac is None or frac <= 0:
            continue
        by_init.setdefault(str(row["init"]), []).append(
            (frac, mean, _row_float(row, f"{metric}_std"))
        )
        n_labels = _row_float(row, "n_labels")
        if n_labels:
            ratios.append(n_labels / frac)
    if not by_init:
        raise ValueError(f"no summary rows with a value for {metric}_mean to plot")
    if n_train_total is None and ratios:
        n_train_total = round(float(np.median(ratios)))

    fig = _new_figure(7.0, 4.6)
    ax = fig.add_subplot()
    colors = [f"C{i}" for i in range(10)]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    # The reference first, so its colour is stable across reports.
    dashed_set = set(dashed)
    inits = sorted(by_init, key=lambda n: (n in dashed_set, n != reference_init, n))
    all_fracs: set[float] = set()
    at_chance = [
        n
        for n in inits
        if chance is not None
        and n in dashed_set
        and all(abs(p[1] - chance) <= CHANCE_TOLERANCE for p in by_init[n])
    ]
    shown_y: list[float] = []
    for i, name in enumerate(inits):
        pts = sorted(by_init[name])
        x = np.array([p[0] for p in pts])
        y = np.array([p[1] for p in pts])
        s = np.array([np.nan if p[2] is None else p[2] for p in pts])
        all_fracs.update(x.tolist())
        if name in at_chance:
            continue
        shown_y += [*(y - np.nan_to_num(s)).tolist(), *(y + np.nan_to_num(s)).tolist()]
        color = colors[i % len(colors)]
        if name in dashed_set:
            ax.plot(x, y, color=color, label=name, lw=1.4, ls="--", marker=".", ms=4)
        else:
            ax.plot(x, y, marker=markers[i % len(markers)], color=color, label=name, lw=1.8, ms=6)
        spread = np.isfinite(s)  # only points over two seeds or more have a spread
        if spread.any() and name not in dashed_set:
            ax.errorbar(
                x[spread], y[spread], yerr=s[spread], fmt="none", ecolor=color, capsize=3, lw=1
            )
    if chance is not None:
        named = f": {', '.join(at_chance)}" if at_chance else ""
        ax.axhline(chance, color="0.5", ls=":", lw=1.2, label=f"chance ({chance:.3f}){named}")
        shown_y.append(chance)
    ref = [p for p in by_init.get(reference_init, []) if math.isclose(p[0], 1.0)]
    if ref:
        ax.axhline(
            ref[0][1],
            color="0.35",
            ls="--",
            lw=1.0,
            label=f"{reference_init} @ 100% ({ref[0][1]:.3f})",
        )
    if ref:
        shown_y.append(ref[0][1])
    if shown_y:
        lo, hi = min(shown_y), max(shown_y)
        pad = max(0.03, (0.2 - (hi - lo)) / 2)
        top = min(1.02, hi + pad)  # the metrics are in [0, 1]
        ax.set_ylim(max(0.0, min(lo - pad, top - 0.2)), top)
    ax.set_xscale("log")
    ticks = sorted(all_fracs)
    ax.set_xticks(ticks, [fraction_tick(t) for t in ticks])
    ax.minorticks_off()
    lo, hi = min(ticks), max(ticks)
    ax.set_xlim(lo / 1.3, hi * 1.3)
    ax.set_xlabel("labelled fraction of the train split (log scale)")
    ax.set_ylabel(label)
    ax.grid(True, which="major", alpha=0.3)
    if n_train_total:
        n_tot = float(n_train_total)
        top = ax.secondary_xaxis("top", functions=(lambda f: f * n_tot, lambda n: n / n_tot))
        top.set_xticks([t * n_tot for t in ticks], [f"{round(t * n_tot):d}" for t in ticks])
        top.minorticks_off()
        top.set_xlabel("labelled images")
    ax.set_title(title or f"Label efficiency: {label} vs labelled fraction")
    if len(inits) + bool(ref) > LEGEND_INSIDE_MAX:
        # Many arms (an ablation, the baselines' probes): a legend inside covers the lines.
        fig.set_size_inches(9.5, 4.6)
        fig.legend(loc="outside right center", fontsize=8, frameon=True)
    else:
        ax.legend(loc="best", fontsize=9, frameon=True)
    return _save(fig, out_png)


def plot_training_curves(
    metrics_jsonl: str | Path,
    out_png: str | Path,
    keys: Sequence[str] = ("loss",),
    title: str | None = None,
) -> Path:
    """Plots logged values against the optimizer step, one panel per key.

    Records that lack a key (e.g. validation metrics logged only every few hundred steps) are
    skipped for that key.

    Args:
        metrics_jsonl: a run's `metrics.jsonl` (one JSON object with a 'step' per line).
        out_png: where to write the PNG.
        keys: the logged values to plot, e.g. ('loss', 'val_balanced_accuracy', 'lr').
        title: figure title; default the run folder's name.

    Returns:
        The written path.

    Raises:
        ValueError: when none of `keys` occurs in the file; the message lists the keys that do.
    """
    path = Path(metrics_jsonl)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    series = {}
    for key in keys:
        pts = [
            (r["step"], float(r[key]))
            for r in records
            if "step" in r and isinstance(r.get(key), (int, float))
        ]
        if pts:
            series[key] = pts
    if not series:
        found = sorted({k for r in records for k in r if k != "step"})
        raise ValueError(
            f"{path}: none of {list(keys)} was logged; logged keys: {', '.join(found) or 'none'}"
        )
    fig = _new_figure(6.0, 2.2 + 1.8 * len(series))
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, pts) in zip(axes, series.items()):
        steps, values = zip(*pts)
        ax.plot(steps, values, marker="." if len(pts) < 50 else None, lw=1.2)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
        # Plain tick labels: an offset ("+6.931e-1" in the corner) made a loss stuck at ln 2
        # read as a moving curve.
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle(title or path.parent.name)
    return _save(fig, out_png)
