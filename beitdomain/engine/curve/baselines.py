"""The classical arms of every curve, on exactly the label subsets its fine-tunes train on.

For each (label amount, seed) of the grid: a logistic regression on downsampled pixels, one on
their principal components, and a linear probe (logistic regression on frozen, mean-pooled
features) of every backbone arm, each with its C chosen by cross-validation inside the subset
(`beitdomain.eval.baselines`). The subsets come from `labeled_data` with the cell's own label
amount and seed, so a baseline row and a fine-tune row of one seed saw the same labels. Seconds
to a minute on a CPU for the demo's 2,624 images.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from beitdomain.config import Recipe
from beitdomain.data.dataset import ImageDataset
from beitdomain.data.labeled import labeled_data
from beitdomain.engine.build import build_classifier, load_init
from beitdomain.engine.segment import UNET_INITS
from beitdomain.eval import baselines as B
from beitdomain.eval.report import (
    STRONGEST,
    as_reference,
    label_efficiency,
    paired_gains,
    strongest_arms,
    summarize,
    verdict,
)
from beitdomain.models.cnn import timm_arch
from beitdomain.user import UserError

log = logging.getLogger(__name__)
PIXEL_SIZE = 32  # px: 1,024 inputs; at 64 px the demo's pixel baseline scored the same
PCA_COMPONENTS = 50
PIXELS, PCA = "pixels-logreg", "pca-logreg"
BASELINES_FILE = "baselines.csv"  # the baseline arms' rows, computed once per curve folder


def probe_name(init: str) -> str:
    return f"probe-{init}"


def baseline_settings(inits: Mapping[str, str | None]) -> dict[str, str]:
    """How each baseline arm ran, in words, for report.md."""
    how = (
        "L2 logistic regression with balanced class weights, C from "
        f"{list(B.C_GRID)} by 5-fold cross-validation inside each label subset (out-of-fold "
        "likelihood)"
    )
    out = {
        PIXELS: f"{how}, on the evaluation view at {PIXEL_SIZE} x {PIXEL_SIZE} px",
        PCA: f"{how}, on the first {PCA_COMPONENTS} principal components of those pixels "
        "(fitted on the train split's images)",
    }
    for name in inits:
        out[probe_name(name)] = f"{how}, on the frozen, mean-pooled features of `{name}`"
    return out


def is_unet(init: str | None) -> bool:
    """Whether an init trains MONAI's U-Net from random weights (a segmentation arm)."""
    return init is not None and init.lower() in UNET_INITS


def from_random_weights(init: str | None) -> bool:
    """Whether a resolved init starts from random weights: scratch, a timm network
    (`timm:<arch>`) or the U-Net. Anything loaded from weights counts as pre-trained."""
    return init is None or timm_arch(init) is not None or is_unet(init)


def without_pretraining(inits: Mapping[str, str | None]) -> list[str]:
    """The arms that had no pre-training: randomly initialised backbones (fine-tuned and
    probed), timm networks and MONAI's U-Net from random weights, and the pixel baselines.
    Anything loaded from weights counts as pre-trained."""
    random = [name for name, path in inits.items() if from_random_weights(path)]
    return [*random, PIXELS, PCA, *(probe_name(n) for n in random)]


def _images(dataset: ImageDataset, indices: np.ndarray) -> np.ndarray:
    view = ImageDataset(dataset.source, dataset.transform, indices=indices, classes=dataset.classes)
    return np.stack([view[i]["image"].numpy() for i in range(len(view))])


