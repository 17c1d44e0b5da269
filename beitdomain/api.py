"""The Python API for notebooks and scripts: the commands' engines, with the same recipes.

    from beitdomain import api

    bb = api.load_backbone("runs/pre")            # a timm Beit + its preprocessing
    X = bb.embed(["a.dcm", "b.dcm", array])        # [N, D] pooled features, one row per item
    bb.data_config                                 # input size, crop, intensity settings

    recipe = api.load_recipe("cpu-dicom", sets=["data.root=/data/ct"])
    api.train_tokenizer(recipe, "runs/tok")        # what `beitdomain tokenizer train` runs
    api.evaluate_representation(bb, recipe, ("knn", "probe"))   # `beitdomain eval knn|probe`

Every name is imported on first use, so `from beitdomain import api` stays fast and a missing
optional piece fails only where it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> module that defines it; one line per engine the CLI calls.
_EXPORTS = {
    "load_recipe": "beitdomain.config",
    "Recipe": "beitdomain.config",
    "IntensitySpec": "beitdomain.io",
    "load_image": "beitdomain.io",
    "scan": "beitdomain.data.index",
    "build_cache": "beitdomain.data.cache",
    "train_tokenizer": "beitdomain.engine.tokenizer",
    "pretrain": "beitdomain.engine.pretrain",
    "finetune": "beitdomain.engine.finetune",
    "predict": "beitdomain.engine.predict",
    "run_curve": "beitdomain.engine.curve.run",
    "load_backbone": "beitdomain.engine.represent",
    "FrozenBackbone": "beitdomain.engine.represent",
    "evaluate_representation": "beitdomain.engine.represent_eval",
    "knn_probs": "beitdomain.eval.representation",
    "probe_probs": "beitdomain.eval.representation",
}

__all__ = [*sorted(_EXPORTS), "embed"]

if TYPE_CHECKING:  # for editors and type checkers; at run time names load lazily
    from beitdomain.config import Recipe, load_recipe  # noqa: F401
    from beitdomain.engine.represent import FrozenBackbone, load_backbone  # noqa: F401
    from beitdomain.engine.represent_eval import evaluate_representation  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'beitdomain.api' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


def embed(run: Any, items: Any, *, device: str = "cpu", batch_size: int = 32) -> Any:
    """Pooled features `[N, D]` of images (paths and/or arrays) under a run's backbone.

    `run` is a run folder, an exported backbone file, or a backbone from `load_backbone`
    (pass that to embed many batches without reloading).
    """
    from beitdomain.engine.represent import FrozenBackbone, load_backbone

    bb = run if isinstance(run, FrozenBackbone) else load_backbone(run, device=device)
    return bb.embed(items, batch_size=batch_size)
