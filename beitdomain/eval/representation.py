"""How good are frozen features? k-NN and linear-probe classification, as SSL libraries report.

Pure functions of feature matrices (NumPy + scikit-learn): where the features come from (a
pre-training run, a fine-tuned model, a random backbone) is the engine's business
(`beitdomain.engine.represent`). Both return class probabilities, so the scores are the same
`classification_metrics` that fine-tuning reports.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from beitdomain.eval.metrics import classification_metrics
from beitdomain.models.probe import fit_logistic_probe


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_probs(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> np.ndarray:
    """Weighted k-NN on cosine similarity (the DINO / lightly monitor): `[N_test, K]` probabilities.

    Each of the `k` nearest training features votes for its class with weight
    `exp(similarity / temperature)`; the votes are normalized per test item. `k` is capped by
    the number of training features.

    Args:
        train_x: `[N, D]` training features; `train_y`: `[N]` class indices in `[0, num_classes)`.
        test_x: `[M, D]` features to classify.
        num_classes: K.
        k: neighbours per test item.
        temperature: sharpness of the similarity weighting.
    """
    train_y = np.asarray(train_y, dtype=np.int64)
    if len(train_y) == 0:
        raise ValueError("k-NN needs at least one training feature")
    k = max(1, min(k, len(train_y)))
    sim = _unit_rows(test_x) @ _unit_rows(train_x).T  # [M, N] cosine similarity
    nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # [M, k], unordered
    near_sim = np.take_along_axis(sim, nearest, axis=1)
    weights = np.exp((near_sim - near_sim.max(axis=1, keepdims=True)) / temperature)
    votes = np.zeros((len(sim), num_classes))
    np.add.at(votes, (np.arange(len(sim))[:, None], train_y[nearest]), weights)
    return votes / votes.sum(axis=1, keepdims=True)


def probe_probs(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    *,
    c: float = 0.1,
    balanced: bool = True,
) -> np.ndarray:
    """Linear probe: the one logistic probe at a fixed C, `[N_test, K]` probabilities.

    `fit_logistic_probe` (L2 logistic regression on standardized features): `c` is
    scikit-learn's inverse regularization strength (the same `probe_c` the LP-FT head uses);
    `balanced` (its `class_balanced`) weighs classes inversely to their frequency, as balanced
    accuracy does. A class with no training feature gets probability 0.
    """
    train_y = np.asarray(train_y, dtype=np.int64)
    probe = fit_logistic_probe(train_x, train_y, c=c, class_balanced=balanced, standardize=True)
    return probe.probs(np.asarray(test_x), num_classes)


def representation_scores(
    method: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: list[str],
    *,
    k: int = 20,
    c: float = 0.1,
) -> dict[str, Any]:
    """Test metrics of a k-NN (`method='knn'`) or linear probe (`'probe'`) on frozen features.

    Returns `classification_metrics` (accuracy, balanced accuracy, macro-F1, AUROC, ...) plus
    `n_train`, `n_test` and the chance level of balanced accuracy (1 / classes).
    """
    (xtr, ytr), (xte, yte) = train, test
    if method == "knn":
        probs = knn_probs(xtr, ytr, xte, len(classes), k=k)
    elif method == "probe":
        probs = probe_probs(xtr, ytr, xte, len(classes), c=c)
    else:
        raise ValueError(f"method={method!r}; valid: knn, probe")
    m = classification_metrics(yte, probs, classes)
    m.update(n_train=len(ytr), n_test=len(yte), chance_balanced_accuracy=1.0 / len(classes))
    return m
