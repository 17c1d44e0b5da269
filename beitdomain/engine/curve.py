"""`beitdomain curve`: the grid of fine-tunes behind a label-efficiency curve.

Cells are (initialization, label fraction, seed). Each cell is an ordinary fine-tuning run in
`cells/<init>-<labels>-s<seed>/`; its `results.json` is the record that the cell is done, so a
re-run skips finished cells and resumes a cell that was cut off from its newest checkpoint.
`curve.csv`, `summary.csv`, `curve.png` and `report.md` are rebuilt from the cells after each one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from beitdomain.config import CurveConfig, Recipe, apply_sets, recipe_to_dict
from beitdomain.engine.finetune import finetune, resolve_init
from beitdomain.engine.rundir import RunDir
from beitdomain.eval.plots import plot_label_efficiency
from beitdomain.eval.report import (
    label_efficiency,
    paired_gains,
    summarize,
    write_csv,
    write_report,
)
from beitdomain.fileio import atomic_write_json
from beitdomain.user import UserError

log = logging.getLogger(__name__)
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


def cell_name(init: str, labels: str, seed: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", labels.replace("%", "pct").replace("/", "per"))
    return f"{init}-{safe}-s{seed}"


def _cell_recipe(
    recipe: Recipe,
    init: str | None,
    labels: str,
    seed: int,
    name: str | None = None,
    out: Path | None = None,
) -> Recipe:
    """The fine-tuning recipe of one cell: the shared settings, the initialization's
    `curve.init_sets`, and (with `curve.lr_grid_seeds: first`, for a seed after the first) the
    learning rate the first seed's lr grid chose, read from its results in `out`."""
    c = recipe.curve
    sets = c.init_sets.get(name, []) if name is not None else []
    if sets:
        recipe = apply_sets(recipe, sets, source=f"curve.init_sets.{name}:")
    ft = recipe.finetune
    first = seeds_of(c, labels)[0]
    if ft.lr_grid and c.lr_grid_seeds == "first" and seed != first and out is not None:
        lead = out / "cells" / cell_name(name or "", labels, first) / "results.json"
        lr = json.loads(lead.read_text()).get("lr") if lead.is_file() else None
        if lr is None:
            why = "has no lr" if lead.is_file() else "is missing"
            raise UserError(
                f"curve.lr_grid_seeds is 'first': seed {seed} of {name} at {labels} takes its "
                f"learning rate from {lead}, which {why} (delete that cell's folder to run its "
                "lr grid again)"
            )
        ft = replace(ft, lr_grid=[], optim=replace(ft.optim, lr=float(lr)))
    return replace(recipe, seed=seed, finetune=replace(ft, labels=labels, init=init))


def _run_cell(args: tuple[dict[str, Any], str, str | None, str, int, str, str]) -> None:
    """One fine-tune (in a worker process when the grid is spread over GPUs)."""
    from beitdomain.config import load_recipe

    recipe_dict, out, init, labels, seed, device, name = args
    import tempfile

    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(recipe_dict, f)
    recipe = load_recipe(f.name)
    Path(f.name).unlink()
    cell = _cell_recipe(recipe, init, labels, seed, name, Path(out).parent.parent)
    finetune(cell, out, device=device, resume=True, quiet=True)


def collect_rows(out: Path, cells: Sequence[tuple[str, str, int]]) -> list[dict[str, Any]]:
    """One row per finished cell, from its results.json."""
    rows = []
    for init, labels, seed in cells:
        res_path = out / "cells" / cell_name(init, labels, seed) / "results.json"
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
                "init": init,
                "labels": labels,
                "fraction": res["fraction"],
                "seed": seed,
                "lr": res.get("lr"),
                "n_labels": res["n_labels"],
                "n_train": res["n_train"],
                "steps": res["steps"],
                "best_step": res["best_step"],
                "n_test": test.get("n"),
                **{m: test.get(m) for m in METRICS},
            }
        )
    return rows


