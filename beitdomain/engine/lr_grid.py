"""`finetune.lr_grid`: one fine-tune per learning rate, the best on validation is the result.

Each learning rate is an ordinary fine-tune in `out/lr-<value>/`; the one with the best
validation `finetune.select_metric` is copied into `out`, so `predict` and `curve` read a grid's
folder like any fine-tuning run. A grid that was cut off skips the learning rates it finished.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from beitdomain.config import Recipe
from beitdomain.engine.data import labeled_data
from beitdomain.engine.job import BEST_FILE, RESULTS_FILE, Job, JobOptions
from beitdomain.user import UserError

if TYPE_CHECKING:
    from typing_extensions import Unpack

# What a grid's chosen fine-tune leaves in the grid's own folder.
CHOSEN_FILES = (
    BEST_FILE,
    "test_predictions.csv",
    "confusion_matrix.png",
    "labels_used.csv",
    "labels.json",
    "training_curves.png",
    "head_probe.json",
)


def finetune_lr_grid(
    recipe: Recipe, out: str | Path, **options: Unpack[JobOptions]
) -> dict[str, Any]:
    """Runs the grid in `out/lr-<value>/`; returns the chosen fine-tune's results plus
    `lr_grid` (every learning rate's best validation score)."""
    from beitdomain.engine.finetune import finetune

    ft = recipe.finetune
    job = Job.open("finetune", recipe, out, **options)
    if labeled_data(recipe, progress=False, report_dir=job.path).val is None:  # before training
        if recipe.finetune.selection == "none":
            raise UserError(
                f"finetune.lr_grid {list(ft.lr_grid)} picks a learning rate on validation, and "
                "finetune.selection is 'none' (a fixed schedule: nothing to select on). Give one "
                "lr (finetune.optim.lr), or set finetune.selection=carve (validate on a fifth of "
                "the labels) or outside (the split's validation images, beyond the budget)"
            )
        raise UserError(
            "finetune.lr_grid picks the learning rate on the validation split, and this run has "
            "none: set data.val_fraction > 0, or give val rows in the labels CSV"
        )
    job.start()
    tried: list[dict[str, Any]] = []
    chosen: tuple[float, Path, dict[str, Any]] | None = None
    for lr in ft.lr_grid:
        sub = job.path / f"lr-{lr:g}"
        one = replace(recipe, finetune=replace(ft, lr_grid=[], optim=replace(ft.optim, lr=lr)))
        if (sub / RESULTS_FILE).is_file():  # finished before an interruption
            res = json.loads((sub / RESULTS_FILE).read_text())
        else:
            res = finetune(one, sub, **{**options, "resume": True, "overwrite": False})
        tried.append({"lr": lr, "val_best": res.get("val_best"), "best_step": res.get("best_step")})
        if job.is_main and (chosen is None or res["val_best"] > chosen[2]["val_best"]):
            chosen = (lr, sub, res)
    results: dict[str, Any] = {}
    if job.is_main and chosen is not None:
        lr, sub, res = chosen
        for name in CHOSEN_FILES:
            if (sub / name).is_file():
                shutil.copyfile(sub / name, job.path / name)
        results = {**res, "lr": lr, "lr_grid": tried}
        job.write_json(RESULTS_FILE, results)
        job.say(
            "lr grid: %s -> lr %g",
            ", ".join(f"{t['lr']:g}: {t['val_best']:.4f}" for t in tried),
            lr,
        )
    job.finish({k: v for k, v in results.items() if k != "classes"})
    return results
