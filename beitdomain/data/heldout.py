"""What pre-training may use: every image but the test split's, unless transductive.

A label-efficiency curve scores every fine-tune on the test split. If the tokenizer and the
BEiT pre-training saw those very images (without labels, but still), the pre-trained arm has
had a look at the test set that no other arm had: transductive learning. By default
`pretrain`, `tokenizer train` and `demo` leave the test images out (which they are:
`beitdomain.data.labeled.items_in_test_split`, the very split fine-tuning scores on);
`data.transductive: true` keeps them.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def pretraining_items(
    n: int, test: np.ndarray, transductive: bool = False
) -> tuple[np.ndarray, dict[str, Any]]:
    """The items pre-training and the tokenizer may use, and a record for the manifest.

    Args:
        n: items in the source.
        test: item indices of the test split.
        transductive: keep the test items too.

    Returns:
        (sorted item indices, {'transductive', 'n_images', 'n_test_excluded'}).
    """
    everything = np.arange(n, dtype=np.int64)
    if transductive:
        return everything, {"transductive": True, "n_images": n, "n_test_excluded": 0}
    keep = np.setdiff1d(everything, np.asarray(test, dtype=np.int64))
    return keep, {"transductive": False, "n_images": len(keep), "n_test_excluded": n - len(keep)}
