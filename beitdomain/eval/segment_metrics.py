"""Segmentation metrics: per-class Dice and IoU from one confusion matrix, and their mean over the
foreground classes.

Counts are pooled over every pixel of the evaluated set (as mmsegmentation's mIoU), so a small
image weighs by its pixels, and a class that neither the truth nor the prediction holds anywhere
has no score (NaN) rather than a perfect or a zero one; the means skip it. Class 0 is the
background and stays out of the foreground means. Pixels at `ignore_index` count nowhere.

Exact integer counts (``np.bincount``) instead of MONAI's ``DiceMetric``: MONAI averages per
image and needs one-hot tensors of every image kept; one ``[K, K]`` matrix accumulates a whole
evaluation in constant memory and gives Dice, IoU and accuracy from the same counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["SegmentationMeter", "confusion_matrix", "segmentation_metrics"]


def confusion_matrix(
    pred: Any, target: Any, num_classes: int, ignore_index: int | None = None
) -> np.ndarray:
    """``[K, K]`` int64 counts, rows the true class, columns the predicted one.

    Args:
        pred: predicted class per pixel, any shape (array or tensor).
        target: true class per pixel, the same shape.
        num_classes: K.
        ignore_index: a target value left out of the counts.

    Raises:
        ValueError: shapes differ, or a value lies outside 0..K-1 (and is not ignored).
    """
    p = np.asarray(pred.detach().cpu() if hasattr(pred, "detach") else pred).reshape(-1)
    t = np.asarray(target.detach().cpu() if hasattr(target, "detach") else target).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"prediction has {p.size} pixels, target {t.size}")
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    p, t = p.astype(np.int64), t.astype(np.int64)
    for name, v in (("target", t), ("prediction", p)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} holds values outside 0..{num_classes - 1}")
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def segmentation_metrics(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Dice and IoU per class, their foreground means, and pixel accuracy.

    Returns:
        ``{"dice": {name: float}, "iou": {name: float}, "mean_dice": float, "mean_iou": float,
        "pixel_accuracy": float}``; a class absent from truth and prediction is NaN and left
        out of the means (which are NaN when every foreground class is).
    """
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix {cm.shape} for {len(class_names)} classes")
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2 * tp / (2 * tp + fp + fn)
        iou = tp / (tp + fp + fn)
    fg = slice(1, None)

    def mean(v: np.ndarray) -> float:
        v = v[fg][~np.isnan(v[fg])]
        return float(v.mean()) if v.size else float("nan")

    total = cm.sum()
    return {
        "dice": dict(zip(class_names, map(float, dice))),
        "iou": dict(zip(class_names, map(float, iou))),
        "mean_dice": mean(dice),
        "mean_iou": mean(iou),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
    }


class SegmentationMeter:
    """Accumulates a confusion matrix over batches; `compute()` gives `segmentation_metrics`.

    ``update(logits [B, K, H, W] or classes [B, H, W], target [B, H, W])``.
    """

    def __init__(self, class_names: Sequence[str], ignore_index: int | None = None) -> None:
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        k = len(self.class_names)
        self.confusion = np.zeros((k, k), np.int64)

    def update(self, pred: Any, target: Any) -> None:
        if pred.ndim == target.ndim + 1:  # logits or probabilities: the best class per pixel
            pred = pred.argmax(1)
        self.confusion += confusion_matrix(pred, target, len(self.class_names), self.ignore_index)

    def compute(self) -> dict[str, Any]:
        return segmentation_metrics(self.confusion, self.class_names)
