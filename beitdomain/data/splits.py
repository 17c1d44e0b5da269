"""Labelled splits and label subsets: the fixed train/val/test split and the `--labels` subset.

Two promises make label-efficiency curves compare like with like:

* The train/val/test split is a pure function of (labels, fractions, seed), stratified, with every
  class in every non-empty split, so all fine-tunes of a curve are scored on the same test images.
* Label subsets of the train split are **nested** for a given seed: the 1% subset lies inside the
  5% subset, which lies inside the 10% subset, and so on up to 100%. Each class gets one seeded
  permutation of its members, fixed by the seed alone; a subset takes a prefix of every class's
  permutation. How long each prefix is comes from a priority order over all train items (see
  `label_priority_order`): a subset of `n` labels is the first `n` items of that order, so a
  larger subset always contains a smaller one.

Why not plain largest-remainder (Hamilton) rounding of per-class quotas: it is not monotone in
the total (the "Alabama paradox": asking for one more label can take one away from a class), which
would break nesting. The order applies largest remainder one label at a time instead: after one
image of every class, the next label goes to the class furthest below its proportional share at
the new size (`n * n_c / N - a_c`, ties broken by a seeded class order). Every subset is then a
prefix of the next, and per-class counts stay within one image of the proportional share except
for what the one-per-class minimum forces (checked by property tests).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from beitdomain.labels import LabelSpec, LabelSubsetError, parse_labels_spec

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def class_members(labels: Sequence[Hashable]) -> dict[Hashable, np.ndarray]:
    """Indices of each class, classes in sorted order (so the result does not depend on the
    order in which classes first appear)."""
    members: dict[Hashable, list[int]] = {}
    for i, y in enumerate(labels):
        members.setdefault(y, []).append(i)
    try:
        order = sorted(members)
    except TypeError:  # mixed label types: fall back to a stable string order
        order = sorted(members, key=repr)
    return {c: np.asarray(members[c], dtype=np.int64) for c in order}


def _class_permutations(labels: Sequence[Hashable], seed: int) -> dict[Hashable, np.ndarray]:
    """One seeded permutation of each class's members; it depends on the seed and the class
    list only, never on how many labels are later requested (the root of nesting)."""
    rng = np.random.default_rng(seed)
    return {c: rng.permutation(idx) for c, idx in class_members(labels).items()}


def _fmt_counts(counts: dict[Hashable, int]) -> str:
    return ", ".join(f"'{c!s}' ({n} image{'s' if n != 1 else ''})" for c, n in counts.items())


# --------------------------------------------------------------------------------------------
# Train / val / test
# --------------------------------------------------------------------------------------------


def _apportion(
    quotas: np.ndarray, total: int, lo: np.ndarray, hi: np.ndarray, tiebreak: np.ndarray
) -> np.ndarray:
    """Integer counts near `quotas` that sum to `total` with lo <= count <= hi (largest remainder).

    Used once per split (not for nested subsets, where monotonicity matters).
    """
    counts = np.clip(np.floor(quotas), lo, hi).astype(np.int64)
    total = int(min(max(total, lo.sum()), hi.sum()))
    while counts.sum() < total:  # give a seat to the class furthest below its quota
        room = counts < hi
        score = np.where(room, quotas - counts, -np.inf)
        best = np.flatnonzero(score == score.max())
        counts[best[np.argmax(tiebreak[best])]] += 1
    while counts.sum() > total:  # take a seat from the class furthest above its quota
        room = counts > lo
        score = np.where(room, counts - quotas, -np.inf)
        best = np.flatnonzero(score == score.max())
        counts[best[np.argmax(tiebreak[best])]] -= 1
    return counts


def _split_from_column(
    labels: Sequence[Hashable], split_column: Sequence[str | None]
) -> dict[str, np.ndarray]:
    if len(split_column) != len(labels):
        raise LabelSubsetError(
            f"split column has {len(split_column)} values for {len(labels)} labelled images"
        )
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, raw in enumerate(split_column):
        name = _SPLIT_ALIASES.get(str(raw).strip().lower()) if raw is not None else None
        if name is None:
            raise LabelSubsetError(
                f"split column, row {i + 1}: {raw!r} is not a split; use train, val or test "
                "(or leave the column out for a seeded stratified split)"
            )
        out[name].append(i)
    in_train = {labels[i] for i in out["train"]}
    missing = [str(c) for c in class_members(labels) if c not in in_train]
    if missing:
        raise LabelSubsetError(
            f"the split column puts no image of class(es) {', '.join(missing)} in train; "
            "every class needs at least one training image"
        )
    return {s: np.asarray(v, dtype=np.int64) for s, v in out.items()}


def stratified_split(
    labels: Sequence[Hashable],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    split_column: Sequence[str | None] | None = None,
) -> dict[str, np.ndarray]:
    """A fixed, seeded, stratified train/val/test split of labelled images.

    Every class is present in train, and in val and test whenever their fraction is non-zero
    (so every class is scored). Split sizes are `round(fraction * n)` images, raised to one per
    class when that is smaller; per-class sizes follow each class's share (largest remainder).

    sklearn's two-step `train_test_split(stratify=...)` is not used because it fails on classes
    with two or three images in the second step and does not promise every class in train.

    Args:
        labels: one label per labelled image.
        val_fraction: share of images for validation (best-checkpoint selection), in [0, 1).
        test_fraction: share of images for the test set, in [0, 1).
        seed: the split seed (`data.split_seed`); the same seed gives the same split.
        split_column: the user's own split ('train'/'val'/'test' per image); used as given.

    Returns:
        {'train': idx, 'val': idx, 'test': idx}, sorted int64 indices into `labels`.

    Raises:
        LabelSubsetError: bad fractions, a class with too few images, or a bad split column.
    """
    if split_column is not None:
        return _split_from_column(labels, split_column)
    for name, f in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise LabelSubsetError(f"{name} = {f} must be in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise LabelSubsetError(
            f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction:g} leaves "
            "no images for training; their sum must be below 1"
        )
    if len(labels) == 0:
        raise LabelSubsetError("no labelled images to split")
    perms = _class_permutations(labels, seed)
    classes = list(perms)
    sizes = np.array([len(perms[c]) for c in classes], dtype=np.int64)
    held_out = [(s, f) for s, f in (("test", test_fraction), ("val", val_fraction)) if f > 0]
    need = 1 + len(held_out)
    small = {c: int(n) for c, n in zip(classes, sizes) if n < need}
    if small:
        wanted = ", ".join(["train", *[s for s, _ in held_out]])
        raise LabelSubsetError(
            f"class(es) with too few images for a stratified split ({_fmt_counts(small)}): each "
            f"class needs at least {need} images (one each for {wanted}). Add labelled images, "
            "merge or drop the class, set data.val_fraction/test_fraction to 0, or give a "
            "split column in the labels CSV"
        )
    rng = np.random.default_rng([seed, 1])
    tiebreak = rng.random(len(classes))
    n = int(sizes.sum())
    remaining = sizes.copy()
    out: dict[str, np.ndarray] = {}
    taken = np.zeros(len(classes), dtype=np.int64)
    for i, (name, f) in enumerate(held_out):
        later = len(held_out) - i - 1  # held-out splits still to fill after this one
        lo = np.ones(len(classes), dtype=np.int64)
        hi = remaining - 1 - later  # keep one image per class for train and later splits
        counts = _apportion(f * sizes, round(f * n), lo, hi, tiebreak)
        out[name] = np.concatenate(
            [perms[c][taken[j] : taken[j] + counts[j]] for j, c in enumerate(classes)]
        )
        taken += counts
        remaining -= counts
    out["train"] = np.concatenate([perms[c][taken[j] :] for j, c in enumerate(classes)])
    return {s: np.sort(out.get(s, np.empty(0, dtype=np.int64))) for s in SPLITS}


# --------------------------------------------------------------------------------------------
# Nested label subsets
# --------------------------------------------------------------------------------------------


def differs_from_asked(asked: float | None, got: float) -> bool:
    """Whether a realised label fraction differs from the asked one by more than rounding
    (a tenth of it, at least 0.1 points): the one rule for every label-budget warning (a
    job's own, the curve's). 18 of 1,771 images for 1% is 1.02%, the same; 4 of 24 for 15% is
    16.7%, and 8 of 28 for 10% is 28.6%: not."""
    return asked is not None and abs(got - asked) > max(0.1 * asked, 0.001)


def label_priority_order(
    train_labels: Sequence[Hashable], seed: int, limit: int | None = None
) -> np.ndarray:
    """Train indices in the order labels are added as the budget grows (nested subsets).

    The first `n` entries are the `n`-label subset. The first K entries hold one image of each of
    the K classes; each later entry comes from the class with the largest deficit
    `n * n_c / N - a_c` (its exact share at the new size minus the `a_c` images it already has):
    largest remainder, one label at a time. Within a class, images follow its seeded permutation.

    Args:
        train_labels: labels of the train split.
        seed: fixes each class's permutation and the class order that breaks ties.
        limit: stop after this many entries (the order is sequential; a prefix is all a subset
            needs).

    Returns:
        int64 indices into `train_labels`: a permutation of all of them, or its first `limit`.
    """
    perms = list(_class_permutations(train_labels, seed).values())
    n_total = len(train_labels)
    limit = n_total if limit is None else min(limit, n_total)
    rank = np.random.default_rng([seed, 2]).permutation(len(perms)).tolist()  # tie-break order
    order = [int(perms[j][0]) for j in np.argsort(rank)]  # one image of each class first
    # Plain Python ints: K (classes) is small and the loop runs once per label, where numpy's
    # per-call overhead would dominate (100k labels, 10 classes: ~1 s instead of ~6 s).
    size = [len(p) for p in perms]
    taken = [1] * len(perms)  # images of each class in the order so far
    open_classes = [j for j in range(len(perms)) if taken[j] < size[j]]
    for n in range(len(perms) + 1, limit + 1):
        # deficit * N in integers, so ties are exact: n * n_c - a_c * N; ties -> lower rank
        j = max(open_classes, key=lambda c: (n * size[c] - taken[c] * n_total, -rank[c]))
        order.append(int(perms[j][taken[j]]))
        taken[j] += 1
        if taken[j] == size[j]:
            open_classes.remove(j)
    return np.asarray(order[:limit], dtype=np.int64)


def subset_size(spec: str | LabelSpec, train_labels: Sequence[Hashable]) -> int | None:
    """How many labels `spec` asks for on this train split (None for per-class counts).

    Raises:
        LabelSubsetError: when the request is impossible (fewer labels than classes, more than
            there are); the message says what it would give and what to ask for instead.
    """
    spec = parse_labels_spec(spec)
    counts = Counter(train_labels)
    n, k = len(train_labels), len(counts)
    if spec.kind == "per_class":
        return None
    if spec.kind == "count":
        want = int(spec.value)
        if want > n:
            raise LabelSubsetError(
                f"labels {spec.text} asks for {want} images but the train split has only {n}; "
                f"use at most {n} or '100%'"
            )
        if want < k:
            raise LabelSubsetError(
                f"labels {spec.text} is fewer images than the {k} classes; every class needs "
                f"at least one example. Use at least {k}, or '1/class'"
            )
        return want
    raw = float(spec.value) * n
    if raw < k:
        smallest = math.ceil(k / n * 1000) / 10  # smallest workable percentage, rounded up
        raise LabelSubsetError(
            f"labels {spec.text} of {n} training images would give {raw:g} images, fewer than "
            f"the {k} classes (every class needs at least one example). Use '1/class', a count "
            f"of at least {k}, or a fraction of at least {smallest:g}%"
        )
    # Round half up, never below one per class or above everything.
    return min(n, max(k, math.floor(raw + 0.5)))


def label_subset(train_labels: Sequence[Hashable], spec: str | LabelSpec, seed: int) -> np.ndarray:
    """The labelled subset of the train split that a fine-tune may use.

    Stratified, at least one image per class, and nested for a fixed seed: for specs asking for
    `a <= b` labels, subset(a) is inside subset(b); per-class counts are nested the same way.

    Args:
        train_labels: labels of the train split.
        spec: a `--labels` value ('1%', '0.01', '200', '5/class') or a parsed `LabelSpec`.
        seed: the subset seed (the run's seed); it fixes which images each class contributes.

    Returns:
        sorted int64 indices into `train_labels`.

    Raises:
        LabelSubsetError: impossible requests, before any training starts.
    """
    spec = parse_labels_spec(spec)
    if len(train_labels) == 0:
        raise LabelSubsetError("the train split is empty; there are no labels to subset")
    if spec.kind == "per_class":
        per = int(spec.value)
        perms = _class_permutations(train_labels, seed)
        short = {c: len(p) for c, p in perms.items() if len(p) < per}
        if short:
            raise LabelSubsetError(
                f"labels {spec.text} asks for {per} images per class, but the train split has "
                f"fewer for class(es) {_fmt_counts(short)}; use at most "
                f"'{min(len(p) for p in perms.values())}/class', or a fraction or a count"
            )
        return np.sort(np.concatenate([p[:per] for p in perms.values()]))
    size = subset_size(spec, train_labels)
    assert size is not None
    if size == len(train_labels):
        return np.arange(size, dtype=np.int64)  # everything; no need to walk the order
    return np.sort(label_priority_order(train_labels, seed, limit=size))


def describe_subset(
    train_labels: Sequence[Hashable],
    indices: Sequence[int] | np.ndarray,
    spec: str | LabelSpec | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Per-class counts of a label subset, for the run folder (`labels.json`).

    Returns:
        {'spec', 'seed', 'n_labels', 'n_train', 'fraction', 'per_class': {class: n},
         'per_class_available': {class: n}}; class keys are strings (JSON keys).
    """
    idx = np.asarray(indices, dtype=np.int64)
    available = {str(c): len(m) for c, m in class_members(train_labels).items()}
    chosen = Counter(str(train_labels[i]) for i in idx)
    return {
        "spec": None if spec is None else parse_labels_spec(spec).text,
        "seed": seed,
        "n_labels": len(idx),
        "n_train": len(train_labels),
        "fraction": len(idx) / len(train_labels) if len(train_labels) else 0.0,
        "per_class": {c: chosen.get(c, 0) for c in available},
        "per_class_available": available,
    }


# --------------------------------------------------------------------------------------------
# Groups: patients, wafers, parts, slides
# --------------------------------------------------------------------------------------------
#
# Images of one group must never sit on both sides of a split, and a label subset takes whole
# groups. Groups are identified by membership only (ids by first appearance), never by their
# names, so a re-scan that names them differently (DICOM patients are numbered per scan) gives
# the same split. With every group a single image, these functions return exactly what the
# image-level ones above return.


def canonical_groups(groups: Sequence[Hashable | None]) -> np.ndarray:
    """Integer group id per item, numbered by first appearance; None is a group of its own."""
    ids: dict[Hashable, int] = {}
    out = np.empty(len(groups), dtype=np.int64)
    for i, g in enumerate(groups):
        key = ("\0own", i) if g is None or g == "" else ("g", g)
        out[i] = ids.setdefault(key, len(ids))
    return out


def _group_labels(labels: Sequence[Hashable], gid: np.ndarray) -> list[Hashable]:
    """Each group's most common label (ties: the smallest), in group-id order."""
    counts: list[Counter] = [Counter() for _ in range(int(gid.max()) + 1 if len(gid) else 0)]
    for y, g in zip(labels, gid):
        counts[g][y] += 1
    out = []
    for c in counts:
        top = max(c.values())
        out.append(sorted((y for y, n in c.items() if n == top), key=repr)[0])
    return out


def _group_members(gid: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(gid, kind="stable")
    bounds = np.flatnonzero(np.diff(gid[order])) + 1
    return [np.sort(m) for m in np.split(order, bounds)] if len(gid) else []


def group_split(
    labels: Sequence[Hashable],
    groups: Sequence[Hashable | None],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    split_column: Sequence[str | None] | None = None,
) -> dict[str, np.ndarray]:
    """A seeded train/val/test split that keeps every group on one side (stratified by label).

    Held-out splits come from scikit-learn's `StratifiedGroupKFold` (shuffled with the seed):
    test is one of `round(1 / test_fraction)` folds, val one of `round((1 - test) / val)`
    folds of the rest, so fractions are met as closely as whole groups and 1/k folds allow.
    Among the folds, the first that leaves every class in train and puts every class in the
    held-out split is used; with groups all of one image this is `stratified_split`.

    Args:
        labels: one label per image (file).
        groups: one group per image (patient, wafer, slide); None: the image is its own group.
        val_fraction, test_fraction, seed: as for `stratified_split`.
        split_column: the user's own split; checked to keep each group on one side.

    Returns:
        {'train', 'val', 'test'}: sorted int64 indices into `labels`.

    Raises:
        LabelSubsetError: a group split across the user's splits, fewer groups than folds, or
            no fold that keeps every class on both sides (names the classes).
    """
    if len(groups) != len(labels):
        raise LabelSubsetError(f"{len(groups)} groups for {len(labels)} labelled images")
    gid = canonical_groups(groups)
    if len(np.unique(gid)) == len(gid):
        return stratified_split(labels, val_fraction, test_fraction, seed, split_column)
    if split_column is not None:
        out = _split_from_column(labels, split_column)
        side = np.empty(len(labels), dtype=object)
        for name, idx in out.items():
            side[idx] = name
        for g, members in enumerate(_group_members(gid)):
            sides = sorted(set(side[members]))
            if len(sides) > 1:
                example = next(x for x in groups if x is not None and gid[groups.index(x)] == g)
                raise LabelSubsetError(
                    f"the split column puts images of group {example!r} in {' and '.join(sides)}; "
                    "every image of a group (patient, wafer, slide) must be in one split"
                )
        return out
    # Checks and messages shared with the image-level split (fractions, tiny classes).
    stratified_split(labels, val_fraction, test_fraction, seed)
    y = np.asarray([str(v) for v in labels])
    idx = np.arange(len(labels))
    out = {}
    rest = idx
    for name, f in (("test", test_fraction), ("val", val_fraction / (1 - test_fraction))):
        if f <= 0:
            out[name] = np.empty(0, dtype=np.int64)
            continue
        held = _one_fold(y[rest], gid[rest], f, seed, name)
        out[name] = rest[held]
        rest = np.setdiff1d(rest, out[name])
    out["train"] = rest
    return {s: np.sort(out[s]).astype(np.int64) for s in SPLITS}


def _one_fold(y: np.ndarray, gid: np.ndarray, fraction: float, seed: int, name: str) -> np.ndarray:
    """Positions of one stratified group fold of about `fraction`, every class on both sides."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(gid))
    k = max(2, round(1 / fraction))
    if n_groups < k:
        raise LabelSubsetError(
            f"{n_groups} groups cannot give a {name} split of {fraction:.0%} by whole groups "
            f"(that needs at least {k} groups); add data, lower data.{name}_fraction, or give "
            "a split column in the labels CSV"
        )
    classes = set(y)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "least populated class has only n members"
            folds = [held for _, held in splitter.split(np.zeros(len(y)), y, gid)]
    except ValueError as e:  # every class smaller than the number of folds
        raise LabelSubsetError(
            f"too few images per class for a {name} split of {fraction:.0%} by whole groups "
            f"({k} folds; scikit-learn: {e}); add data, lower data.{name}_fraction, or give a "
            "split column in the labels CSV"
        ) from None
    for held in folds:
        keep = np.setdiff1d(np.arange(len(y)), held)
        if set(y[held]) == classes and set(y[keep]) == classes:
            return held
    per_class = {c: len(np.unique(gid[y == c])) for c in sorted(classes)}
    few = ", ".join(f"{c} ({n} group{'s' if n != 1 else ''})" for c, n in per_class.items())
    raise LabelSubsetError(
        f"no split by whole groups puts every class in both train and {name}: groups per class "
        f"are {few}. Every class needs images from at least two groups; add data, merge "
        f"classes, set data.{name}_fraction to 0, or give a split column in the labels CSV"
    )


def group_label_subset(
    train_labels: Sequence[Hashable],
    train_groups: Sequence[Hashable | None],
    spec: str | LabelSpec,
    seed: int,
) -> np.ndarray:
    """`label_subset` over whole groups: nested for a fixed seed, an image of every class.

    Groups are ordered by `label_priority_order` over their (majority) labels; a subset of `n`
    labels is the shortest prefix of that order holding at least `n` images and an image of
    every class, so a larger request always contains a smaller one. Groups larger than the
    budget make the subset larger than asked (`differs_from_asked` says when the caller should
    warn). '5/class' takes each class's groups in their seeded order until the class has at
    least 5 images.

    Returns:
        sorted int64 indices into `train_labels`.

    Raises:
        LabelSubsetError: an empty train split, a per-class count a class cannot meet, or an
            amount below 100% for which only all groups hold every class (names the class).
    """
    spec = parse_labels_spec(spec)
    gid = canonical_groups(train_groups)
    if len(np.unique(gid)) == len(gid):
        return label_subset(train_labels, spec, seed)
    if len(train_labels) == 0:
        raise LabelSubsetError("the train split is empty; there are no labels to subset")
    members = _group_members(gid)
    glabels = _group_labels(train_labels, gid)
    sizes = np.array([len(m) for m in members])
    if spec.kind == "per_class":
        per = int(spec.value)
        chosen: list[int] = []
        for c, order in _class_permutations(glabels, seed).items():
            have = np.cumsum(sizes[order])
            if have[-1] < per:
                raise LabelSubsetError(
                    f"labels {spec.text} asks for {per} images per class, but class '{c}' "
                    f"has {int(have[-1])} in the train split; ask for fewer per class"
                )
            chosen += order[: int(np.searchsorted(have, per)) + 1].tolist()
    else:
        size = subset_size(spec, train_labels)
        assert size is not None
        order = label_priority_order(glabels, seed)
        have = np.cumsum(sizes[order])
        n_groups = int(np.searchsorted(have, size)) + 1
        every, last = _prefix_holding_every_class(train_labels, members, order)
        if n_groups < every:  # a group larger than the budget: add groups until every class
            if every == len(order) and size < len(train_labels):
                raise LabelSubsetError(
                    f"labels {spec.text} ({size} of {len(train_labels)} train images) cannot "
                    f"hold an image of class '{last}' by whole groups: only all "
                    f"{len(order)} groups together hold every class; train on 100% of the "
                    "labels, or make the groups smaller"
                )
            n_groups = every
        chosen = order[:n_groups].tolist()
    subset = np.sort(np.concatenate([members[g] for g in chosen])).astype(np.int64)
    missing = sorted({str(y) for y in train_labels} - {str(train_labels[i]) for i in subset})
    if missing:  # per-class counts take each class's own groups: a class no group's majority
        raise LabelSubsetError(
            f"labels {spec.text} by whole groups holds no image of class '{missing[0]}' (it is "
            f"the most common label of no group): give a fraction such as 100% instead"
        )
    return subset


def _prefix_holding_every_class(
    labels: Sequence[Hashable], members: list[np.ndarray], order: np.ndarray
) -> tuple[int, Hashable]:
    """How many groups of `order` it takes to hold an image of every class, and the class the
    last of them adds."""
    left = {str(y) for y in labels}
    for k, g in enumerate(order):
        new = {str(labels[i]) for i in members[g]} & left
        left -= new
        if not left:
            return k + 1, sorted(new)[0]
    raise AssertionError("the groups hold every label")  # all groups hold all labels


def split_summary(
    split: dict[str, np.ndarray],
    groups: Sequence[Hashable | None],
    items_per_file: Sequence[int] | None = None,
) -> dict[str, dict[str, int]]:
    """Images (files), items (frames/slices) and groups in each split, for reports."""
    gid = canonical_groups(groups)
    out = {}
    for name in SPLITS:
        idx = np.asarray(split.get(name, []), dtype=np.int64)
        row = {"images": len(idx), "groups": len(np.unique(gid[idx])) if len(idx) else 0}
        if items_per_file is not None:
            row["items"] = int(np.asarray(items_per_file)[idx].sum()) if len(idx) else 0
        out[name] = row
    return out
