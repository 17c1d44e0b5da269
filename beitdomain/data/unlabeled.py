"""Recipe -> unlabelled datasets: the training images of the tokenizer and of pre-training.

The test split's images stay out (`items_in_test_split`, the split fine-tuning scores on)
unless `data.transductive`; the tokenizer keeps a small held-out set to be measured on.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from beitdomain.config import Recipe
from beitdomain.data.dataset import ImageDataset
from beitdomain.data.heldout import pretraining_items
from beitdomain.data.labeled import items_in_test_split
from beitdomain.data.masks import MaskClasses, cached_pairs, split_labels_csv, split_pairs
from beitdomain.data.source import image_source
from beitdomain.data.transforms import FinetuneTransform, training_transform
from beitdomain.user import UserError

log = logging.getLogger(__name__)


class EvalViews:
    """Deterministic (view, tokenizer view) pair: resize + center crop, no augmentation."""

    def __init__(self, image_size: int, tokenizer_size: int) -> None:
        self.view = FinetuneTransform(train=False, image_size=image_size)
        self.tok = FinetuneTransform(train=False, image_size=tokenizer_size)

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.view(image), self.tok(image)


def holdout_indices(n: int, seed: int, max_items: int = 64, fraction: float = 0.05) -> np.ndarray:
    """A fixed small set of items kept out of tokenizer training, to measure it honestly."""
    k = max(1, min(max_items, round(fraction * n)))
    if n <= 1:
        return np.arange(0)
    return np.sort(np.random.default_rng([seed, 7]).permutation(n)[:k])


def unlabeled_dataset(
    recipe: Recipe,
    kind: str,
    mask_generator: Any = None,
    holdout: bool = False,
    progress: bool = True,
    report_dir: Path | None = None,
) -> tuple[ImageDataset, ImageDataset | None, str]:
    """Training images for the tokenizer (`kind='tokenizer'`) or pre-training (`'pretrain'`).

    Returns:
        (train dataset, held-out dataset or None, data fingerprint). Items are
        `{'image', 'tok_image'[, 'mask']}`; for the tokenizer both views are tokenizer-sized.
    """
    d = recipe.data
    if recipe.finetune.task == "segment" and not (d.cache or d.manifest):
        # A masks CSV (or mask folder) names images and masks: pre-training reads the images
        # only, with the split the segmentation fine-tune will score on (its test images out).
        with tempfile.TemporaryDirectory(prefix="beitdomain-masks-") as tmp:
            listed = split_labels_csv(recipe, Path(tmp) / "images.csv")
            recipe = replace(recipe, data=replace(d, labels=str(listed)))
            source, fingerprint = image_source(recipe, progress, report_dir)
        d = recipe.data
    elif recipe.finetune.task == "segment" and d.cache:
        # A cache of pairs (`data cache` of a segmentation recipe): its images, without the
        # masks CSV's check for a label column; the test split is the fine-tune's, by pair.
        source, fingerprint = image_source(
            replace(recipe, data=replace(d, labels=None)), progress, report_dir
        )
    else:
        source, fingerprint = image_source(recipe, progress, report_dir)
    size = d.tokenizer_size if kind == "tokenizer" else d.image_size
    transform = training_transform(d, size, d.tokenizer_size)
    n = len(source)
    if n == 0:
        raise UserError("the data holds no images")
    # The test split's images stay out unless transductive pre-training is asked for: the
    # curve scores every arm on them, and only this one would have seen them.
    if d.transductive:
        test = np.empty(0, dtype=np.int64)
    elif recipe.finetune.task == "segment" and d.cache:
        test = _cached_pairs_in_test_split(recipe)
    else:
        test = items_in_test_split(source, recipe)
    usable, record = pretraining_items(n, test, d.transductive)
    if len(usable) == 0:
        raise UserError(
            f"all {n} images are in the test split, which pre-training leaves out; give "
            "unlabelled or train images, or set data.transductive: true (--transductive)"
        )
    if record["n_test_excluded"]:
        log.info(
            "%d test-split images left out of %s (data.transductive: false)",
            record["n_test_excluded"],
            kind,
        )
    pick = holdout_indices(len(usable), d.split_seed) if holdout else np.arange(0)
    held = usable[pick]
    train_idx = np.setdiff1d(usable, held)
    train = ImageDataset(
        source,
        transform,
        seed=recipe.seed,
        mask_generator=mask_generator,
        indices=train_idx,
        classes=[],
    )
    held_ds = None
    if holdout:
        held_ds = ImageDataset(
            source,
            EvalViews(size, d.tokenizer_size),
            seed=recipe.seed,
            indices=held if len(held) else train_idx[:1],
            classes=[],
        )
    train.pretraining_data = record  # for the run's manifest: transductive or not, how many
    return train, held_ds, fingerprint


def _cached_pairs_in_test_split(recipe: Recipe) -> np.ndarray:
    """Sorted item indices of a cache of (image, mask) pairs whose image is in the test split
    the segmentation fine-tune scores on (`masks.split_pairs`, as `segment_data` draws it from
    the same cache); the cache is checked as the fine-tune checks it (`masks.cached_pairs`)."""
    cached, pairs = cached_pairs(recipe, MaskClasses.from_config(recipe.segment))
    d = recipe.data
    split = split_pairs(replace(recipe, data=replace(d, root=d.root or cached.root)), pairs)
    files = np.asarray(cached.items[:, 1], dtype=np.int64)  # file k is pair k
    return np.flatnonzero(np.isin(files, split["test"])).astype(np.int64)
