"""Labels within the budget: every index selection may look at comes from the label subset."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beitdomain.data.budget import carve_validation, kfold_splits, selection_splits
from beitdomain.user import UserError


def _subset(n_pos: int, n_neg: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Label-subset indices scattered in a large index space, and their labels."""
    idx = np.sort(np.random.default_rng(seed).choice(10_000, n_pos + n_neg, replace=False))
    labels = ["defective"] * n_pos + ["functional"] * n_neg
    perm = np.random.default_rng(seed + 1).permutation(len(labels))
    return idx, [labels[i] for i in perm]


def test_carve_at_the_demo_1pct_budget_holds_out_each_class_and_stays_inside():
    idx, labels = _subset(6, 12)  # the demo's 18 labels at 1%: a third defective
    sp = carve_validation(idx, labels, 0.2, seed=0)
    assert set(sp.fit) | set(sp.val) == set(idx) and not set(sp.fit) & set(sp.val)
    lab = dict(zip(idx.tolist(), labels))
    assert Counter(lab[i] for i in sp.val) == {"defective": 1, "functional": 2}
    assert len(sp.fit) == 15


def test_carve_keeps_a_single_label_class_in_training_and_fails_with_none_to_spare():
    sp = carve_validation([5, 7, 9], ["a", "b", "b"], 0.5, seed=0)
    assert 5 in sp.fit and len(sp.val) == 1 and sp.val[0] in (7, 9)
    with pytest.raises(UserError, match="no class has two labels.*'none'"):
        carve_validation([5, 7], ["a", "b"], 0.5)


def test_kfold_validates_every_label_once_and_lowers_k_to_the_smallest_class():
    idx, labels = _subset(3, 15)
    folds = kfold_splits(idx, labels, folds=5, seed=1)
    assert len(folds) == 3  # three defective labels: three folds, one each
    seen = np.concatenate([f.val for f in folds])
    assert sorted(seen.tolist()) == sorted(idx.tolist())
    lab = dict(zip(idx.tolist(), labels))
    for f in folds:
        assert set(f.fit) | set(f.val) == set(idx) and not set(f.fit) & set(f.val)
        assert Counter(lab[i] for i in f.val)["defective"] == 1


@settings(max_examples=60, deadline=None)
@given(
    n_pos=st.integers(2, 30),
    n_neg=st.integers(2, 60),
    seed=st.integers(0, 1000),
    mode=st.sampled_from(["carve", "kfold", "none"]),
)
def test_no_selection_mode_returns_an_index_outside_the_subset(n_pos, n_neg, seed, mode):
    idx, labels = _subset(n_pos, n_neg, seed)
    for sp in selection_splits(mode, idx, labels, seed=seed):
        used = set(sp.fit.tolist()) | set([] if sp.val is None else sp.val.tolist())
        assert used <= set(idx.tolist())
        assert len(set(sp.fit.tolist())) == len(sp.fit)


def test_selection_modes_none_outside_and_unknown():
    idx, labels = _subset(4, 8)
    (none,) = selection_splits("none", idx, labels)
    assert none.val is None and none.fit.tolist() == idx.tolist()
    (out,) = selection_splits("outside", idx, labels, outside_val=[20_001, 20_002])
    assert out.val.tolist() == [20_001, 20_002]
    with pytest.raises(UserError, match="no validation|none: set data.val_fraction"):
        selection_splits("outside", idx, labels)
    with pytest.raises(UserError, match="'vall' is not one of: carve"):
        selection_splits("vall", idx, labels)
