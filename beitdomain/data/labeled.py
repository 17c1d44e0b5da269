"""Recipe -> labelled datasets: the train/val/test split, the label subset and its selection.

Labelled work splits by *file*, so the frames of one multi-frame DICOM never land on both sides
of a split. Where the images come from: `data_source`; the unlabelled datasets of the tokenizer
and pre-training: `data_unlabeled`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from beitdomain.config import Recipe
from beitdomain.data.budget import CARVE_FRACTION, FINETUNE_SELECTIONS, carve_validation
from beitdomain.data.dataset import ImageDataset
from beitdomain.data.source import image_source
from beitdomain.data.splits import (
    _SPLIT_ALIASES,
    LabelSubsetError,
    describe_subset,
    differs_from_asked,
    group_label_subset,
    group_split,
    split_summary,
)
from beitdomain.data.transforms import FinetuneTransform, training_transform
from beitdomain.labels import LabelSpec, parse_labels_spec
from beitdomain.user import UserError

log = logging.getLogger(__name__)


@dataclass
class LabeledData:
    """Everything a fine-tune needs to know about its labels."""

    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset | None
    classes: list[str]
    fingerprint: str
    train_items: np.ndarray  # source indices used for training (the label subset)
    subset: dict[str, Any]  # per-class counts of the subset (labels.json)
    files: dict[str, list[str]] = field(default_factory=dict)  # split -> files used
    class_counts: list[int] = field(default_factory=list)  # training items per class


_PATIENT = re.compile(r"patient-\d+")  # groups numbered by the scan from DICOM PatientIDs


def _split_files(
    d: Any,
    flabels: list[str],
    fgroups: list[str | None],
    split_column: list[str | None] | None,
    warn: bool = True,
) -> tuple[dict[str, np.ndarray], list[str | None]]:
    """The train/val/test split of labelled files (and the groups it kept together): the one
    rule fine-tuning and pre-training's test exclusion share."""
    try:
        split = group_split(
            flabels, fgroups, d.val_fraction, d.test_fraction, d.split_seed, split_column
        )
    except LabelSubsetError as e:
        # Patients found by the scan (not groups the user gave) too few to split by: say so
        # loudly and split by file, as without patient grouping.
        if not all(g is None or _PATIENT.fullmatch(g) for g in fgroups):
            raise
        if warn:
            log.warning("splitting by file, not by patient: %s", e)
        fgroups = [None] * len(flabels)
        split = group_split(
            flabels, fgroups, d.val_fraction, d.test_fraction, d.split_seed, split_column
        )
    return split, fgroups


def items_in_test_split(source: Any, recipe: Recipe) -> np.ndarray:
    """Sorted item indices of `source` whose file is in the test split that `labeled_data`
    scores on (a split column's test rows, or the recipe's seeded, grouped split of the
    labelled files). Unlabelled images are never test images."""
    d = recipe.data
    n = len(source)
    file_of = [source.source(i)[0] for i in range(n)]
    label: dict[str, Any] = {}
    given: dict[str, str | None] = {}
    group: dict[str, str | None] = {}
    for i, f in enumerate(file_of):
        label.setdefault(f, source.label(i))
        given.setdefault(f, _item_split(source, i))
        group.setdefault(f, _item_group(source, i))
    files = sorted(f for f in label if label[f] is not None)
    if not files:
        return np.empty(0, dtype=np.int64)
    if any(given[f] is not None for f in files):
        test = {f for f in files if _SPLIT_ALIASES.get(str(given[f]).strip().lower()) == "test"}
    elif d.test_fraction > 0 and len({str(label[f]) for f in files}) > 1:
        flabels = [str(label[f]) for f in files]
        split, _ = _split_files(d, flabels, [group[f] for f in files], None, warn=False)
        test = {files[i] for i in split["test"]}
    else:
        test = set()
    return np.array([i for i, f in enumerate(file_of) if f in test], dtype=np.int64)