def baseline_rows(
    recipe: Recipe,
    inits: Mapping[str, str | None],
    cells: Sequence[tuple[str, int]],
    *,
    trust_pickle: bool = False,
    quiet: bool = True,
    report_dir: Path | None = None,
) -> tuple[list[dict[str, Any]], dict[tuple[str, int], list[str]]]:
    """Curve rows (init, labels, fraction, seed, n_labels, n_train, n_test, metrics, c) for every
    baseline arm and every (label amount, seed) in `cells`, and the files each (label amount,
    seed) trained on (what a fine-tune's `labels_used.csv` lists as train). Counts are of
    images (files), as a fine-tune's are, also where a file holds several frames.
    `report_dir`: where the quarantine report of unreadable files goes (the curve folder)."""
    import torch

    def subset_of(spec: str, seed: int) -> Any:
        return labeled_data(
            recipe, labels=spec, seed=seed, progress=False, report_dir=report_dir, selection="none"
        )

    full = subset_of("100%", 0)
    if full.test is None:
        log.warning("no test split: the curve's baseline arms are skipped")
        return [], {}
    classes = full.classes
    test = np.asarray(full.test.indices)
    subsets, used = [], {}
    for spec, seed in cells:
        ld = subset_of(spec, seed)
        subsets.append((spec, ld.subset, seed, np.asarray(ld.train_items)))
        used[(spec, seed)] = list(ld.files["train"])
    # Features for every item a subset or the test split holds (pool: the whole train split,
    # unlabelled for PCA, which never sees a test image).
    pool = np.asarray(full.train_items)
    items = np.union1d(pool, test)
    pos = {int(i): k for k, i in enumerate(items)}
    if not quiet:  # reading and embedding take minutes on thousands of images
        log.info(
            "curve baselines: %d images (train pool and test), pixels, PCA and %d frozen probes",
            len(items),
            len(inits),
        )
    images = _images(full.test, items)  # the evaluation view, as the fine-tunes are scored
    labels = np.array([classes.index(str(full.test.source.label(int(i)))) for i in items])
    pixels = B.pixel_features(images, PIXEL_SIZE)
    arms = [
        B.BaselineArm(PIXELS, pixels),
        B.BaselineArm(
            PCA, B.pca_features(pixels, np.array([pos[int(i)] for i in pool]), PCA_COMPONENTS)
        ),
    ]
    for name, path in inits.items():
        torch.manual_seed(recipe.seed)  # a random backbone is the one seed 'seed' draws
        arm = replace(recipe, finetune=replace(recipe.finetune, init=path))
        model = build_classifier(arm, len(classes)).eval()  # timm:<arch> builds that network
        load_init(model, path, recipe, trust_pickle=trust_pickle)  # as the arm's fine-tune
        feats = B.frozen_features(model.forward_features, images)
        arms.append(B.BaselineArm(probe_name(name), feats, standardize=True))
    rows = B.run_baselines(
        arms,
        labels,
        [
            (spec, sub["fraction"], seed, np.array([pos[int(i)] for i in idx]))
            for spec, sub, seed, idx in subsets
        ],
        np.array([pos[int(i)] for i in test]),
        classes,
        quiet=quiet,
    )
    n_train = subsets[0][1]["n_train"] if subsets else None
    subset_by = {(spec, seed): sub for spec, sub, seed, _ in subsets}
    n_test = full.subset["splits"]["test"]["images"]
    for r in rows:  # the fits count items (frames): the rows count images, as the cells do
        sub = subset_by[(r["labels"], r["seed"])]
        r["n_labels"] = sub["n_labels"]
        r["label_groups"] = sub["splits"]["subset"]["groups"]
        r["n_train"] = n_train
        r["n_test"] = n_test
    return rows, used


def compare_with_strongest(
    rows: Sequence[Mapping[str, Any]], inits: Mapping[str, str | None], metric: str
) -> dict[str, Any]:
    """Every pre-trained arm against the strongest arm without pre-training, per fraction.

    Returns:
        {'choice': {fraction: arm}, 'reference_rows': the chosen arm's rows renamed
        `STRONGEST`, 'efficiency': [label_efficiency per pre-trained init], 'paired': {init:
        paired gains, each with the arm it was paired against}, 'verdicts': [one sentence per
        pre-trained init]}. Empty lists when no arm without pre-training ran.
    """

    summary = summarize(rows)
    choice = strongest_arms(summary, metric, without_pretraining(inits))
    out: dict[str, Any] = {
        "choice": choice,
        "reference_rows": [],
        "efficiency": [],
        "paired": {},
        "verdicts": [],
    }
    if not choice:
        return out
    ref = as_reference(rows, choice)
    out["reference_rows"] = ref
    with_ref = summarize([*rows, *ref])
    n_labels = {r["fraction"]: r.get("n_labels") for r in with_ref if r["init"] == STRONGEST}
    random = set(without_pretraining(inits))
    for name in inits:
        if name in random or not any(r["init"] == name for r in rows):
            continue  # a timm CNN from random weights is an arm without pre-training too
        try:
            out["efficiency"].append(label_efficiency(with_ref, metric, STRONGEST, name))
        except UserError as e:
            log.warning("label efficiency of %s: %s", name, e)
        paired = paired_gains([*rows, *ref], metric, STRONGEST, name)
        for g in paired:
            g["against"] = choice.get(g["fraction"], "?")
        out["paired"][name] = paired
        out["verdicts"].append(verdict(paired, choice, name, metric, n_labels))
    return out
