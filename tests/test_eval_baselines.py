"""Classical baselines: C chosen inside the label subset only, scored on the test split."""

from __future__ import annotations

import numpy as np
import pytest

from beitdomain.eval import baselines as B


def _blobs(n: int, d: int = 20, seed: int = 0, shift: float = 3.0):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 3 == 0).astype(int)  # a third positive, as ELPV's defective cells
    x = rng.normal(size=(n, d))
    x[:, 0] += shift * y
    return x, y


def test_choose_c_never_reads_a_label_outside_the_subset(monkeypatch):
    x, y = _blobs(400)
    subset = np.arange(0, 60)
    test = np.arange(200, 400)
    seen: list[np.ndarray] = []
    real_fit = B._fit

    def spy(xx, yy, c, standardize, seed):
        seen.append(xx)
        return real_fit(xx, yy, c, standardize, seed)

    monkeypatch.setattr(B, "_fit", spy)
    m = B.fit_and_score(x, y, subset, test, ["ok", "bad"], seed=0)
    rows = {tuple(r) for r in x[subset]}
    assert seen and all(tuple(r) in rows for xx in seen for r in xx)
    assert m["cv_folds"] == 5 and m["n_labels"] == 60 and m["c"] in B.C_GRID
    assert m["balanced_accuracy"] > 0.7  # one informative feature, 60 labels


def test_choose_c_takes_the_best_out_of_fold_score_and_the_smaller_c_on_ties():
    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    x = rng.normal(size=(60, 200))
    x[:, 0] = y * 10.0 + rng.normal(size=60) * 0.1  # one clean feature among 199 noisy ones
    chosen = B.choose_c(x, y, folds=5, criterion="balanced_accuracy")
    assert set(chosen.scores) == set(B.C_GRID) and chosen.folds == 5
    assert chosen.scores[10.0] == pytest.approx(1.0)  # the clean feature separates the classes
    assert chosen.c == 1e-4  # every C ties here, and ties go to the simplest model
    likely = B.choose_c(x, y)  # the default criterion: the out-of-fold likelihood
    assert likely.c == 10.0  # no tie: the clean feature earns confidence with weaker penalty
    assert likely.scores[10.0] > likely.scores[1e-4] and all(v < 0 for v in likely.scores.values())
    x[:, 0] = rng.normal(size=60)  # now only noise: no C can be right out of fold
    assert max(B.choose_c(x, y, criterion="balanced_accuracy").scores.values()) < 0.8


def test_too_few_labels_to_cross_validate_falls_back_to_the_default_c():
    x, y = _blobs(50)
    subset = np.array([0, 1])  # one label per class: nothing to validate on
    m = B.fit_and_score(x, y, subset, np.arange(10, 50), ["ok", "bad"])
    assert m["c"] == B.DEFAULT_C and m["cv_folds"] == 0


def test_pixel_features_area_downsample_and_pca_fitted_on_the_given_images():
    imgs = np.zeros((3, 1, 8, 8), dtype=np.float32)
    imgs[1, 0, :4, :4] = 1.0
    px = B.pixel_features(imgs, 2)
    assert px.shape == (3, 4)
    assert px[1].tolist() == [1.0, 0.0, 0.0, 0.0] and px[0].sum() == 0
    x, _ = _blobs(30, d=10)
    z = B.pca_features(x, np.arange(10), n_components=50)
    assert z.shape == (30, 10)  # at most as many components as fitting images
    assert np.allclose(z[:10].mean(0), 0, atol=1e-9)  # centred on the fitting images only
    assert not np.allclose(z.mean(0), 0, atol=1e-3)


def test_run_baselines_rows_carry_the_subsets_they_were_given():
    x, y = _blobs(300)
    arms = [B.BaselineArm("pixels", x), B.BaselineArm("probe", x * 100, standardize=True)]
    cells = [("10%", 0.1, 0, np.arange(0, 30)), ("10%", 0.1, 1, np.arange(30, 60))]
    rows = B.run_baselines(arms, y, cells, np.arange(100, 300), ["ok", "bad"])
    assert [(r["init"], r["seed"], r["n_labels"]) for r in rows] == [
        ("pixels", 0, 30),
        ("pixels", 1, 30),
        ("probe", 0, 30),
        ("probe", 1, 30),
    ]
    assert all(0.5 < r["balanced_accuracy"] <= 1 and r["n_test"] == 200 for r in rows)


def test_run_baselines_fits_with_one_blas_thread(monkeypatch):
    from threadpoolctl import threadpool_info, threadpool_limits

    seen = []
    fit = B._fit

    def recording_fit(*args, **kwargs):
        seen.extend(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")
        return fit(*args, **kwargs)

    monkeypatch.setattr(B, "_fit", recording_fit)
    x, y = _blobs(120)
    with threadpool_limits(limits=2, user_api="blas"):  # whatever the caller's setting
        B.run_baselines(
            [B.BaselineArm("pixels", x)],
            y,
            [("50%", 0.5, 0, np.arange(60))],
            np.arange(60, 120),
            ["ok", "bad"],
        )
    assert seen and set(seen) == {1}


def test_frozen_features_batches_without_gradients():
    import torch

    w = torch.nn.Linear(16, 3)
    imgs = np.random.default_rng(0).random((5, 1, 4, 4)).astype(np.float32)
    f = B.frozen_features(lambda t: w(t.flatten(1)), imgs, batch_size=2)
    assert f.shape == (5, 3) and f.dtype == np.float64
    with torch.no_grad():
        ref = w(torch.from_numpy(imgs).flatten(1)).numpy()
    assert np.allclose(f, ref, atol=1e-6)
