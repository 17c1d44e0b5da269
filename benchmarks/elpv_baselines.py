"""Classical baselines on the demo's label subsets, and how to choose C within the label budget.

Run after the demo's export + cache (``beitdomain demo`` or ``.runs``-style stages):

    python benchmarks/elpv_baselines.py --demo runs/demo [--backbone runs/demo/pretrain]

The subsets are the curve's own (``labeled_data`` with the recipe's seeds and fractions), the
test split the demo's 656 cells. For each arm (pixels at 32 and 64 px, PCA-50 of the 32 px
pixels fitted on the train split's images, linear probes of a random and, with ``--backbone``,
a pre-trained ViT) and each way of choosing C it prints test balanced accuracy, mean ± std over
seeds:

* ``kfold``: C by 5-fold cross-validation inside the subset (the library's default);
* ``carve``: C on a 20% share carved out of the subset, then refitted on all of it;
* ``fixed``: C = 0.1, no selection (the issue's table);
* ``outside``: C on the split's 197 validation labels (labels beyond the budget; reference).
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

from beitdomain.config import load_recipe
from beitdomain.data.budget import carve_validation
from beitdomain.data.labeled import labeled_data
from beitdomain.eval import baselines as B
from beitdomain.eval.metrics import classification_metrics

SELECTIONS = ("kfold", "carve", "fixed", "outside")


def _eval_images(dataset) -> np.ndarray:
    return np.stack([dataset[i]["image"].numpy() for i in range(len(dataset))])


def load(
    demo: Path,
    recipe_name: str,
    fractions: list[str],
    seeds: dict[str, list[int]],
    cache: str = "cache",
    normalize: str | None = None,
):
    """Images of every labelled item (eval view), labels, the curve's subsets, val and test."""
    recipe = load_recipe(recipe_name)
    d = replace(
        recipe.data,
        root=str(demo / "data" / "images"),
        labels=str(demo / "data" / "labels.csv"),
        cache=str(demo / cache),
        normalize=normalize or recipe.data.normalize,
    )
    if not (demo / cache / "cache.json").is_file():  # e.g. a cache of raw (dtype) intensities
        from beitdomain.data.cache import build_cache
        from beitdomain.data.index import scan
        from beitdomain.io import IntensitySpec

        m = scan(d.root, d.labels, progress=False)
        size = round(d.image_size * 1.25)
        build_cache(m, demo / cache, size=size, dtype="uint8", spec=IntensitySpec.from_config(d))
    recipe = replace(recipe, data=d)
    base = labeled_data(recipe, labels="100%", seed=0, progress=False, selection="outside")
    source = base.train.source
    n = len(source)
    from beitdomain.data.dataset import ImageDataset

    everything = ImageDataset(
        source, base.test.transform, indices=np.arange(n), classes=base.classes
    )
    images = _eval_images(everything)
    labels = np.array([base.classes.index(str(source.label(i))) for i in range(n)])
    cells = []
    for f in fractions:
        for s in seeds[f]:
            ld = labeled_data(recipe, labels=f, seed=s, progress=False)
            cells.append((f, ld.subset["fraction"], s, np.asarray(ld.train_items)))
    return (
        recipe,
        images,
        labels,
        cells,
        np.asarray(base.val.indices),
        np.asarray(base.test.indices),
        np.asarray(base.train.indices),
        base.classes,
    )


