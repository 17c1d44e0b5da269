"""Which model selection serves a user with n labels: measured on the demo's ELPV curve cells.

    python benchmarks/selection_budget.py --demo runs/demo --init domain=runs/demo/pretrain \\
        --mode none --fractions 1%,10% --out runs/selection

Each cell is an ordinary `finetune` of the demo recipe on the curve's label subset (fraction,
seed); only what selection may look at changes (`beitdomain.data.budget`):

* `outside`: checkpoint and lr chosen on the split's 197 validation labels (the old protocol;
  more labels than the budget);
* `carve`: 20% of the subset held out for checkpoint and lr selection, training on the rest;
* `none`: one fixed lr and schedule on the whole subset, the final weights;
* `kfold`: the lr chosen by the mean final validation score over 3 folds inside the subset,
  then one fixed-schedule fine-tune on the whole subset at that lr.

`--init NAME=PATH` (or `scratch`), `--lrs` the grid (or the single lr of `none`), `--set` recipe
overrides (e.g. `finetune.optim.layer_decay=null` for a fair scratch arm). Prints one line per
cell and a summary table (test balanced accuracy, mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import beitdomain.engine.finetune as FT
from beitdomain.config import apply_sets, load_recipe
from beitdomain.data.budget import selection_splits
from beitdomain.data.dataset import ImageDataset

_FOLD: dict[str, int | None] = {"fold": None}


def _fold_of_subset(recipe, labels=None, seed=None, progress=True, report_dir=None, selection=None):
    """`labeled_data` with training and validation drawn from one fold inside the label subset
    (mode `kfold`); every other mode is `finetune.selection` itself."""
    data = _ORIGINAL(recipe, labels, seed, progress, report_dir, selection)
    fold = _FOLD["fold"]
    if fold is None:
        return data
    items = np.asarray(data.train_items)
    src = data.train.source
    labs = [str(src.label(int(i))) for i in items]
    s = recipe.seed if seed is None else seed
    sp = selection_splits("kfold", items, labs, seed=s, folds=3)[fold]
    data.train = ImageDataset(
        src, data.train.transform, seed=data.train.seed, indices=sp.fit, classes=data.classes
    )
    data.train_items = sp.fit
    data.val = ImageDataset(
        src, data.test.transform, seed=data.train.seed, indices=sp.val, classes=data.classes
    )
    data.class_counts = np.bincount(
        [data.classes.index(str(src.label(int(i)))) for i in sp.fit], minlength=len(data.classes)
    ).tolist()
    return data


_ORIGINAL = FT.labeled_data
FT.labeled_data = _fold_of_subset


def _last_val(run: Path) -> float:
    """The validation balanced accuracy at the last evaluation (the final weights)."""
    last = None
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val_balanced_accuracy" in rec:
            last = rec["val_balanced_accuracy"]
    return float(last)


def run_cell(recipe, out: Path, mode: str, lrs: list[float]) -> dict:
    ft = recipe.finetune
    grid = list(lrs) if len(lrs) > 1 else []
    one = replace(ft.optim, lr=lrs[0])
    if mode in ("outside", "carve", "none"):
        _FOLD["fold"] = None
        r = replace(recipe, finetune=replace(ft, selection=mode, lr_grid=grid, optim=one))
        return FT.finetune(r, out, device="cpu", resume=True, quiet=True)
    lr = lrs[0]
    if len(lrs) > 1:  # kfold: the lr with the best mean final validation score over the folds
        score = {}
        for lr_try in lrs:
            vals = []
            for fold in range(3):
                _FOLD["fold"] = fold
                o = replace(ft.optim, lr=lr_try)
                r = replace(recipe, finetune=replace(ft, selection="none", lr_grid=[], optim=o))
                sub = out / f"fold{fold}-lr{lr_try:g}"
                FT.finetune(r, sub, device="cpu", resume=True, quiet=True)
                vals.append(_last_val(sub))
            score[lr_try] = statistics.fmean(vals)
        lr = max(score, key=lambda k: score[k])
    _FOLD["fold"] = None
    o = replace(ft.optim, lr=lr)
    r = replace(recipe, finetune=replace(ft, selection="none", lr_grid=[], optim=o))
    return FT.finetune(r, out / "final", device="cpu", resume=True, quiet=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--demo", type=Path, required=True)
    p.add_argument("--recipe", default="recipes/elpv-cpu.yaml")
    p.add_argument("--init", required=True, help="NAME=PATH, or scratch")
    p.add_argument("--mode", choices=("outside", "carve", "none", "kfold"), required=True)
    p.add_argument("--lrs", default="1e-4,1e-3")
    p.add_argument("--fractions", default="1%,10%")
    p.add_argument("--seeds-1", default="0,1,2,3,4,5")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cache", default="cache", help="cache folder inside --demo")
    a = p.parse_args(argv)
    name, _, path = a.init.partition("=")
    recipe = load_recipe(a.recipe)
    recipe = replace(
        recipe,
        data=replace(
            recipe.data,
            root=str(a.demo / "data" / "images"),
            labels=str(a.demo / "data" / "labels.csv"),
            cache=str(a.demo / a.cache),
        ),
    )
    if a.sets:
        recipe = apply_sets(recipe, a.sets)
    lrs = [float(v) for v in a.lrs.split(",")]
    res: dict = {}
    for f in a.fractions.split(","):
        seeds = [int(s) for s in (a.seeds_1 if f == "1%" else a.seeds).split(",")]
        for s in seeds:
            t0 = time.time()
            cell = replace(
                recipe,
                seed=s,
                finetune=replace(recipe.finetune, labels=f, init=path or None),
            )
            out = a.out / f"{a.mode}-{name}-{f.replace('%', 'pct')}-s{s}"
            r = run_cell(cell, out, a.mode, lrs)
            ba = r["test"]["balanced_accuracy"]
            res.setdefault(f, []).append(ba)
            print(
                f"{a.mode} {name} {f} seed {s}: {ba:.4f} (lr {r.get('lr')}, n_train "
                f"{r.get('n_labels')}, {time.time() - t0:.0f} s)",
                flush=True,
            )
    print("\n| selection | arm | " + " | ".join(res) + " |")
    print("|---|---|" + "---:|" * len(res))
    cells = [
        f"{statistics.fmean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
        for v in res.values()
    ]
    print(f"| {a.mode} | {name} | " + " | ".join(cells) + " |")
    (a.out / f"{a.mode}-{name}.json").write_text(json.dumps(res))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
