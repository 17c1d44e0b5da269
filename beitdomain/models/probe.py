"""The one logistic probe on frozen features, and the pooled features it reads.

Three callers fit it: the curve's probe (and pixel) baselines (C chosen by cross-validation
inside the label subset, `beitdomain.eval.baselines`), `beitdomain eval probe` (fixed C,
`beitdomain.eval.representation`) and LP-FT's head (fixed C, `fit_probe_head`; Kumar et al.,
ICLR 2022: fine-tuning from a head fitted on the frozen backbone's features, rather than from a
random head, keeps the first gradients from distorting the pre-trained features). They share one
estimator, `fit_logistic_probe`: scikit-learn's L2 logistic regression (lbfgs) on features
standardized by scikit-learn's `StandardScaler`, and differ only where they say so, by name:
`c` (a number, or `"cv"`), `class_balanced` and `standardize`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from beitdomain.data.budget import kfold_splits
from beitdomain.precision import autocast
from beitdomain.user import UserError

if TYPE_CHECKING:  # scikit-learn is imported where a probe is fitted (it takes a second)
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

# Log-spaced: pixels in [0, 1] want small C (4,096 correlated inputs), standardised probe
# features larger; the grid covers both, and cross-validation inside the budget picks.
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
DEFAULT_C = 0.1  # when the subset is too small to cross-validate (no class with two labels)
MAX_ITER = 5000  # lbfgs iterations; the fits converge well before (the demo's: < 2000)


@dataclass(frozen=True)
class ChosenC:
    """The C cross-validation chose, and the pooled out-of-fold score of every candidate."""

    c: float
    scores: dict[float, float]
    folds: int


@dataclass(frozen=True)
class LogisticProbe:
    """A fitted probe: `StandardScaler` (or none) then L2 logistic regression.

    Attributes:
        classes: the class indices of the training labels, sorted (`[K_seen]`).
        c: the inverse regularization strength it was fitted with.
        chosen: the cross-validation that chose `c`, when `c="cv"` was asked for.
        scaler: the standardization (None: the features were used as they are).
        model: the logistic regression (None: one class only; it is always predicted).
    """

    classes: np.ndarray
    c: float
    chosen: ChosenC | None
    scaler: StandardScaler | None
    model: LogisticRegression | None

    @property
    def classes_(self) -> np.ndarray:
        """`classes` under scikit-learn's name, for code written against its estimators."""
        return self.classes

    def _inputs(self, x: np.ndarray) -> np.ndarray:
        return self.scaler.transform(x) if self.scaler is not None else x

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """`[N, K_seen]` probabilities, columns in the order of `classes`."""
        if self.model is None:
            return np.ones((len(x), 1))
        return self.model.predict_proba(self._inputs(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """`[N]` predicted class indices."""
        if self.model is None:
            return np.full(len(x), self.classes[0])
        return self.model.predict(self._inputs(x))

    def probs(self, x: np.ndarray, num_classes: int) -> np.ndarray:
        """`[N, num_classes]` probabilities; a class without training labels gets 0."""
        out = np.zeros((len(x), num_classes))
        out[:, self.classes] = self.predict_proba(x)
        return out

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        """Plain accuracy of the predictions on (x, y)."""
        return float(np.mean(self.predict(x) == np.asarray(y)))

    def linear_head(self, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """The probe as a linear layer on the raw features: `(weight [K, D], bias [K])`.

        The standardization is folded in, so `weight @ x + bias` gives the logits of
        `predict_proba` on `x` (a softmax of them is its probabilities). With two classes, the
        binary model's logit `z` becomes the logits `(-z/2, z/2)`, the same softmax. A class
        with no training label gets bias -30: (almost) never predicted.
        """
        if self.model is None:
            raise ValueError("a probe fitted on one class has no linear head")
        coef_, icpt = self.model.coef_, self.model.intercept_
        coef = np.zeros((num_classes, coef_.shape[1]))
        bias = np.full(num_classes, -30.0)
        cl = self.classes
        if coef_.shape[0] == 1:  # binary: one logit for classes[1] against classes[0]
            coef[cl[1]], bias[cl[1]] = coef_[0] / 2, icpt[0] / 2
            coef[cl[0]], bias[cl[0]] = -coef_[0] / 2, -icpt[0] / 2
        else:
            coef[cl], bias[cl] = coef_, icpt
        if self.scaler is None:
            return coef, bias
        weight = coef / self.scaler.scale_
        return weight, bias - weight @ self.scaler.mean_


def _fit_at(
    x: np.ndarray, y: np.ndarray, c: float, *, class_balanced: bool, standardize: bool
) -> LogisticProbe:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    classes = np.unique(y)
    if len(classes) < 2:
        return LogisticProbe(classes, c, None, None, None)
    scaler = StandardScaler().fit(x) if standardize else None
    model = LogisticRegression(
        C=c, max_iter=MAX_ITER, class_weight="balanced" if class_balanced else None
    ).fit(scaler.transform(x) if scaler is not None else x, y)
    return LogisticProbe(classes, c, None, scaler, model)


def choose_c(
    x: np.ndarray,
    y: np.ndarray,
    *,
    class_balanced: bool,
    standardize: bool,
    grid: Sequence[float] = C_GRID,
    folds: int = 5,
    seed: int = 0,
    criterion: str = "log_loss",
) -> ChosenC:
    """C by stratified k-fold inside (x, y) only: the best pooled out-of-fold score.

    Every candidate is the probe `fit_logistic_probe` fits (same balancing, same
    standardization, fitted on each fold's training part). `criterion` "log_loss" (the
    default) scores the out-of-fold probabilities by their class-balanced log-likelihood;
    "balanced_accuracy" their argmax. On the demo's subsets the likelihood chose steadier Cs
    (raw pixels, 1% / 10%: 0.674 / 0.700 against 0.667 / 0.686). Ties go to the smaller C (the
    simpler model). With no class of two labels there is nothing to validate on, and
    `DEFAULT_C` is used.
    """
    from sklearn.metrics import balanced_accuracy_score, log_loss

    y = np.asarray(y)
    try:
        splits = kfold_splits(np.arange(len(y)), y.tolist(), folds, seed)
    except UserError:
        return ChosenC(DEFAULT_C, {}, 0)
    classes = np.unique(y)
    weight = {k: len(y) / (len(classes) * np.sum(y == k)) for k in classes}
    scores: dict[float, float] = {}
    for c in sorted(grid):
        prob = np.full((len(y), len(classes)), 1.0 / len(classes))
        for s in splits:
            if len(np.unique(y[s.fit])) < 2:  # a fold without both classes predicts its one
                prob[s.val] = (classes == y[s.fit][0]).astype(float)
                continue
            m = _fit_at(
                x[s.fit], y[s.fit], c, class_balanced=class_balanced, standardize=standardize
            )
            prob[np.ix_(s.val, np.searchsorted(classes, m.classes))] = m.predict_proba(x[s.val])
        if criterion == "log_loss":
            prob = prob / prob.sum(1, keepdims=True)
            w = np.array([weight[k] for k in y])
            scores[c] = -float(log_loss(y, prob, labels=classes, sample_weight=w))
        else:
            scores[c] = float(balanced_accuracy_score(y, classes[prob.argmax(1)]))
    best = max(scores.values())
    return ChosenC(min(c for c, v in scores.items() if v >= best - 1e-12), scores, len(splits))


def fit_logistic_probe(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    c: float | Literal["cv"],
    class_balanced: bool,
    standardize: bool = True,
    cv_grid: Sequence[float] = C_GRID,
    cv_folds: int = 5,
    cv_seed: int = 0,
) -> LogisticProbe:
    """L2 logistic regression on frozen features: the probe every caller in beitdomain fits.

    Args:
        features: `[N, D]` training features.
        labels: `[N]` class indices.
        c: scikit-learn's inverse regularization strength, or `"cv"`: chosen among `cv_grid`
            by stratified `cv_folds`-fold cross-validation inside (features, labels) only
            (`choose_c`, seeded by `cv_seed`), then refitted on all of them.
        class_balanced: weigh classes inversely to their frequency (as balanced accuracy and a
            class-weighted loss do), else every label counts the same.
        standardize: fit on `StandardScaler`-standardized features (zero mean, unit variance
            per feature; a constant feature is only centred). False: the features as they are
            (the curve's pixel and PCA baselines, whose C grid is meant for them).

    Raises:
        ValueError: no labels at all.
    """
    y = np.asarray(labels)
    if len(y) == 0:
        raise ValueError("a probe needs at least one training label")
    chosen = None
    if c == "cv":
        chosen = choose_c(
            features,
            y,
            class_balanced=class_balanced,
            standardize=standardize,
            grid=cv_grid,
            folds=cv_folds,
            seed=cv_seed,
        )
        c = chosen.c
    elif isinstance(c, str):
        raise ValueError(f"c={c!r}: a number or 'cv'")
    probe = _fit_at(features, y, float(c), class_balanced=class_balanced, standardize=standardize)
    return LogisticProbe(probe.classes, probe.c, chosen, probe.scaler, probe.model)


# ----------------------------------------------------------------------------- features


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The features a linear head reads, `[B, D]`: patch tokens mean-pooled, then a LayerNorm.

    Args:
        model: a beitdomain classifier (`BeitClassifier`, `TimmClassifier`: its `input_norm`
            applies the weights' convention, so `images` are in [0, 1]), or a bare timm `Beit`
            in either layout (`images` already normalized): a classifier-layout backbone
            (`global_pool='avg'`) pools then applies `fc_norm`; a pre-training backbone gives
            the features of its export (`models.export`, what `eval knn` and fine-tuning
            start from): its patch tokens before the token norm, mean-pooled, then the fresh
            `fc_norm` the export writes (a LayerNorm of weight 1 and bias 0). So the k-NN
            check during pre-training scores what `eval knn` scores on the exported backbone.
        images: `[B, C, H, W]`; a whole dataset goes through `dataset_features`.
    """
    if hasattr(model, "input_norm"):
        return model.forward_features(images)
    if getattr(model, "global_pool", "") == "avg":
        return model.forward_head(model.forward_features(images), pre_logits=True)
    (last,) = model.forward_intermediates(  # [B, L, D]: patch tokens, before the token norm
        images, indices=1, norm=False, output_fmt="NLC", intermediates_only=True
    )
    pooled = last.mean(1)
    return F.layer_norm(pooled, pooled.shape[-1:], eps=getattr(model.norm, "eps", 1e-6))


@torch.no_grad()
def eval_outputs(
    forward: Callable[[torch.Tensor], torch.Tensor],
    model: nn.Module,
    dataset: Any,
    device: torch.device,
    batch_size: int,
    amp_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """`forward(images)` over a dataset in eval mode, in order: (outputs, labels, source index).

    Items are `{'image', 'label', 'index'}`; `amp_dtype` (e.g. bf16) autocasts the forward pass.
    """
    was = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=0
    )
    outs, labels, index = [], [], []
    for b in loader:
        with autocast(device, amp_dtype):
            outs.append(forward(b["image"].to(device, non_blocking=True)).float().cpu())
        labels.append(b["label"])
        index.append(b["index"])
    model.train(was)
    return torch.cat(outs), torch.cat(labels).numpy(), torch.cat(index).numpy()


def dataset_features(
    model: nn.Module,
    dataset: Any,
    device: torch.device,
    *,
    batch_size: int = 64,
    amp_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`pooled_features` of a labelled dataset, in eval mode and in order: `(X [N, D], y [N])`."""
    feats, labels, _ = eval_outputs(
        partial(pooled_features, model), model, dataset, device, batch_size, amp_dtype
    )
    return feats.numpy().astype(np.float64), labels


def fit_probe_head(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    c: float = 0.1,
    balanced: bool = False,
) -> dict[str, Any]:
    """Sets a classifier's head to `fit_logistic_probe` (fixed `c`) on its frozen features.

    The standardization is folded into the head's weights (`LogisticProbe.linear_head`), so
    the head applied to the raw features gives the probe's probabilities. `balanced` is the
    probe's `class_balanced`. Returns what was fitted (accuracy on the features it was fitted
    on); leaves the head untouched, with a reason, when the labels hold a single class.
    """
    labels = np.asarray(labels)
    probe = fit_logistic_probe(features, labels, c=c, class_balanced=balanced, standardize=True)
    if probe.model is None:
        return {"fitted": False, "reason": f"one class only in {len(labels)} labels"}
    weight, bias = probe.linear_head(model.num_classes)
    head = model.head
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
    return {
        "fitted": True,
        "c": c,
        "n": len(labels),
        "train_accuracy": probe.accuracy(features, labels),
    }