MIN_SPLIT_GROUPS = 3  # fewer groups in a split: its score is one or two patients' score


def _say_what_the_budget_got(spec: LabelSpec, subset: dict[str, Any]) -> None:
    """Warns when whole groups made the label subset larger than asked (a label-efficiency
    number must never overstate what a fraction bought), and when a split holds so few groups
    that its score stands for one or two of them."""
    splits = subset["splits"]
    asked, got = spec.fraction, subset["fraction"]
    if differs_from_asked(asked, got):  # the curve's rule too (`differs_from_asked`)
        groups = splits["subset"]["groups"]
        if groups < subset["n_labels"]:
            why = "whole groups are kept together"
        elif subset["n_labels"] == len(subset.get("per_class") or ()):
            why = "every class keeps at least one image"
        else:
            why = "a subset is whole images"
        log.warning(
            "labels: asked %s, got %.1f%% (%d of %d images, %d group%s): %s, so the subset is "
            "%s than asked",
            spec.text,
            100 * got,
            subset["n_labels"],
            subset["n_train"],
            groups,
            "" if groups == 1 else "s",
            why,
            "larger" if got > asked else "smaller",
        )
    for name in ("train", "val", "test"):
        row = splits.get(name) or {}
        if 0 < row.get("groups", 0) < MIN_SPLIT_GROUPS and row.get("groups") != row.get("images"):
            log.warning(
                "the %s split holds %d images from only %d group%s: its scores stand for "
                "that many patients (or wafers, slides), not for the images",
                name,
                row["images"],
                row["groups"],
                "" if row["groups"] == 1 else "s",
            )


def _item_group(source: Any, i: int) -> str | None:
    return source.group(i) if hasattr(source, "group") else None


def _item_split(source: Any, i: int) -> str | None:
    if hasattr(source, "split"):
        return source.split(i)
    k, _ = source.items[i]
    return source.manifest.entries[k].split


