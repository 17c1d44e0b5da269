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
from beitdomain.engine.curve.baselines import (
    BASELINES_FILE,
    baseline_settings,
    compare_with_strongest,
)
from beitdomain.engine.curve.grid import Cell, CurveGrid
from beitdomain.engine.job import RESULTS_FILE
from beitdomain.eval.metrics import METRICS
from beitdomain.eval.plots import plot_label_efficiency
from beitdomain.eval.report import read_csv, summarize, write_csv, write_report
from beitdomain.user import UserError

log = logging.getLogger(__name__)
ARMS_FILE = "arms.json"  # how each fine-tuned arm ran, for report.md


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
        rows.append(
            {
                "init": cell.init,
                "labels": cell.labels.text,
                "fraction": res["fraction"],
                "seed": cell.seed,
                "lr": res.get("lr"),
                "n_labels": res["n_labels"],
                "n_train": res["n_train"],
                "steps": res["steps"],
                "best_step": res["best_step"],
                "selection": res.get("selection"),
                "layer_decay": res.get("layer_decay"),
                "n_test": test.get("n"),
                **{m: test.get(m) for m in METRICS},
            }
        )
    return rows


def _with_steps_run(settings: dict[str, str], rows: list[dict[str, Any]]) -> dict[str, str]:
    """Each arm's settings plus the optimizer steps its finished cells ran (from their results,
    so the report never states a schedule the cells did not follow)."""
    out = {}
    for arm, how in settings.items():
        steps = sorted({int(r["steps"]) for r in rows if r["init"] == arm and r.get("steps")})
        if steps:
            ran = f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
            how = f"{how}; the cells ran {ran} steps"
        out[arm] = how
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
    metric, init_sets, inits = c.metric, c.init_sets, grid.inits
    base_file = out / BASELINES_FILE
    base = read_csv(base_file) if base_file.is_file() else []
    rows = [*rows, *base]
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
    )
    selection = {str(r.get("selection")) for r in rows if r.get("selection")}
    context = {
        "seeds": list(c.seeds),
        "fraction_seeds": {f: list(v) for f, v in c.fraction_seeds.items()},
        "n_test": rows[0].get("n_test"),
        "n_train": n_train,
        "inits": {
            k: (v or "random initialization")
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
        "verdicts": honest["verdicts"],
        "figure": "curve.png",
        "n_classes": _n_classes(out, grid),
    }
    if "outside" in selection:
        context["selection_note"] = (
            "Checkpoints and learning rates were chosen on the split's validation images, "
            "labels beyond each cell's budget (finetune.selection: outside): the low-label "
            "cells saw more labels than their fraction says."
        )
    warnings = sorted(
        {
            w
            for p in sorted((out / "cells").glob("*/results.json"))
            for w in json.loads(p.read_text()).get("warnings", [])
        }
    )
    if warnings:
        context["Warning"] = "; ".join(warnings)
        log.warning("curve: %s", "; ".join(warnings))
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


def _n_classes(out: Path, grid: CurveGrid) -> int | None:
    """How many classes the cells learned (from the first finished cell), for chance level."""
    for cell in grid.cells():
        res = out / "cells" / cell.name / RESULTS_FILE
        if res.is_file():
            return len(json.loads(res.read_text()).get("classes") or []) or None
    return None
