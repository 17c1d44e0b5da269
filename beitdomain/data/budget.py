"""Labels within the budget: what model selection may look at when a run has `n` labels.

A fine-tune at 1% of the labels has 18 labelled images on the demo's data. Picking its learning
rate or checkpoint on a 197-image validation split would use eleven times more labels for
selection than for training, which the user of the curve does not have. Everything here works
inside one label subset and returns indices drawn from it only:

* `carve`: hold out a stratified share of the subset for validation and train on the rest;
* `kfold`: stratified folds inside the subset (each label is validated on once);
* `none`: no selection at all, a fixed schedule whose final weights are the result;
* `outside`: the split's own validation images (more labels than the budget; only on request).

`selection_splits` is the one entry point; the tests assert that every index it returns lies in
the subset it was given.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from beitdomain.data.splits import class_members
from beitdomain.user import UserError

SELECTION_MODES = ("carve", "kfold", "none", "outside")
FINETUNE_SELECTIONS = ("none", "carve", "outside")  # kfold is for the baselines' C only
CARVE_FRACTION = 0.2  # of each class's labels, for `carve`: 18 labels -> 3 or 4 validate
SELECTION_HELP = (
    "carve (validation carved out of the label subset), kfold (folds inside the subset), "
    "none (fixed schedule, no selection) or outside (the split's validation images, which "
    "are labels beyond the budget)"
)


@dataclass(frozen=True)
class SelectionSplit:
    """One way to train and score inside a label subset.

    Attributes:
        fit: the indices training sees (a subset of the labels given).
        val: the indices selection scores on, or None when nothing is selected.
    """

    fit: np.ndarray
    val: np.ndarray | None


def _shuffled_by_class(labels: Sequence[Hashable], rng: np.random.Generator) -> list[np.ndarray]:
    """Positions of each class (classes in sorted order of their names), each in an order
    drawn from `rng`."""
    by_name = class_members([str(y) for y in labels])
    return [rng.permutation(members) for members in by_name.values()]


def carve_validation(
    subset: Sequence[int] | np.ndarray,
    labels: Sequence[Hashable],
    fraction: float = 0.2,
    seed: int = 0,
) -> SelectionSplit:
    """A stratified validation share carved out of a label subset.

    Each class with at least two labels gives `round(fraction * n_c)` of them (at least one and
    never its last); a class with a single label keeps it for training. So at 18 labels with a
    third defective, validation gets 1 defective and 3 functional images and training 14.

    Args:
        subset: the subset's indices (any index space: source items, files).
        labels: one label per entry of `subset`.
        fraction: the share of each class to hold out, in (0, 1).
        seed: fixes which labels are held out.

    Raises:
        UserError: a fraction outside (0, 1), or a subset where no class has two labels.
    """
    subset = np.asarray(subset, dtype=np.int64)
    if len(subset) != len(labels):
        raise ValueError(f"{len(subset)} indices but {len(labels)} labels")
    if not 0 < fraction < 1:
        raise UserError(f"the validation share carved from the labels is {fraction}; use (0, 1)")
    rng = np.random.default_rng([seed, 11])
    val: list[np.ndarray] = []
    for members in _shuffled_by_class(labels, rng):
        if len(members) >= 2:
            k = min(len(members) - 1, max(1, round(fraction * len(members))))
            val.append(members[:k])
    if not val:
        raise UserError(
            f"cannot carve validation out of {len(subset)} labels: no class has two labels. "
            "Use selection 'none' (a fixed schedule) or more labels"
        )
    picked = np.sort(np.concatenate(val))
    fit = np.setdiff1d(np.arange(len(subset)), picked)
    return SelectionSplit(fit=subset[fit], val=subset[picked])


def kfold_splits(
    subset: Sequence[int] | np.ndarray,
    labels: Sequence[Hashable],
    folds: int = 5,
    seed: int = 0,
) -> list[SelectionSplit]:
    """Stratified folds inside a label subset: every label is validated on exactly once.

    The number of folds is lowered to the size of the smallest class with two or more labels
    (each fold then holds one of its labels); classes with a single label always train.

    Raises:
        UserError: fewer than two folds are possible (no class has two labels).
    """
    subset = np.asarray(subset, dtype=np.int64)
    if len(subset) != len(labels):
        raise ValueError(f"{len(subset)} indices but {len(labels)} labels")
    rng = np.random.default_rng([seed, 12])
    members = _shuffled_by_class(labels, rng)
    splittable = [m for m in members if len(m) >= 2]
    k = min([folds, *(len(m) for m in splittable)]) if splittable else 0
    if k < 2:
        raise UserError(
            f"cannot cross-validate inside {len(subset)} labels: no class has two labels. "
            "Use selection 'none' (a fixed schedule) or more labels"
        )
    assign = np.full(len(subset), -1, dtype=np.int64)  # -1: always trains
    offset = 0
    for m in splittable:  # deal each class round-robin, continuing where the last one stopped
        assign[m] = (offset + np.arange(len(m))) % k
        offset = (offset + len(m)) % k
    out = []
    for f in range(k):
        val = np.flatnonzero(assign == f)
        fit = np.flatnonzero(assign != f)
        out.append(SelectionSplit(fit=subset[fit], val=subset[val]))
    return out


def selection_splits(
    mode: str,
    subset: Sequence[int] | np.ndarray,
    labels: Sequence[Hashable],
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    folds: int = 5,
    outside_val: Sequence[int] | np.ndarray | None = None,
) -> list[SelectionSplit]:
    """What selection may use at this budget, as (fit, val) pairs.

    Args:
        mode: one of `SELECTION_MODES`.
        subset: the label subset (indices in any space).
        labels: one label per entry of `subset`.
        seed: fixes the carve or the folds.
        val_fraction: the share carved out in mode `carve`.
        folds: the number of folds in mode `kfold`.
        outside_val: the split's validation indices, for mode `outside` only.

    Returns:
        One pair for `carve`, `none` (val None) and `outside`, `folds` pairs for `kfold`.

    Raises:
        UserError: an unknown mode, `outside` without a validation split, a subset too small.
    """
    subset = np.asarray(subset, dtype=np.int64)
    if mode == "carve":
        return [carve_validation(subset, labels, val_fraction, seed)]
    if mode == "kfold":
        return kfold_splits(subset, labels, folds, seed)
    if mode == "none":
        return [SelectionSplit(fit=subset, val=None)]
    if mode == "outside":
        if outside_val is None or len(outside_val) == 0:
            raise UserError(
                "selection 'outside' scores on the split's validation images, and there are "
                "none: set data.val_fraction > 0 or give val rows in the labels CSV"
            )
        return [SelectionSplit(fit=subset, val=np.asarray(outside_val, dtype=np.int64))]
    raise UserError(f"selection {mode!r} is not one of: {SELECTION_HELP}")
