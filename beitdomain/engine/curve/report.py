"""What a curve folder reports: `curve.csv`, `summary.csv`, `curve.png` and `report.md`,
rebuilt from the finished cells' `results.json` (and the baseline arms' `baselines.csv`)
after each cell.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from beitdomain.config import CurveConfig
from beitdomain.data.splits import differs_from_asked
from beitdomain.engine.curve.baselines import (
    BASELINES_FILE,
    baseline_settings,
    compare_with_strongest,
    is_unet,
    probe_name,
    without_pretraining,
)
from beitdomain.engine.curve.grid import Cell, CurveGrid
from beitdomain.engine.job import RESULTS_FILE
from beitdomain.eval.metrics import METRICS
from beitdomain.eval.plots import plot_label_efficiency
from beitdomain.eval.report import chance_level, read_csv, summarize, write_csv, write_report
from beitdomain.labels import parse_labels_spec
from beitdomain.user import UserError

log = logging.getLogger(__name__)
ARMS_FILE = "arms.json"  # how each fine-tuned arm ran, for report.md
SEGMENT_METRIC = "mean_dice"  # a segmentation curve's metric; mean_iou is its second column
SEGMENT_COLUMNS = ("mean_dice", "mean_iou")
MIN_SPLIT_GROUPS = 3  # fewer groups in a split: its score is one or two groups' score


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def curve_metric(c: CurveConfig, task: str) -> str:
    """What a curve of `task` compares: `curve.metric`, a classification metric, or for
    segmentation `mean_dice` (also where curve.metric is left at its classification default)
    or `mean_iou`, the foreground means of the test masks (results.json `test.mean_dice`,
    `test.mean_iou`).

    Raises:
        UserError: a classification metric for a segmentation curve, or the reverse.
    """
    if task == "segment":
        if c.metric == "balanced_accuracy":  # the default: a segmentation curve's is Dice
            return SEGMENT_METRIC
        if c.metric in SEGMENT_COLUMNS:
            return c.metric
        raise UserError(
            f"curve.metric={c.metric}: a classification metric; a segmentation curve "
            f"(finetune.task=segment) compares {' or '.join(SEGMENT_COLUMNS)} of each cell's "
            "test masks (both are in curve.csv)"
        )
    if c.metric in SEGMENT_COLUMNS:
        raise UserError(
            f"curve.metric={c.metric}: a segmentation metric; a classification curve compares "
            f"one of {', '.join(METRICS)} (on masks, run `beitdomain curve --task segment`)"
        )
    return c.metric


def subset_warnings(labels: str, subset: dict[str, Any], task: str = "classify") -> list[str]:
    """What a label amount's subset (`LabeledData.subset`, or a cell's results.json) must say
    so that a label-efficiency number never overstates: "asked 10%, got 28.6% (8 images, 1
    group)" where whole groups (or one image per class) made it larger, and each split that
    holds images from under `MIN_SPLIT_GROUPS` groups. For `task` segment the images are
    annotated images (a mask each), and a subset is whole images."""
    out = []
    splits = subset.get("splits") or {}
    got, n = float(subset["fraction"]), int(subset["n_labels"])
    if differs_from_asked(parse_labels_spec(labels).fraction, got):
        groups = (splits.get("subset") or {}).get("groups")
        why = (
            "whole groups are kept together"
            if groups and groups < n
            else "a subset is whole annotated images"
            if task == "segment"
            else "every class keeps at least one image"
        )
        unit = "annotated image" if task == "segment" else "image"
        out.append(
            f"labels: asked {labels}, got {100 * got:.1f}% ({_plural(n, unit)}"
            + (f", {_plural(groups, 'group')}" if groups else "")
            + f"; the train split holds {subset['n_train']}): {why}; the curve plots and "
            f"reports {100 * got:.1f}%"
        )
    missing = [c for c, k in (subset.get("per_class") or {}).items() if k == 0]
    if missing:
        out.append(
            f"labels: the {labels} subset holds no image of {', '.join(map(str, missing))}: "
            "its cells cannot learn that class (give more labels, or smaller groups)"
        )
    for name in ("train", "val", "test"):
        row = splits.get(name) or {}
        groups = row.get("groups", 0)
        if 0 < groups < MIN_SPLIT_GROUPS and groups != row.get("images"):
            out.append(
                f"the {name} split holds {row['images']} images from only "
                f"{_plural(groups, 'group')}: its scores stand for that many patients (or "
                "wafers, slides), not for the images"
            )
    return out


def collect_rows(out: Path, cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """One row per finished cell, from its results.json."""
    rows = []
    for cell in cells:
        res_path = out / "cells" / cell.name / RESULTS_FILE
        if not res_path.is_file():
            continue
        res = json.loads(res_path.read_text())
        if "test" not in res:
            raise UserError(
                f"{res_path.parent}: the cell has no test images, and a curve compares test "
                f"scores: give the labels CSV's split column 'test' rows, or set "
                f"data.test_fraction > 0 without a split column"
            )
        test = res["test"]
        # Images (files) like n_labels and n_train; a multi-frame file is one image here.
        n_test = ((res.get("splits") or {}).get("test") or {}).get("images") or test.get("n")
        if res.get("task") == "segment":
            scores = _segment_scores(test, res.get("classes") or [], res.get("ignore_index"))
        else:
            scores = {m: test.get(m) for m in METRICS}
        rows.append(
            {
                "init": cell.init,
                "labels": cell.labels.text,
                "fraction": res["fraction"],
                "seed": cell.seed,
                "lr": res.get("lr"),
                "n_labels": res["n_labels"],  # images (files), as n_train and n_test
                "label_groups": ((res.get("splits") or {}).get("subset") or {}).get("groups"),
                "n_train": res["n_train"],
                "steps": res["steps"],
                "best_step": res["best_step"],
                "selection": res.get("selection"),
                "layer_decay": res.get("layer_decay"),
                "n_test": n_test,
                **scores,
            }
        )
    return rows


def _segment_scores(
    test: dict[str, Any], classes: Sequence[str], ignore_index: int | None
) -> dict[str, Any]:
    """A segmentation cell's test scores: the foreground means of Dice and IoU (what the curve
    compares), then each foreground class's Dice (`dice_<class>`)."""
    out = {m: test.get(m) for m in SEGMENT_COLUMNS}
    per_class = test.get("dice") or {}
    for name in list(classes)[1:]:  # class 0 is the background, left out of the means
        out[f"dice_{name}"] = per_class.get(name)
    return out


