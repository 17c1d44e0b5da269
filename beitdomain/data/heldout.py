"""Which images belong to the test split, so that pre-training can leave them out.

A label-efficiency curve scores every fine-tune on the test split. If the tokenizer and the
BEiT pre-training saw those very images (without labels, but still), the pre-trained arm has
had a look at the test set that no other arm had: transductive learning. By default
`pretrain`, `tokenizer train` and `demo` leave the test images out; `heldout_test_items` says which
they are, with the same rule fine-tuning uses to split:

* a split column (the labels CSV's third column, or a cache's stored splits): its `test` rows;
* otherwise the recipe's seeded stratified split (`data.val_fraction`, `data.test_fraction`,
  `data.split_seed`) over the labelled files, exactly as `labeled_data` computes it.

Images without a label are never in a test split and always pre-train.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from beitdomain.data.splits import _SPLIT_ALIASES, stratified_split


def item_split(source: Any, i: int) -> str | None:
    """The split the data gives item `i` (a cache or a manifest), or None."""
    if hasattr(source, "split"):
        return source.split(i)
    if hasattr(source, "items") and hasattr(source, "manifest"):
        k, _ = source.items[i]
        return source.manifest.entries[k].split
    return None


def heldout_test_items(
    source: Any, val_fraction: float, test_fraction: float, split_seed: int
) -> np.ndarray:
    """Sorted item indices of `source` whose file is in the test split (frames follow files).

    Args:
        source: `CachedImages` or `ManifestImages` (anything with `len`, `label(i)`,
            `source(i) -> (path, frame)` and optionally `split(i)`).
        val_fraction, test_fraction, split_seed: the recipe's `data.*` split settings, used
            when the data gives no split column.
    """
    n = len(source)
    file_of = [source.source(i)[0] for i in range(n)]
    label_of: dict[str, Any] = {}
    split_of: dict[str, str | None] = {}
    for i, f in enumerate(file_of):
        label_of.setdefault(f, source.label(i))
        split_of.setdefault(f, item_split(source, i))
    files = sorted(f for f in label_of if label_of[f] is not None)
    if not files:
        return np.empty(0, dtype=np.int64)
    if any(split_of[f] is not None for f in files):
        test = {f for f in files if _SPLIT_ALIASES.get(str(split_of[f]).strip().lower()) == "test"}
    elif test_fraction > 0:
        split = stratified_split(
            [str(label_of[f]) for f in files], val_fraction, test_fraction, split_seed
        )
        test = {files[i] for i in split["test"]}
    else:
        test = set()
    return np.array([i for i, f in enumerate(file_of) if f in test], dtype=np.int64)


def pretraining_items(
    source: Any,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    transductive: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The items pre-training and the tokenizer may use, and a record for the manifest.

    Returns:
        (sorted item indices, {'transductive', 'n_images', 'n_test_excluded'}).
    """
    n = len(source)
    everything = np.arange(n, dtype=np.int64)
    if transductive:
        return everything, {"transductive": True, "n_images": n, "n_test_excluded": 0}
    test = heldout_test_items(source, val_fraction, test_fraction, split_seed)
    keep = np.setdiff1d(everything, test)
    return keep, {"transductive": False, "n_images": len(keep), "n_test_excluded": len(test)}