def labeled_data(
    recipe: Recipe,
    labels: str | None = None,
    seed: int | None = None,
    progress: bool = True,
    report_dir: Path | None = None,
    selection: str | None = None,
) -> LabeledData:
    """Train (label subset), val and test datasets from the recipe's labelled images.

    Which labels validation holds follows `finetune.selection` (`beitdomain.data.budget`):
    `none` no validation (a fixed schedule, the final weights), `carve` a share of the label
    subset (training gets the rest), `outside` the split's own validation images (labels beyond
    the budget; only on request).

    Args:
        recipe: data and fine-tuning settings.
        labels: `--labels` spec; default `finetune.labels`.
        seed: subset seed; default the recipe's seed. Subsets are nested for a fixed seed.
        selection: overrides `finetune.selection`.
        progress: show the scan's progress bar.
        report_dir: where the quarantine report goes (the run folder).

    Raises:
        UserError / LabelSubsetError: unlabelled data, impossible label requests.
    """
    d = recipe.data
    spec = labels or recipe.finetune.labels
    seed = recipe.seed if seed is None else seed
    source, fingerprint = image_source(recipe, progress, report_dir)
    n = len(source)
    item_labels = [source.label(i) for i in range(n)]
    if any(lab is None for lab in item_labels):
        unlabeled = sum(lab is None for lab in item_labels)
        raise UserError(
            f"{unlabeled} of {n} images have no label. Fine-tuning needs labels: put images in "
            f"one subfolder per class (ImageFolder layout) or give data.labels, a CSV with "
            f"columns path,label[,split]"
        )
    classes = sorted({str(lab) for lab in item_labels})
    if len(classes) < 2:
        raise UserError(f"fine-tuning needs at least 2 classes, found {classes}")
    # Split by file: items (frames) of one file share its split.
    file_of = [source.source(i)[0] for i in range(n)]
    files = sorted(set(file_of))
    file_label: dict[str, str] = {}
    file_split: dict[str, str | None] = {}
    file_group: dict[str, str | None] = {}
    for i, f in enumerate(file_of):
        file_label.setdefault(f, str(item_labels[i]))
        file_split.setdefault(f, _item_split(source, i))
        file_group.setdefault(f, _item_group(source, i))
    splits_given = [file_split[f] for f in files]
    split_column = splits_given if any(s is not None for s in splits_given) else None
    if split_column is not None and any(s is None for s in split_column):
        missing = [f for f in files if file_split[f] is None][:5]
        raise UserError(
            f"the labels give a split for some images but not for {missing}...; give a split "
            f"for every image or for none"
        )
    flabels = [file_label[f] for f in files]
    fgroups = [file_group[f] for f in files]  # None: the file is its own group
    split, fgroups = _split_files(d, flabels, fgroups, split_column)
    if split_column is not None and len(split["val"]) == 0 and d.val_fraction > 0:
        # The user's split has no validation images: carve them from train (stratified,
        # seeded, whole groups), so checkpoint selection never looks at the test split.
        tr = split["train"]
        carve = group_split(
            [flabels[i] for i in tr], [fgroups[i] for i in tr], d.val_fraction, 0.0, d.split_seed
        )
        split = {"train": tr[carve["train"]], "val": tr[carve["val"]], "test": split["test"]}
    train_files = [files[i] for i in split["train"]]
    train_flabels = [flabels[i] for i in split["train"]]
    chosen = group_label_subset(train_flabels, [fgroups[i] for i in split["train"]], spec, seed)
    subset = describe_subset(train_flabels, chosen, spec, seed)
    per_file = np.bincount(np.searchsorted(files, file_of), minlength=len(files))
    subset["splits"] = split_summary(split, fgroups, per_file)
    subset["splits"]["subset"] = split_summary(
        {"train": split["train"][chosen]}, fgroups, per_file
    )["train"]
    if progress:
        _say_what_the_budget_got(parse_labels_spec(spec), subset)
    # What selection may look at: by default only the subset's own labels (the budget).
    mode = selection or recipe.finetune.selection
    if mode not in FINETUNE_SELECTIONS:
        raise UserError(f"finetune.selection {mode!r}: use one of {', '.join(FINETUNE_SELECTIONS)}")
    fit, val_files = chosen, []
    if mode == "carve":
        sel = carve_validation(chosen, [train_flabels[i] for i in chosen], CARVE_FRACTION, seed)
        fit, val_files = sel.fit, sorted(train_files[i] for i in sel.val)
    elif mode == "outside":  # (a split without validation images: no selection, as before)
        val_files = sorted(files[i] for i in split["val"])
    subset_files = {train_files[i] for i in fit}
    subset["selection"] = mode
    subset["n_fit"] = len(subset_files)
    subset["n_selection"] = len(val_files)

    def items_of(fileset: set[str]) -> np.ndarray:
        return np.array([i for i in range(n) if file_of[i] in fileset], dtype=np.int64)

    train_items = items_of(subset_files)
    ft = training_transform(d, d.image_size)
    ev = FinetuneTransform(train=False, image_size=d.image_size)
    train = ImageDataset(source, ft, seed=seed, indices=train_items, classes=classes)
    out: dict[str, ImageDataset | None] = {}
    for name, names in (("val", set(val_files)), ("test", {files[i] for i in split["test"]})):
        idx = items_of(names)
        out[name] = (
            ImageDataset(source, ev, seed=seed, indices=idx, classes=classes) if len(idx) else None
        )
    counts = np.bincount(
        [classes.index(str(item_labels[i])) for i in train_items], minlength=len(classes)
    ).tolist()
    return LabeledData(
        train=train,
        val=out["val"],
        test=out["test"],
        classes=classes,
        fingerprint=fingerprint,
        train_items=train_items,
        subset=subset,
        files={
            "train": sorted(subset_files),
            "val": val_files,
            "test": sorted(files[i] for i in split["test"]),
        },
        class_counts=counts,
    )
