"""One logistic probe: the curve's baselines, `eval probe` and LP-FT's head fit the same estimator,
and one `pooled_features` gives the features they read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from beitdomain.eval import baselines as B
from beitdomain.eval.metrics import classification_metrics
from beitdomain.eval.representation import probe_probs
from beitdomain.models.probe import (
    dataset_features,
    fit_logistic_probe,
    fit_probe_head,
    pooled_features,
)

D = 16


def _classifier(num_classes: int):
    from beitdomain.models.backbone import get_preset
    from beitdomain.models.classifier import BeitClassifier

    cfg = get_preset("tiny", img_size=32, patch_size=8, in_chans=1, embed_dim=D, depth=1)
    return BeitClassifier.from_config(cfg, num_classes)


def _features(classes: list[int], n: int, seed: int):
    # Small, unequal feature scales (std 1e-4 to 3e-3): where "standardized" must mean the same
    # thing to every caller (std + 1e-6 and std differ here by up to 1%).
    rng = np.random.default_rng(seed)
    scale = np.geomspace(1e-4, 3e-3, D)
    centers = rng.normal(0, 1, size=(len(classes), D))
    y = np.asarray(classes)[np.arange(n) % len(classes)]
    x = (centers[np.searchsorted(classes, y)] + 1.5 * rng.normal(size=(n, D))) * scale
    return x, y


@pytest.mark.parametrize(
    ("classes", "num_classes"),
    [([0, 1], 2), ([0, 1, 3], 4)],  # binary; three classes of four, class 2 without labels
)
def test_the_three_callers_give_the_same_predictions_on_the_same_features(classes, num_classes):
    x, y = _features(classes, 240, seed=num_classes)
    train, test = np.arange(0, 90), np.arange(90, 240)
    c = 0.5

    # `eval probe`
    p_eval = probe_probs(x[train], y[train], x[test], num_classes, c=c, balanced=True)
    # the curve's baselines: their estimator at C, standardized like a probe arm
    p_curve = B._fit(x[train], y[train], c, True, 0).probs(x[test], num_classes)
    # LP-FT's head, applied to the raw features
    model = _classifier(num_classes)
    info = fit_probe_head(model, x[train], y[train], c=c, balanced=True)
    with torch.no_grad():
        logits = model.head(torch.as_tensor(x[test], dtype=torch.float32)).double()
    p_head = torch.softmax(logits, 1).numpy()

    assert info["fitted"]
    np.testing.assert_allclose(p_curve, p_eval, atol=1e-12)
    np.testing.assert_allclose(p_head, p_eval, atol=1e-4)  # the head is float32
    assert (p_head.argmax(1) == p_eval.argmax(1)).all()
    assert (p_curve.argmax(1) == p_eval.argmax(1)).all()
    assert np.all(p_eval[:, [k for k in range(num_classes) if k not in classes]] == 0)
    # ... so the curve's cell, C "chosen" from a grid of one, scores the eval probe's probs.
    names = [str(k) for k in range(num_classes)]
    cell = B.fit_and_score(x, y, train, test, names, standardize=True, grid=(c,))
    ref = classification_metrics(y[test], p_eval, names)
    assert cell["c"] == c
    for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
        assert cell[k] == pytest.approx(ref[k], abs=1e-12)
    # and the probe itself predicts what its probabilities say
    probe = fit_logistic_probe(x[train], y[train], c=c, class_balanced=True)
    assert (probe.predict(x[test]) == p_eval.argmax(1)).all()
    assert probe.accuracy(x[train], y[train]) == info["train_accuracy"]


def test_c_by_cross_validation_is_the_curves_choice():
    x, y = _features([0, 1], 200, seed=3)
    train, test = np.arange(60), np.arange(60, 200)
    probe = fit_logistic_probe(x[train], y[train], c="cv", class_balanced=True, cv_seed=4)
    cell = B.fit_and_score(x, y, train, test, ["a", "b"], standardize=True, seed=4)
    assert probe.chosen == B.choose_c(x[train], y[train], standardize=True, seed=4)
    assert probe.c == cell["c"] and probe.chosen.folds == cell["cv_folds"] == 5
    ref = classification_metrics(y[test], probe.probs(x[test], 2), ["a", "b"])
    assert all(cell[k] == ref[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"))


def test_the_settings_that_differ_are_named_and_change_the_fit():
    x, y = _features([0, 1], 120, seed=5)
    y = np.where(np.arange(120) < 100, 0, y)  # imbalanced: mostly class 0
    balanced = fit_logistic_probe(x, y, c=1.0, class_balanced=True)
    plain = fit_logistic_probe(x, y, c=1.0, class_balanced=False)
    assert (balanced.predict(x) == 1).sum() > (plain.predict(x) == 1).sum()
    raw = fit_logistic_probe(x, y, c=1.0, class_balanced=True, standardize=False)
    assert raw.scaler is None and balanced.scaler is not None
    with pytest.raises(ValueError, match="a number or 'cv'"):
        fit_logistic_probe(x, y, c="grid", class_balanced=True)  # type: ignore[arg-type]
    one = fit_logistic_probe(x[:5], np.zeros(5, dtype=int), c=1.0, class_balanced=True)
    assert one.model is None and one.probs(x[:3], 3).tolist() == [[1.0, 0.0, 0.0]] * 3


def test_one_pooled_features_for_classifiers_backbones_and_datasets():
    from beitdomain.engine import represent

    assert represent.pooled_features is pooled_features  # one function, not two
    torch.manual_seed(0)
    model = _classifier(2).eval()
    model.input_norm.set(0.5, 0.5)
    x01 = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        via_model = pooled_features(model, x01)  # [0, 1] images: its input_norm applies
        via_backbone = pooled_features(model.backbone, (x01 - 0.5) / 0.5)
    torch.testing.assert_close(via_model, via_backbone)
    assert via_model.shape == (3, D)

    dataset = [{"image": x01[i], "label": i % 2, "index": i} for i in range(3)]
    X, y = dataset_features(model, dataset, torch.device("cpu"), batch_size=2)
    np.testing.assert_allclose(X, via_model.numpy(), atol=1e-6)
    assert X.dtype == np.float64 and y.tolist() == [0, 1, 0]
