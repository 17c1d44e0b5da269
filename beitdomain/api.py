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

__all__ = [*sorted(_EXPORTS), "configure_logging", "embed", "load_recipe"]
_ENGINES = ("beitdomain.engine.", "beitdomain.data.")  # names whose work logs progress

if TYPE_CHECKING:  # for editors and type checkers; at run time names load lazily
    from beitdomain.config import Recipe  # noqa: F401
    from beitdomain.engine.represent import FrozenBackbone, load_backbone  # noqa: F401
    from beitdomain.engine.represent_eval import evaluate_representation  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'beitdomain.api' has no attribute {name!r}")
    if module.startswith(_ENGINES):
        configure_logging(only_if_unset=True)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def configure_logging(quiet: bool = False, *, only_if_unset: bool = False) -> None:
    """Progress and warnings on stderr as the CLI prints them (`quiet`: warnings only).

    Called on first use of an engine when the script or notebook has set up no logging of its
    own (no handler on the root or the `beitdomain` logger); call it with `quiet=True` to
    silence progress, or configure `logging` yourself and it stays out of the way.
    """
    import logging
    import sys

    logger = logging.getLogger("beitdomain")
    if only_if_unset and (logging.getLogger().handlers or logger.handlers):
        return
    for h in [h for h in logger.handlers if getattr(h, "_beitdomain_api", False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    handler._beitdomain_api = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def load_recipe(
    path: Any = None, options: dict[str, Any] | None = None, sets: list[str] | None = None
) -> Any:
    """A recipe as the CLI builds it: the file (or shipped name), `options`, then
    `$BEITDOMAIN_SET` and `sets` (so a script smoke-tests with the same variable as the CLI)."""
    from beitdomain.config import ENV_SETS, apply_sets, env_sets
    from beitdomain.config import load_recipe as _load

    extra = env_sets()
    if not extra:
        return _load(path, options, sets)
    return apply_sets(apply_sets(_load(path, options), extra, f"${ENV_SETS}"), sets or [])


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
