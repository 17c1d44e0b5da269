"""Data pipeline: scan (manifest + labels) -> cache (decoded once) -> dataset + transforms.

Names are imported lazily so that ``beitdomain data scan`` does not pay for torch/cv2 start-up.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Manifest": "index",
    "ManifestEntry": "index",
    "ScanError": "index",
    "scan": "index",
    "CachedImages": "cache",
    "CacheError": "cache",
    "build_cache": "cache",
    "check_cache": "cache",
    "PretrainTransform": "transforms",
    "FinetuneTransform": "transforms",
    "ImageDataset": "dataset",
    "ManifestImages": "dataset",
    "contact_sheet": "inspect",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"beitdomain.data.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'beitdomain.data' has no attribute {name!r}")
