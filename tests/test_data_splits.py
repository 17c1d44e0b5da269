"""Label subsets and splits: `--labels` syntax, nesting, stratification, impossible requests."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beitdomain.data.splits import (
    LabelSpec,
    LabelSubsetError,
    describe_subset,
    label_priority_order,
    label_subset,
    parse_labels_spec,
    stratified_split,
    subset_size,
)
from beitdomain.user import UserError

# --------------------------------------------------------------------------------------------
# --labels syntax
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("1%", "fraction", 0.01),
        ("12.5%", "fraction", 0.125),
        ("100%", "fraction", 1.0),
        ("0.01", "fraction", 0.01),
        ("1.0", "fraction", 1.0),
        ("200", "count", 200),
        ("1", "count", 1),
        ("5/class", "per_class", 5),
        (" 5 / Class ", "per_class", 5),
    ],
)
def test_parse_labels_spec_forms(text, kind, value):
    spec = parse_labels_spec(text)
    assert spec.kind == kind
    assert spec.value == pytest.approx(value)
    assert isinstance(spec.value, int) == (kind != "fraction")


@pytest.mark.parametrize("text", ["abc", "", "0", "0%", "150%", "1.5", "-3", "0/class", "5/img"])
def test_parse_labels_spec_rejects_with_the_four_forms(text):
    with pytest.raises(LabelSubsetError) as e:
        parse_labels_spec(text)
    msg = str(e.value)
    for form in ("'1%'", "'0.01'", "'200'", "'5/class'"):
        assert form in msg
    assert repr(text) in msg
    assert isinstance(e.value, UserError)


# --------------------------------------------------------------------------------------------
# Label subsets
# --------------------------------------------------------------------------------------------

LABELS_30 = ["cat"] * 10 + ["dog"] * 12 + ["fox"] * 5 + ["owl"] * 3


def test_one_percent_of_30_images_with_4_classes_fails_before_training():
    with pytest.raises(LabelSubsetError) as e:
        label_subset(LABELS_30, "1%", seed=0)
    msg = str(e.value)
    assert "0.3 images" in msg
    assert "4 classes" in msg
    assert "1/class" in msg


def test_per_class_count_above_class_size_names_the_class():
    with pytest.raises(LabelSubsetError, match=r"'owl' \(3 images\)") as e:
        label_subset(LABELS_30, "4/class", seed=0)
    assert "3/class" in str(e.value)


@pytest.mark.parametrize(
    ("spec", "match"), [("3", "fewer images than the 4 classes"), ("31", "only 30")]
)
def test_impossible_counts(spec, match):
    with pytest.raises(LabelSubsetError, match=match):
        label_subset(LABELS_30, spec, seed=0)


def test_per_class_subset_takes_exactly_k_per_class():
    idx = label_subset(LABELS_30, "2/class", seed=3)
    assert Counter(LABELS_30[i] for i in idx) == {"cat": 2, "dog": 2, "fox": 2, "owl": 2}
    # per-class subsets are nested too
    assert set(idx) <= set(label_subset(LABELS_30, "3/class", seed=3))


def test_subset_sizes_and_proportional_counts():
    assert subset_size("50%", LABELS_30) == 15
    assert subset_size("0.5", LABELS_30) == 15
    assert subset_size("100%", LABELS_30) == 30
    assert subset_size("7/class", LABELS_30) is None
    idx = label_subset(LABELS_30, "50%", seed=0)
    counts = Counter(LABELS_30[i] for i in idx)
    # quotas 5, 6, 2.5, 1.5: 5 and 6 exactly, the remaining 4 split 3 + 1 or 2 + 2
    assert counts["cat"] == 5 and counts["dog"] == 6
    assert counts["fox"] + counts["owl"] == 4 and min(counts["fox"], counts["owl"]) >= 1
    assert sorted(label_subset(LABELS_30, "100%", seed=0).tolist()) == list(range(30))


def test_subset_is_deterministic_and_seed_dependent():
    labels = [i % 3 for i in range(300)]
    a = label_subset(labels, "10%", seed=1)
    assert np.array_equal(a, label_subset(labels, "0.1", seed=1))
    assert np.array_equal(a, label_subset(labels, "30", seed=1))
    assert not np.array_equal(a, label_subset(labels, "10%", seed=2))
    assert a.dtype == np.int64 and np.all(np.diff(a) > 0)


def test_priority_order_is_a_permutation_starting_with_one_per_class():
    labels = [0] * 20 + [1] * 5 + [2] * 2
    order = label_priority_order(labels, seed=4)
    assert sorted(order.tolist()) == list(range(len(labels)))
    assert {labels[i] for i in order[:3]} == {0, 1, 2}


def test_describe_subset_counts():
    idx = label_subset(LABELS_30, "2/class", seed=0)
    d = describe_subset(LABELS_30, idx, "2/class", seed=0)
    assert d["n_labels"] == 8 and d["n_train"] == 30 and d["spec"] == "2/class"
    assert d["per_class"] == {"cat": 2, "dog": 2, "fox": 2, "owl": 2}
    assert d["per_class_available"] == {"cat": 10, "dog": 12, "fox": 5, "owl": 3}
    assert d["fraction"] == pytest.approx(8 / 30)


class_sizes = st.lists(st.integers(min_value=1, max_value=25), min_size=1, max_size=6)


@settings(max_examples=100, deadline=None)
@given(
    sizes=class_sizes,
    seed=st.integers(0, 2**31 - 1),
    totals=st.lists(st.integers(0, 200), min_size=2, max_size=5),
)
def test_subsets_are_nested_and_stratified(sizes, seed, totals):
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    rng = np.random.default_rng(seed)
    labels = [labels[i] for i in rng.permutation(len(labels))]  # classes interleaved
    n, k = len(labels), len(sizes)
    counts = sorted({k + t % (n - k + 1) for t in totals})  # valid counts in [k, n]
    previous: set[int] = set()
    previous_per_class = np.zeros(k)
    for c in counts:
        idx = label_subset(labels, str(c), seed=seed)
        chosen = set(idx.tolist())
        assert len(chosen) == c
        assert previous <= chosen  # nested
        per_class = np.bincount([labels[i] for i in idx], minlength=k)
        assert per_class.min() >= 1  # every class
        assert np.all(per_class >= previous_per_class)  # monotone per class
        # stratified: within one image of the proportional share, plus what the one-per-class
        # minimum forces onto classes whose share is below one image
        share = c * np.asarray(sizes) / n
        forced = np.clip(1.0 - share, 0.0, None).sum()
        assert np.all(np.abs(per_class - share) < 1.0 + forced + 1e-9)
        previous, previous_per_class = chosen, per_class


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=5),
    seed=st.integers(0, 10_000),
)
def test_percentage_subsets_are_nested(sizes, seed):
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    previous: set[int] = set()
    for spec in ("1%", "5%", "10%", "25%", "50%", "100%"):
        try:
            idx = label_subset(labels, spec, seed=seed)
        except LabelSubsetError as e:
            assert "fewer than the" in str(e)  # only too-small fractions may fail
            continue
        chosen = set(idx.tolist())
        assert previous <= chosen
        assert len({labels[i] for i in chosen}) == len(sizes)
        previous = chosen
    assert previous == set(range(len(labels)))  # 100% is everything


# --------------------------------------------------------------------------------------------
# Train / val / test
# --------------------------------------------------------------------------------------------


def test_stratified_split_sizes_and_determinism():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    s = stratified_split(labels, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert {k: len(v) for k, v in s.items()} == {"train": 70, "val": 10, "test": 20}
    arr = np.asarray(labels)
    assert Counter(arr[s["test"]]) == {"a": 10, "b": 6, "c": 4}
    assert Counter(arr[s["val"]]) == {"a": 5, "b": 3, "c": 2}
    all_idx = np.concatenate(list(s.values()))
    assert sorted(all_idx.tolist()) == list(range(100))  # a partition
    again = stratified_split(labels, 0.1, 0.2, seed=0)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    other = stratified_split(labels, 0.1, 0.2, seed=1)
    assert not np.array_equal(s["test"], other["test"])


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=3, max_value=30), min_size=2, max_size=5),
    val=st.sampled_from([0.0, 0.1, 0.2]),
    test=st.sampled_from([0.0, 0.1, 0.25]),
    seed=st.integers(0, 10_000),
)
def test_split_every_class_in_every_split(sizes, val, test, seed):
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    s = stratified_split(labels, val, test, seed)
    assert sorted(np.concatenate(list(s.values())).tolist()) == list(range(len(labels)))
    for name, f in (("train", 1), ("val", val), ("test", test)):
        present = {labels[i] for i in s[name]}
        assert present == (set(range(len(sizes))) if f > 0 else set())


def test_split_class_too_small_is_named():
    with pytest.raises(LabelSubsetError, match=r"'rare' \(2 images\).*at least 3"):
        stratified_split(["common"] * 20 + ["rare"] * 2, 0.1, 0.2, seed=0)
    # without a val split two images are enough
    s = stratified_split(["common"] * 20 + ["rare"] * 2, 0.0, 0.2, seed=0)
    assert len(s["val"]) == 0


@pytest.mark.parametrize(("val", "test"), [(0.5, 0.5), (-0.1, 0.2), (0.1, 1.0)])
def test_split_bad_fractions(val, test):
    with pytest.raises(LabelSubsetError, match="data\\.(val|test)_fraction"):
        stratified_split(["a", "b"] * 10, val, test, seed=0)


def test_user_split_column_is_used_as_given():
    labels = ["a", "b", "a", "b", "a", "b"]
    column = ["train", "train", "val", "test", "TEST", "validation"]
    s = stratified_split(labels, 0.1, 0.2, seed=0, split_column=column)
    assert s["train"].tolist() == [0, 1]
    assert s["val"].tolist() == [2, 5]
    assert s["test"].tolist() == [3, 4]


def test_user_split_column_errors():
    with pytest.raises(LabelSubsetError, match=r"row 2: 'dev'"):
        stratified_split(["a", "b"], 0.1, 0.2, 0, split_column=["train", "dev"])
    with pytest.raises(LabelSubsetError, match="class\\(es\\) b in train"):
        stratified_split(["a", "b"], 0.1, 0.2, 0, split_column=["train", "test"])


def test_labelspec_passthrough():
    spec = LabelSpec("count", 4, "4")
    assert parse_labels_spec(spec) is spec
    assert len(label_subset(LABELS_30, spec, seed=0)) == 4