def seeds_of(c: CurveConfig, fraction: str) -> list[int]:
    """The seeds a fraction runs: `curve.fraction_seeds[fraction]`, else `curve.seeds`."""
    return list(c.fraction_seeds.get(fraction, c.seeds))


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
    out: Path, rows: list[dict[str, Any]], c: CurveConfig, inits: dict[str, str | None]
) -> dict[str, Any]:
    """curve.csv, summary.csv, curve.png and report.md from the finished rows."""
    metric, seeds, init_sets = c.metric, c.seeds, c.init_sets
    write_csv(rows, out / "curve.csv")
    if not rows:
        return {}
    summary = summarize(rows)
    write_csv(summary, out / "summary.csv")
    n_train = max(int(r["n_train"]) for r in rows)
    plot_label_efficiency(summary, out / "curve.png", metric, n_train_total=n_train)
    effs = []
    if "scratch" in inits:
        for name in inits:
            if name != "scratch" and any(r["init"] == name for r in rows):
                try:
                    effs.append(label_efficiency(summary, metric, "scratch", name))
                except UserError as e:
                    log.warning("label efficiency of %s: %s", name, e)
    context = {
        "seeds": list(seeds),
        "fraction_seeds": {f: seeds_of(c, f) for f in c.fraction_seeds},
        "n_test": rows[0].get("n_test"),
        "n_train": n_train,
        "inits": {
            k: (v or "random initialization")
            + (f"; fine-tuned with {', '.join(init_sets[k])}" if init_sets.get(k) else "")
            for k, v in inits.items()
        },
        "learning_rates": _lr_summary(rows, c),
        "paired": {
            name: paired_gains(rows, metric, "scratch", name)
            for name in inits
            if name != "scratch" and "scratch" in inits
        },
        "figure": "curve.png",
    }
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
    write_report(out / "report.md", summary, effs, metric, context)
    return {"summary": summary, "efficiency": effs}


def run_curve(
    recipe: Recipe,
    out: str | Path,
    *,
    device: str = "auto",
    overwrite: bool = False,
    quiet: bool = False,
    workers: int | None = None,
) -> dict[str, Any]:
    """Runs (or continues) the grid; returns the summary and label-efficiency results.

    Args:
        recipe: `curve.fractions`, `curve.seeds`, `curve.inits` ({name: path or None}),
            `curve.metric`, and the fine-tuning settings every cell shares.
        out: run folder; re-running with the same folder continues the grid.
        workers: parallel cells; default one per visible GPU (1 on CPU).
    """
    c = recipe.curve
    if not c.inits:
        raise UserError("curve.inits is empty: give at least one --init (e.g. --init scratch)")
    out = Path(out)
    inits = {name: resolve_init(path) for name, path in c.inits.items()}
    unknown = sorted(set(c.init_sets) - set(inits))
    if unknown:  # a recipe's settings for `domain` must not block a curve that names it `pre`
        log.warning(
            "curve.init_sets names %s, which are not among the initializations %s (--init "
            "NAME=PATH): those settings are not used",
            unknown,
            sorted(inits),
        )
    stray = sorted(set(c.fraction_seeds) - set(c.fractions))
    if stray:  # a recipe's extra 1% seeds must not block `--fractions 10%,100%`
        log.warning(
            "curve.fraction_seeds names %s, which are not among curve.fractions %s: those "
            "seeds are not used (spell the fraction the same way, e.g. '1%%')",
            stray,
            list(c.fractions),
        )
    for name in set(c.init_sets) & set(inits):  # a bad override fails now, not hours later
        _cell_recipe(recipe, inits[name], c.fractions[0], c.seeds[0], name)
    grid: dict[str, Any] = {"fractions": list(c.fractions), "seeds": list(c.seeds), "inits": inits}
    if c.init_sets:
        grid["init_sets"] = {k: list(v) for k, v in c.init_sets.items()}
    if c.fraction_seeds:
        grid["fraction_seeds"] = {f: seeds_of(c, f) for f in c.fraction_seeds}
    if c.lr_grid_seeds != "all":
        grid["lr_grid_seeds"] = c.lr_grid_seeds
    grid_file = out / "grid.json"
    # A re-run continues the grid; a folder holding anything but a curve run is refused.
    run = RunDir.open(out, kind="curve", resume=not overwrite, overwrite=overwrite, recipe=recipe)
    if grid_file.is_file():
        previous = json.loads(grid_file.read_text())
        if previous != grid:
            run.close()
            raise UserError(
                f"{out} holds a different grid ({previous}); continue it with the same "
                f"settings, or pass --overwrite / another --out"
            )
    with run.recording_failures(), _curve_interrupts(out):
        rows = _run_cells(recipe, out, run, grid, inits, device, quiet, workers)
        result = write_outputs(out, rows, c, inits)
    run.finish(cells=len(rows))
    return {"rows": rows, **result}


