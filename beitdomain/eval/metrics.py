"""Classification metrics on a test split, computed by scikit-learn, returned as plain JSON types.

The numbers a user reports should be the standard ones, so every score here is a scikit-learn
call; this module only fixes the conventions (which labels, what happens when a class is absent
from the test set) and turns the results into a JSON-ready dict for `results.json`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: Sequence[Sequence[float]] | np.ndarray,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, AUROC, per-class scores and the confusion matrix.

    Conventions:
        * predictions are `argmax(probs)`;
        * balanced accuracy and macro-F1 average over the classes present in `y_true` or the
          predictions (scikit-learn's defaults), so a class missing from a small test set does not
          count as a zero;
        * AUROC: binary -> AUROC of the positive class (index 1); multi-class -> one-vs-rest
          macro average. When a class is absent from `y_true` it is undefined: `auroc` is None
          and `auroc_note` says why;
        * per-class precision/recall/F1 use zero_division=0 (a class never predicted has
          precision 0).

    Args:
        y_true: class index per test image, in [0, K).
        probs: [N, K] class probabilities (softmax outputs; rows should sum to 1).
        class_names: the K class names, in index order.

    Returns:
        A JSON-serialisable dict: n, accuracy, balanced_accuracy, macro_f1, auroc, auroc_note,
        per_class {name: {precision, recall, f1, support}}, confusion_matrix (rows: true class,
        columns: predicted class), class_names.

    Raises:
        ValueError: on mismatched shapes or labels outside [0, K).
    """
    y = np.asarray(y_true).astype(np.int64).reshape(-1)  # [N]
    p = np.asarray(probs, dtype=np.float64)  # [N, K]
    names = [str(c) for c in class_names]
    k = len(names)
    if k < 2:
        raise ValueError(f"need at least 2 classes, got {k}: {names}")
    if p.ndim != 2 or p.shape != (len(y), k):
        raise ValueError(f"probs must have shape [N={len(y)}, K={k}], got {list(p.shape)}")
    if len(y) == 0:
        raise ValueError("no test images: cannot compute metrics on an empty set")
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"labels must be class indices in [0, {k}), got values {np.unique(y)}")
    pred = p.argmax(axis=1)  # [N]
    labels = list(range(k))

    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=0
    )
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }
    auroc, note = _auroc(y, p, names)
    return {
        "n": len(y),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": float(_balanced_accuracy(y, pred)),
        "macro_f1": float(skm.f1_score(y, pred, average="macro", zero_division=0)),
        "auroc": auroc,
        "auroc_note": note,
        "per_class": per_class,
        "confusion_matrix": skm.confusion_matrix(y, pred, labels=labels).tolist(),
        "class_names": names,
    }


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over classes present in y (scikit-learn's definition), without its warning
    about predicted classes that are absent from y_true: that situation is expected on tiny
    test sets and already visible in the confusion matrix."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return skm.balanced_accuracy_score(y, pred)


def _auroc(y: np.ndarray, p: np.ndarray, names: list[str]) -> tuple[float | None, str | None]:
    present = set(np.unique(y).tolist())
    absent = [names[i] for i in range(len(names)) if i not in present]
    if absent:
        return None, (
            "AUROC is undefined: class(es) "
            + ", ".join(repr(a) for a in absent)
            + " have no example in the test set"
        )
    if len(names) == 2:
        return float(skm.roc_auc_score(y, p[:, 1])), None
    # One-vs-rest needs rows that sum to 1; renormalise to absorb float error from the softmax.
    p = p / np.clip(p.sum(axis=1, keepdims=True), 1e-12, None)
    score = skm.roc_auc_score(
        y, p, multi_class="ovr", average="macro", labels=list(range(len(names)))
    )
    return float(score), None
