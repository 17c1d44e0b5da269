"""Classical baselines on exactly the label subsets of a curve: what a user would try first.

A curve that shows domain pre-training beating a ViT trained from scratch says little if a
logistic regression on the pixels does better still. Every arm here is the one logistic probe
(`beitdomain.models.probe.fit_logistic_probe`: L2, class-balanced, as the fine-tunes weigh their
loss) whose inverse regularisation C is chosen *within the label budget*: by stratified
cross-validation inside the subset (`beitdomain.data.budget.kfold_splits`, the class-balanced
likelihood of the pooled out-of-fold predictions), never on labels outside it. Arms differ only
in their features:

* `pixels`: the evaluation view downsampled to `size` x `size`, intensities in [0, 1];
* `pca`: those pixels projected on their first principal components, fitted on the unlabelled
  images the caller passes (the train split, never the test images);
* `probe`: mean-pooled, normalised features of a frozen backbone (random or pre-trained).

Seconds on a CPU: the demo's 1,968 + 656 images at 32 px fit every subset of a curve in well
under a minute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from beitdomain.eval.metrics import classification_metrics
from beitdomain.models import probe as P
from beitdomain.models.probe import C_GRID, DEFAULT_C, ChosenC, LogisticProbe, fit_logistic_probe
from beitdomain.progress import CountProgress

# C_GRID, DEFAULT_C and ChosenC are the one probe's (`beitdomain.models.probe`), named here too.
__all__ = [
    "C_GRID",
    "DEFAULT_C",
    "BaselineArm",
    "ChosenC",
    "choose_c",
    "fit_and_score",
    "frozen_features",
    "pca_features",
    "pixel_features",
    "run_baselines",
]


def _fit(x: np.ndarray, y: np.ndarray, c: float, standardize: bool, seed: int) -> LogisticProbe:
    """The curve's estimator at one C: `fit_logistic_probe`, class-balanced (`seed` is that of
    the cell; lbfgs draws nothing)."""
    return fit_logistic_probe(x, y, c=c, class_balanced=True, standardize=standardize)


# C by cross-validation inside a subset: the one probe's `choose_c`, class-balanced, on the
# features as they are unless `standardize=True` (see `beitdomain.models.probe.choose_c`).
choose_c = partial(P.choose_c, class_balanced=True, standardize=False)


def fit_and_score(
    features: np.ndarray,
    labels: np.ndarray,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    classes: Sequence[str],
    *,
    seed: int = 0,
    standardize: bool = False,
    grid: Sequence[float] = C_GRID,
    folds: int = 5,
) -> dict[str, Any]:
    """One baseline cell: C chosen inside `train_idx`, fitted on it, scored on `test_idx`.

    Args:
        features: [N, D] for every item the indices refer to.
        labels: [N] class indices (into `classes`).
        train_idx: the label subset, the only labels looked at before the test.
        test_idx: the test split.

    Returns:
        The test metrics (`classification_metrics`) plus `c`, `cv_folds` and `n_labels`.
    """
    train_idx = np.asarray(train_idx, dtype=np.int64)
    y = np.asarray(labels)
    x_tr, y_tr = features[train_idx], y[train_idx]
    # What `fit_logistic_probe(c="cv", class_balanced=True)` fits, in two steps so that every
    # fit on the cell's labels goes through `_fit`.
    chosen = choose_c(x_tr, y_tr, grid=grid, folds=folds, seed=seed, standardize=standardize)
    probs = _fit(x_tr, y_tr, chosen.c, standardize, seed).probs(features[test_idx], len(classes))
    metrics = classification_metrics(y[test_idx], probs, list(classes))
    return {
        **metrics,
        "c": chosen.c,
        "cv_folds": chosen.folds,
        "n_labels": len(train_idx),
    }


def pixel_features(images: np.ndarray, size: int) -> np.ndarray:
    """Images [N, C, H, W] in [0, 1] -> [N, C * size * size], area-averaged to `size` px."""
    import cv2

    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {images.shape}")
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images.reshape(n, -1).astype(np.float32)
    out = np.empty((n, c, size, size), dtype=np.float32)
    for i in range(n):
        for ch in range(c):
            out[i, ch] = cv2.resize(
                images[i, ch].astype(np.float32), (size, size), interpolation=cv2.INTER_AREA
            )
    return out.reshape(n, -1)


def pca_features(
    pixels: np.ndarray, fit_idx: np.ndarray, n_components: int = 50, seed: int = 0
) -> np.ndarray:
    """Pixels projected on the principal components of `pixels[fit_idx]` (unlabelled images:
    pass the train split, never the test split)."""
    from sklearn.decomposition import PCA

    n = min(n_components, len(fit_idx), pixels.shape[1])
    return PCA(n_components=n, random_state=seed).fit(pixels[fit_idx]).transform(pixels)


def frozen_features(
    forward_features: Callable[[Any], Any], images: np.ndarray, batch_size: int = 128
) -> np.ndarray:
    """`forward_features` (e.g. `BeitClassifier.forward_features`, mean-pooled and normalised)
    over images [N, C, H, W] without gradients, in batches: [N, D] float64."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.as_tensor(
                np.ascontiguousarray(images[i : i + batch_size]), dtype=torch.float32
            )
            out.append(forward_features(x).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


@dataclass(frozen=True)
class BaselineArm:
    """A named feature matrix over all items, and whether its features are standardised."""

    name: str
    features: np.ndarray
    standardize: bool = False
    describe: str = ""


def run_baselines(
    arms: Sequence[BaselineArm],
    labels: np.ndarray,
    cells: Sequence[tuple[str, float, int, np.ndarray]],
    test_idx: np.ndarray,
    classes: Sequence[str],
    quiet: bool = True,
) -> list[dict[str, Any]]:
    """Every arm on every (labels spec, fraction, seed, subset) cell: curve rows; progress
    over the fits on stderr unless `quiet`.

    The subsets are the curve's own (the caller passes the indices its fine-tunes trained on),
    so a baseline row and a fine-tune row of the same seed saw the same labels.

    The fits use one BLAS thread: the solver's operations are small (vectors of a few thousand
    features, a few hundred labels), and a multi-threaded BLAS spent more on its threads than
    on the work (the demo's 40 cells: 24 s instead of 57 s on 2 cores); the rows also no longer
    depend on the machine's thread count.
    """
    from threadpoolctl import threadpool_limits

    rows = []
    fits = CountProgress("curve baselines: fits", len(arms) * len(cells), quiet=quiet)
    with threadpool_limits(limits=1, user_api="blas"), fits:
        for arm in arms:
            fits.describe(f"curve baselines: {arm.name}")
            for spec, fraction, seed, subset in cells:
                m = fit_and_score(
                    arm.features,
                    labels,
                    subset,
                    test_idx,
                    classes,
                    seed=seed,
                    standardize=arm.standardize,
                )
                rows.append(
                    {
                        "init": arm.name,
                        "labels": spec,
                        "fraction": fraction,
                        "seed": seed,
                        "n_labels": m["n_labels"],
                        "c": m["c"],
                        "n_test": m.get("n"),
                        **{
                            k: m.get(k)
                            for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
                        },
                    }
                )
                fits.advance()
    return rows