@contextlib.contextmanager
def _curve_interrupts(out: Path) -> Iterator[None]:
    """Ctrl-C in a cell: the advice names what `curve` has (re-running it), not --resume."""
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"curve interrupted; finished cells are kept and the cut-off cell "
            f"resumes from its checkpoint: run the same `beitdomain curve` command with "
            f"--out {out} again to continue"
        ) from None


def _run_cells(
    recipe: Recipe,
    out: Path,
    run: RunDir,
    grid: dict[str, Any],
    inits: dict[str, str | None],
    device: str,
    quiet: bool,
    workers: int | None,
) -> list[dict[str, Any]]:
    """Runs the cells not finished yet; returns the rows of all finished cells."""
    c = recipe.curve
    grid_file = out / "grid.json"
    run.start("curve", recipe, device)
    atomic_write_json(grid_file, grid)
    cells = [(i, f, s) for i in inits for f in c.fractions for s in seeds_of(c, f)]
    todo = [
        cell for cell in cells if not (out / "cells" / cell_name(*cell) / "results.json").is_file()
    ]
    log.info("curve: %d cells, %d done, %d to run", len(cells), len(cells) - len(todo), len(todo))
    n_gpu = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    workers = workers or max(1, n_gpu)
    if workers > 1 and todo:
        base = recipe_to_dict(recipe)
        jobs = []
        for k, (init, labels, seed) in enumerate(todo):
            dev = f"cuda:{k % n_gpu}" if n_gpu else "cpu"
            jobs.append(
                (
                    base,
                    str(out / "cells" / cell_name(init, labels, seed)),
                    inits[init],
                    labels,
                    seed,
                    dev,
                    init,
                )
            )
        # One process per device; cells of a device run one after another in its process.
        # With lr_grid_seeds 'first' the first seeds (which run the lr grid) go first: the
        # other seeds read the learning rate they chose.
        leads = [c.lr_grid_seeds == "all" or j[4] == seeds_of(c, j[3])[0] for j in jobs]
        waves = [
            [j for j, lead in zip(jobs, leads) if lead],
            [j for j, lead in zip(jobs, leads) if not lead],
        ]
        with mp.get_context("spawn").Pool(workers, maxtasksperchild=1) as pool:
            for wave in waves:
                for _ in pool.imap_unordered(_run_cell, wave):
                    write_outputs(out, collect_rows(out, cells), c, inits)
    else:
        from rich.progress import Progress

        with Progress(disable=quiet) as bar:
            task = bar.add_task("curve cells", total=len(cells), completed=len(cells) - len(todo))
            for init, labels, seed in todo:
                bar.update(task, description=f"curve: {init} {labels} seed {seed}")
                cell_dir = out / "cells" / cell_name(init, labels, seed)
                finetune(
                    _cell_recipe(recipe, inits[init], labels, seed, init, out),
                    cell_dir,
                    device=device,
                    resume=True,
                    quiet=True,
                )
                write_outputs(out, collect_rows(out, cells), c, inits)
                bar.advance(task)
    return collect_rows(out, cells)