def score(arm, labels, subset, test, val, classes, selection: str, seed: int) -> float:
    x, y = arm.features, labels
    if selection == "kfold":
        return B.fit_and_score(x, y, subset, test, classes, seed=seed, standardize=arm.standardize)[
            "balanced_accuracy"
        ]
    if selection == "fixed":
        c = B.DEFAULT_C
    else:
        if selection == "carve":
            sp = carve_validation(subset, [int(v) for v in y[subset]], 0.2, seed)
            fit, held = sp.fit, sp.val
        else:
            fit, held = subset, val
        best = None
        for cand in sorted(B.C_GRID):
            if len(np.unique(y[fit])) < 2:
                break
            m = B._fit(x[fit], y[fit], cand, arm.standardize, seed)
            from sklearn.metrics import balanced_accuracy_score

            s = balanced_accuracy_score(y[held], m.predict(x[held]))
            if best is None or s > best[0] + 1e-12:
                best = (s, cand)
        c = best[1] if best else B.DEFAULT_C
    if len(np.unique(y[subset])) < 2:
        return 0.5
    model = B._fit(x[subset], y[subset], c, arm.standardize, seed)
    probs = np.zeros((len(test), len(classes)))
    probs[:, model.classes_] = model.predict_proba(x[test])
    return classification_metrics(y[test], probs, classes)["balanced_accuracy"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--demo", type=Path, required=True, help="the demo's output folder")
    p.add_argument("--recipe", default="recipes/elpv-cpu.yaml")
    p.add_argument("--backbone", action="append", default=[], help="NAME=PATH of a backbone")
    p.add_argument("--fractions", default="1%,10%,100%")
    p.add_argument("--seeds-1", default="0,1,2,3,4,5")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--seeds-100", default="0")
    p.add_argument("--selections", default=",".join(SELECTIONS))
    p.add_argument("--json", type=Path)
    p.add_argument("--cache", default="cache", help="cache folder inside --demo")
    p.add_argument("--normalize", help="data.normalize of that cache, e.g. dtype (raw / 255)")
    p.add_argument("--arms", default="pixels-32,pixels-64,pca50-32,probe")
    a = p.parse_args(argv)
    fractions = a.fractions.split(",")
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    seeds = {f: ints(a.seeds) for f in fractions}
    seeds.update({"1%": ints(a.seeds_1), "100%": ints(a.seeds_100)})
    t0 = time.time()
    recipe, images, labels, cells, val, test, _pool, classes = load(
        a.demo, a.recipe, fractions, seeds, a.cache, a.normalize
    )
    unlabeled = np.setdiff1d(np.arange(len(labels)), test)  # PCA: every image but the test split
    px32 = B.pixel_features(images, 32)
    arms = [
        B.BaselineArm("pixels-32", px32),
        B.BaselineArm("pixels-64", B.pixel_features(images, images.shape[-1])),
        B.BaselineArm("pca50-32", B.pca_features(px32, unlabeled, 50)),
    ]
    import torch

    from beitdomain.engine.build import build_classifier
    from beitdomain.engine.finetune import resolve_init
    from beitdomain.models.convert import load_backbone_weights

    wanted = a.arms.split(",")
    arms = [arm for arm in arms if arm.name in wanted]
    torch.manual_seed(0)
    probes = [("random", None), *(b.split("=", 1) for b in a.backbone)]
    for name, path in probes if "probe" in wanted else []:
        model = build_classifier(recipe, len(classes)).eval()
        if path is not None:
            load_backbone_weights(model, resolve_init(path), in_chans=recipe.data.in_chans)
        feats = B.frozen_features(model.forward_features, images)
        arms.append(B.BaselineArm(f"probe-{name}", feats, standardize=True))
    print(f"features in {time.time() - t0:.0f} s", flush=True)
    selections = a.selections.split(",")
    results: dict = {}
    for arm in arms:
        for sel in selections:
            for f in fractions:
                vals = [
                    score(arm, labels, sub, test, val, classes, sel, s)
                    for spec, _, s, sub in cells
                    if spec == f
                ]
                results.setdefault(arm.name, {}).setdefault(sel, {})[f] = vals
        print(
            arm.name,
            {
                s: {f: round(statistics.fmean(v), 3) for f, v in d.items()}
                for s, d in results[arm.name].items()
            },
            flush=True,
        )
    print(
        f"\nbalanced accuracy on the test split ({len(test)} cells), mean ± std over seeds "
        f"({time.time() - t0:.0f} s)\n"
    )
    print("| arm | selection | " + " | ".join(fractions) + " |")
    print("|---|---|" + "---:|" * len(fractions))
    for name, per in results.items():
        for sel, per_f in per.items():
            cells_txt = []
            for f in fractions:
                v = per_f[f]
                sd = f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else ""
                cells_txt.append(f"{statistics.fmean(v):.3f}{sd}")
            print(f"| {name} | {sel} | " + " | ".join(cells_txt) + " |")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
