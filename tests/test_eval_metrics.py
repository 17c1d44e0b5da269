"""Classification metrics: hand-computed values on tiny cases, agreement with scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from beitdomain.eval.metrics import classification_metrics


def _onehot_probs(pred: list[int], k: int, confidence: float = 0.8) -> np.ndarray:
    p = np.full((len(pred), k), (1 - confidence) / (k - 1))
    p[np.arange(len(pred)), pred] = confidence
    return p


def test_three_class_hand_computed():
    y = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(y, _onehot_probs(pred, 3), ["a", "b", "c"])
    assert m["n"] == 6
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # recalls 2/3, 1/2, 1
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # precisions 1, 1/2, 1/2 -> F1 0.8, 0.5, 2/3
    assert m["per_class"]["a"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    )
    assert m["per_class"]["b"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["c"]["f1"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["class_names"] == ["a", "b", "c"]
    json.dumps(m)  # results.json needs plain types


def test_binary_auroc_hand_computed():
    y = [0, 0, 1, 1]
    # positive-class scores: negatives 0.2, 0.7; positives 0.6, 0.1
    probs = [[0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.9, 0.1]]
    m = classification_metrics(y, probs, ["neg", "pos"])
    # of the 4 (positive, negative) pairs only (0.6, 0.2) is ranked right
    assert m["auroc"] == pytest.approx(0.25)
    assert m["auroc_note"] is None
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["confusion_matrix"] == [[1, 1], [1, 1]]


@pytest.mark.parametrize("k", [2, 4])
def test_matches_scikit_learn_on_random_inputs(k):
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 300)
    logits = rng.normal(size=(300, k)) + 1.5 * np.eye(k)[y]  # better than chance, not perfect
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = probs.argmax(1)
    m = classification_metrics(y, probs, [f"c{i}" for i in range(k)])
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    expected_auc = (
        skm.roc_auc_score(y, probs[:, 1])
        if k == 2
        else skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
    )
    assert m["auroc"] == pytest.approx(expected_auc)
    assert 0.6 < m["auroc"] < 1.0
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    recall = skm.recall_score(y, pred, average=None)
    assert [m["per_class"][f"c{i}"]["recall"] for i in range(k)] == pytest.approx(recall)
    assert sum(m["per_class"][f"c{i}"]["support"] for i in range(k)) == 300


def test_auroc_none_with_reason_when_a_class_is_absent():
    y = [0, 1, 1, 0]
    probs = _onehot_probs([0, 1, 2, 0], 3)
    m = classification_metrics(y, probs, ["a", "b", "rare"])
    assert m["auroc"] is None
    assert "'rare'" in m["auroc_note"] and "test set" in m["auroc_note"]
    # the other metrics are still defined; the absent class shows up as a zero-support row
    assert m["per_class"]["rare"]["support"] == 0
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["confusion_matrix"][2] == [0, 0, 0]


def test_binary_single_class_present():
    m = classification_metrics([1, 1], [[0.2, 0.8], [0.6, 0.4]], ["neg", "pos"])
    assert m["auroc"] is None and "'neg'" in m["auroc_note"]


@pytest.mark.parametrize(
    ("y", "probs", "names", "match"),
    [
        ([0, 1], [[0.5, 0.5]], ["a", "b"], "shape"),
        ([0, 3], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], r"\[0, 2\)"),
        ([0], [[1.0]], ["a"], "at least 2 classes"),
    ],
)
def test_bad_inputs(y, probs, names, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(y, probs, names)