def _with_steps_run(settings: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, str]:
    """Each arm's settings with the optimizer steps its finished cells ran, per label amount
    (from their results: the report never states a schedule the cells did not follow); the
    recipe's schedule only while no cell of the arm has finished."""
    out = {}
    for arm, how in settings.items():
        if isinstance(how, str):  # arms.json of a curve from before the schedule was apart
            how = {"settings": how, "schedule": ""}
        mine = [r for r in rows if r["init"] == arm and r.get("steps")]
        per: dict[str, set[int]] = {}
        for r in sorted(mine, key=lambda r: float(r["fraction"])):
            per.setdefault(str(r["labels"]), set()).add(int(r["steps"]))
        ran = [f"{min(s)}" if len(s) == 1 else f"{min(s)}-{max(s)}" for s in per.values()]
        if len(set(ran)) == 1:
            schedule = f"{ran[0]} steps per cell"
        elif ran:
            schedule = "steps per cell " + ", ".join(
                f"{labels}: {n}" for labels, n in zip(per, ran)
            )
        else:
            schedule = f"{how['schedule']} (the recipe's; no cell has finished)"
        out[arm] = f"{how['settings']}, {schedule}" if how["schedule"] or ran else how["settings"]
    return out


def one_fraction_per_amount(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose `fraction` is the mean fraction its label amount got over the seeds (and
    `seed_fraction` the one its own seed got). Whole groups can give each seed's subset another
    size; one label amount is then still one point of the curve, averaged over its seeds,
    instead of a point per seed at the fractions they got."""
    got: dict[str, list[float]] = {}
    for r in rows:
        if r.get("labels") is not None and r.get("fraction") not in (None, ""):
            got.setdefault(str(r["labels"]), []).append(float(r["fraction"]))
    out = []
    for r in rows:
        fracs = got.get(str(r.get("labels")))
        if not fracs or len(set(fracs)) == 1:
            out.append(r)
            continue
        out.append({**r, "fraction": sum(fracs) / len(fracs), "seed_fraction": r["fraction"]})
    return out


def _splits_text(out: Path) -> str | None:
    """Images and groups per split, in words, from a finished cell (all cells share the split)."""
    for res_path in sorted((out / "cells").glob("*/results.json")):
        splits = json.loads(res_path.read_text()).get("splits")
        if splits:
            return "; ".join(
                f"{name} {row['images']} images in {row['groups']} groups"
                + (
                    f" ({row['items']} items)"
                    if row.get("items", row["images"]) != row["images"]
                    else ""
                )
                for name, row in splits.items()
                if name != "subset" and row["images"]
            )
    return None


def _lr_summary(rows: list[dict[str, Any]], c: CurveConfig) -> str:
    """E.g. "domain 1% 1e-03 (5), 1e-04 (1); scratch 3e-03 (all)": which peak lr each
    initialization's cells fine-tuned at, per fraction where they differ."""
    parts = []
    for init in dict.fromkeys(r["init"] for r in rows):
        mine = [r for r in rows if r["init"] == init and r.get("lr") is not None]
        if not mine:
            continue
        if len({r["lr"] for r in mine}) == 1:
            parts.append(f"{init} {mine[0]['lr']:.0e} (all)")
            continue
        per = []
        for labels in dict.fromkeys(r["labels"] for r in mine):
            count = Counter(r["lr"] for r in mine if r["labels"] == labels)
            per.append(f"{labels} " + ", ".join(f"{lr:.0e} ({n})" for lr, n in count.items()))
        parts.append(f"{init} " + "; ".join(per))
    text = "; ".join(parts)
    if text and c.lr_grid_seeds == "first":
        text += (
            " (where an lr grid ran, it ran for the first seed of each fraction, on validation;"
            " the other seeds reused its choice)"
        )
    return text


def write_outputs(
    out: Path, rows: list[dict[str, Any]], c: CurveConfig, grid: CurveGrid
) -> dict[str, Any]:
    """curve.csv, summary.csv, curve.png and report.md from the finished rows (fine-tunes and
    the classical baseline arms, `baselines.csv`)."""
    metric, init_sets, inits = curve_metric(c, grid.task), c.init_sets, grid.inits
    base_file = out / BASELINES_FILE
    base = read_csv(base_file) if base_file.is_file() else []
    rows = one_fraction_per_amount([*rows, *base])
    write_csv(rows, out / "curve.csv")
    if not rows:
        return {}
    summary = summarize(rows)
    write_csv(summary, out / "summary.csv")
    n_train = max(int(r["n_train"]) for r in rows if r.get("n_train") is not None)
    honest = compare_with_strongest(rows, inits, metric)
    choice = honest["choice"]
    full = [f for f in choice if abs(f - 1.0) < 1e-9]
    plot_label_efficiency(
        summary,
        out / "curve.png",
        metric,
        n_train_total=n_train,
        reference_init=choice[full[0]] if full else "scratch",
        dashed=sorted({str(r["init"]) for r in base}),
        chance=chance_level(metric, _n_classes(out, grid)),
    )
    selection = {str(r.get("selection")) for r in rows if r.get("selection")}
    context = {
        "seeds": list(c.seeds),
        "fraction_seeds": {f: list(v) for f, v in c.fraction_seeds.items()},
        "n_test": rows[0].get("n_test"),
        "n_train": n_train,
        "inits": {
            k: (
                "MONAI's U-Net, random initialization"
                if is_unet(v)
                else v or "random initialization"
            )
            + (f"; fine-tuned with {', '.join(init_sets[k])}" if init_sets.get(k) else "")
            for k, v in inits.items()
        },
        "arm_settings": {
            **_with_steps_run(
                json.loads(arms.read_text()) if (arms := out / ARMS_FILE).is_file() else {}, rows
            ),
            **(baseline_settings(inits) if base else {}),
        },
        "learning_rates": _lr_summary([r for r in rows if r["init"] in inits], c),
        "paired": honest["paired"],
        "verdicts": [*honest["verdicts"], *_probe_on_top(summary, inits, metric)],
        "figure": "curve.png",
        "n_classes": _n_classes(out, grid),
    }
    if grid.task == "segment":
        context.update(_segment_notes(c, inits))
    if "outside" in selection:
        context["selection_note"] = (
            "Checkpoints and learning rates were chosen on the split's validation images, "
            "labels beyond each cell's budget (finetune.selection: outside): the low-label "
            "cells saw more labels than their fraction says."
        )
    results = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*/results.json"))]
    amounts, label_warnings = _label_amounts(results)
    if amounts:
        context["Label amounts (asked: got)"] = amounts
    warnings = [
        *label_warnings,
        *sorted({w for res in results for w in res.get("warnings", [])}),
    ]
    if warnings:
        context["Warning"] = "; ".join(warnings)
    if cell_warnings := warnings[len(label_warnings) :]:  # the label amounts' are said at start
        log.warning("curve: %s", "; ".join(cell_warnings))
    if splits := _splits_text(out):
        context["Splits (a group never spans two)"] = splits
    write_report(
        out / "report.md",
        summarize([*rows, *honest["reference_rows"]]),
        honest["efficiency"],
        metric,
        context,
    )
    return {"summary": summary, "efficiency": honest["efficiency"], "verdicts": honest["verdicts"]}


def _segment_notes(c: CurveConfig, inits: dict[str, str | None]) -> dict[str, str]:
    """What report.md says of a segmentation curve's metric and of the arms it has not."""
    notes = {
        "Dice": "each cell's Dice and IoU per class from every annotated test pixel (pooled "
        "over the test images), averaged over the foreground classes (the background left "
        "out); curve.csv holds mean_dice, mean_iou and each foreground class's Dice",
    }
    if c.baselines:
        random = [f"`{n}`" for n in without_pretraining(inits) if n in inits]
        notes["Classical baselines"] = (
            "not run: the logistic regressions on pixels, on their PCA and on frozen features "
            "label whole images, not pixels, so a segmentation curve has no such arm; the arms "
            "without pre-training are the fine-tunes from random weights ("
            + (", ".join(random) or "none in this curve")
            + ")"
        )
    return notes


def _probe_on_top(
    summary: list[dict[str, Any]], inits: dict[str, str | None], metric: str
) -> list[str]:
    """A sentence for each pre-trained arm whose frozen probe (a logistic regression on its
    frozen features) has the best mean of every arm at each fraction where it ran: then
    fine-tuning lost what the frozen features already held, which the verdict against the
    arms without pre-training does not say."""
    best: dict[float, tuple[float, str]] = {}
    for r in summary:
        mean = r.get(f"{metric}_mean")
        if mean is not None and (r["fraction"] not in best or mean > best[r["fraction"]][0]):
            best[r["fraction"]] = (float(mean), str(r["init"]))
    out = []
    for name in inits:
        if name in without_pretraining(inits):
            continue
        probe = probe_name(name)
        mine = sorted(f for f, (_, arm) in best.items() if arm == probe)
        ran = sorted({r["fraction"] for r in summary if r["init"] == probe})
        if not ran or mine != ran:
            continue
        out.append(
            f"{probe}, a logistic regression on the frozen features of `{name}`, is the top arm "
            f"at every fraction ({', '.join(f'{100 * f:.3g}%' for f in ran)}): fine-tuning "
            f"`{name}` scored below its own frozen features"
        )
    return out


def _label_amounts(results: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """Each label amount as asked and as the cells got it ("1%: 1.02% (18 images); 10%: 28.6%
    (8 images, 1 group)"), and the warnings of `subset_warnings`, each said once."""
    parts, warnings = [], []
    by_labels: dict[str, list[dict[str, Any]]] = {}
    for res in results:
        if res.get("labels") is not None and res.get("fraction") is not None:
            by_labels.setdefault(str(res["labels"]), []).append(res)
    for labels, group in sorted(by_labels.items(), key=lambda kv: kv[1][0]["fraction"]):
        got = []  # seeds of one amount may draw groups of different sizes
        for r in group:
            n, g = int(r["n_labels"]), ((r.get("splits") or {}).get("subset") or {}).get("groups")
            text = f"{100 * r['fraction']:.3g}% ({_plural(n, 'image')}" + (
                f", {_plural(g, 'group')})" if g and g < n else ")"
            )
            if text not in got:
                got.append(text)
        parts.append(f"{labels}: {' or '.join(got)}")
        for w in subset_warnings(labels, group[0], task=group[0].get("task", "classify")):
            if w not in warnings:
                warnings.append(w)
    return "; ".join(parts), warnings


def _n_classes(out: Path, grid: CurveGrid) -> int | None:
    """How many classes the cells learned (from the first finished cell), for chance level."""
    for cell in grid.cells():
        res = out / "cells" / cell.name / RESULTS_FILE
        if res.is_file():
            return len(json.loads(res.read_text()).get("classes") or []) or None
    return None
