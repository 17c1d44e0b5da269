"""Example beitdomain reader plugin: ``.npy`` arrays ([H, W], [C, H, W] or [S, C, H, W])."""

from __future__ import annotations

from typing import Any

import numpy as np

NPY_MAGIC = b"\x93NUMPY"


class NpyReader:
    """Reads NumPy ``.npy`` files (never pickled object arrays)."""

    name = "npy"
    description = "NumPy .npy arrays (example plugin)"
    priority = 0

    def can_read(self, path: str, head: bytes) -> bool:
        return head.startswith(NPY_MAGIC)

    def read(self, path: str) -> tuple[np.ndarray, dict[str, Any]]:
        # allow_pickle=False: a .npy from elsewhere must not be able to run code.
        arr = np.load(path, allow_pickle=False)
        if arr.ndim not in (2, 3, 4):
            raise ValueError(f"expected 2-4 dimensions ([H, W] .. [S, C, H, W]), got {arr.shape}")
        return arr, {"format": "npy", "dtype": str(arr.dtype), "window": None}
