"""`beitdomain curve`: the grid of fine-tunes behind a label-efficiency curve.

Cells are `Cell(init, labels, seed)` values of a `CurveGrid` parsed once. Each cell is an
ordinary fine-tuning run in `cells/<init>-<labels>-s<seed>/`; its `results.json` is the record
that the cell is done, so a re-run skips finished cells and resumes a cell that was cut off
from its newest checkpoint.
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from beitdomain.config import CurveConfig, Recipe, apply_sets
from beitdomain.data.splits import LabelSpec, parse_labels_spec
from beitdomain.engine.curve_baselines import (
    BASELINES_FILE,
    baseline_rows,
    baseline_settings,
    compare_with_strongest,
)
from beitdomain.engine.distributed import resolve_device
from beitdomain.engine.finetune import finetune, resolve_init
from beitdomain.engine.job import RESULTS_FILE
from beitdomain.engine.rundir import RunDir
from beitdomain.eval.plots import plot_label_efficiency
from beitdomain.eval.report import read_csv, summarize, write_csv, write_report
from beitdomain.fileio import atomic_write_json
from beitdomain.user import UserError

log = logging.getLogger(__name__)
ARMS_FILE = "arms.json"  # how each fine-tuned arm ran, for report.md
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


@dataclass(frozen=True)
class Cell:
    """One fine-tune of the grid: an initialization (by name), a label amount and a seed."""

    init: str
    labels: LabelSpec
    seed: int

    @property
    def name(self) -> str:
        """Its folder under `cells/`."""
        return cell_name(self.init, self.labels, self.seed)


@dataclass(frozen=True)
class CurveGrid:
    """The cells of a curve, from `curve` settings parsed once.

    Label amounts are `LabelSpec`s, so '10%' and '0.1' are the same fraction everywhere (in
    `curve.fractions` and as `curve.fraction_seeds` keys).
    """

    inits: dict[str, str | None]  # name -> resolved weights (None: random initialization)
    fractions: tuple[LabelSpec, ...]
    seeds: dict[LabelSpec, tuple[int, ...]]  # the seeds each fraction runs

    def cells(self) -> list[Cell]:
        return [Cell(i, f, s) for i in self.inits for f in self.fractions for s in self.seeds[f]]

    def is_first_seed(self, cell: Cell) -> bool:
        """The first seed of its (initialization, fraction): where a 'first' lr grid runs."""
        return cell.seed == self.seeds[cell.labels][0]


def cell_name(init: str, labels: str | LabelSpec, seed: int) -> str:
    text = labels.text if isinstance(labels, LabelSpec) else labels
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("%", "pct").replace("/", "per"))
    return f"{init}-{safe}-s{seed}"


def parse_grid(c: CurveConfig, inits: dict[str, str | None]) -> CurveGrid:
    """Parses every label amount before any cell runs (a bad one fails the whole grid now).

    Raises:
        LabelSubsetError: a label amount that is not one of the accepted forms.
        UserError: a fraction listed twice, or no fractions or seeds.
    """
    fractions: list[LabelSpec] = []
    for text in c.fractions:
        spec = parse_labels_spec(text)
        if spec in fractions:
            same = fractions[fractions.index(spec)].text
            raise UserError(f"curve.fractions lists one amount twice: {same!r} and {text!r}")
        fractions.append(spec)
    if not fractions or not c.seeds:
        raise UserError("curve.fractions and curve.seeds must each name at least one value")
    extra = {parse_labels_spec(k): list(v) for k, v in c.fraction_seeds.items()}
    stray = sorted(spec.text for spec in extra if spec not in fractions)
    if stray:  # a recipe's extra 1% seeds must not block `--fractions 10%,100%`
        log.warning(
            "curve.fraction_seeds names %s, which are not among curve.fractions %s: those "
            "seeds are not used",
            stray,
            list(c.fractions),
        )
    seeds = {f: tuple(extra.get(f) or c.seeds) for f in fractions}
    return CurveGrid(dict(inits), tuple(fractions), seeds)


def _cell_recipe(recipe: Recipe, grid: CurveGrid, cell: Cell, out: Path | None = None) -> Recipe:
    """The fine-tuning recipe of one cell: its initialization's recipe (`curve.init_sets`
    already applied) and, with `curve.lr_grid_seeds: first` for a seed after the first, the
    learning rate the first seed's lr grid chose, read from its results in `out`."""
    c, ft = recipe.curve, recipe.finetune
    if ft.lr_grid and c.lr_grid_seeds == "first" and not grid.is_first_seed(cell) and out:
        first = grid.seeds[cell.labels][0]
        lead = out / "cells" / cell_name(cell.init, cell.labels, first) / RESULTS_FILE
        lr = json.loads(lead.read_text()).get("lr") if lead.is_file() else None
        if lr is None:
            why = "has no lr" if lead.is_file() else "is missing"
            raise UserError(
                f"curve.lr_grid_seeds is 'first': seed {cell.seed} of {cell.init} at "
                f"{cell.labels.text} takes its learning rate from {lead}, which {why} (delete "
                "that cell's folder to run its lr grid again)"
            )
        ft = replace(ft, lr_grid=[], optim=replace(ft.optim, lr=float(lr)))
    init = grid.inits[cell.init]
    return replace(recipe, seed=cell.seed, finetune=replace(ft, labels=cell.labels.text, init=init))


def _run_cell(args: tuple[Recipe, CurveGrid, Cell, str, str, bool]) -> None:
    """One fine-tune in a worker process (when the grid is spread over GPUs)."""
    recipe, grid, cell, out, device, trust_pickle = args
    cell_recipe = _cell_recipe(recipe, grid, cell, Path(out))
    cell_dir = Path(out) / "cells" / cell.name
    finetune(
        cell_recipe, cell_dir, device=device, resume=True, quiet=True, trust_pickle=trust_pickle
    )


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
            **(json.loads(arms.read_text()) if (arms := out / ARMS_FILE).is_file() else {}),
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


def _arm_settings(recipes: dict[str, Recipe], inits: dict[str, str | None]) -> dict[str, str]:
    """How each fine-tuned arm ran, in words, for report.md."""
    out = {}
    for name, r in recipes.items():
        ft = r.finetune
        decay = ft.optim.layer_decay
        lr = f"lr grid {list(ft.lr_grid)}" if ft.lr_grid else f"lr {ft.optim.lr or 'scaled'}"
        out[name] = (
            f"fine-tuned, {lr}, layer decay {decay or 'none'}, selection '{ft.selection}', "
            f"{ft.train.epochs} epochs and at least {ft.train.min_steps} steps, batch "
            f"{ft.train.batch_size}, head {ft.head_init}"
        )
    return out


def _n_classes(out: Path, grid: CurveGrid) -> int | None:
    """How many classes the cells learned (from the first finished cell), for chance level."""
    for cell in grid.cells():
        res = out / "cells" / cell.name / RESULTS_FILE
        if res.is_file():
            return len(json.loads(res.read_text()).get("classes") or []) or None
    return None


def _init_recipes(recipe: Recipe, inits: dict[str, str | None]) -> dict[str, Recipe]:
    """Each initialization's fine-tuning recipe: `curve.init_sets` applied once, checked now
    (a bad override fails before any cell runs, not hours later)."""
    c = recipe.curve
    unknown = sorted(set(c.init_sets) - set(inits))
    if unknown:  # a recipe's settings for `domain` must not block a curve that names it `pre`
        log.warning(
            "curve.init_sets names %s, which are not among the initializations %s (--init "
            "NAME=PATH): those settings are not used",
            unknown,
            sorted(inits),
        )
    out = {}
    for name, path in inits.items():
        r = recipe
        if path is None:
            # Layer decay keeps pre-trained features near where pre-training left them (BEiT); a
            # random backbone has nothing to keep (with 0.65 over depth 12 its patch embedding
            # would train at 0.004x the head's lr). So a scratch arm trains every layer at the
            # full lr, unless its curve.init_sets ask for decay.
            r = replace(
                r, finetune=replace(r.finetune, optim=replace(r.finetune.optim, layer_decay=None))
            )
        if c.init_sets.get(name):
            r = apply_sets(r, c.init_sets[name], source=f"curve.init_sets.{name}:")
        out[name] = r
    return out


def _any_cell_started(out: Path) -> bool:
    """Whether a cell of the grid in `out` started training (then its grid is binding); a grid
    whose cells all failed before starting (bad data, impossible labels) can be replaced."""
    cells = out / "cells"
    return cells.is_dir() and any((d / "manifest.json").is_file() for d in cells.iterdir())


def _cells_provenance(out: Path, cells: Sequence[Any]) -> dict[str, Any]:
    """The data fingerprint and devices the cells recorded, for the curve's own manifest."""
    prints, devices = set(), set()
    for cell in cells:
        m = out / "cells" / cell.name / "manifest.json"
        if m.is_file():
            d = json.loads(m.read_text())
            prints.add(d.get("data_fingerprint"))
            devices.add(d.get("device"))
    prints.discard(None)
    devices.discard(None)
    out_fields: dict[str, Any] = {"cell_devices": sorted(devices)}
    if len(prints) == 1:
        out_fields["data_fingerprint"] = prints.pop()
    elif prints:  # cells that saw different data cannot be compared: say so where it is read
        out_fields["data_fingerprints"] = sorted(prints)
        log.warning("the curve's cells saw %d different data fingerprints", len(prints))
    return out_fields


def run_curve(
    recipe: Recipe,
    out: str | Path,
    *,
    device: str = "auto",
    overwrite: bool = False,
    quiet: bool = False,
    workers: int | None = None,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Runs (or continues) the grid; returns the summary and label-efficiency results.

    Args:
        recipe: `curve.fractions`, `curve.seeds`, `curve.inits` ({name: path or None}),
            `curve.metric`, and the fine-tuning settings every cell shares.
        out: run folder; re-running with the same folder continues the grid.
        workers: parallel cells; default one per visible GPU (1 on CPU).
        trust_pickle: allow pickle-based initializations (they can run code).
    """
    c = recipe.curve
    if not c.inits:
        raise UserError("curve.inits is empty: give at least one --init (e.g. --init scratch)")
    out = Path(out)
    inits = {name: resolve_init(path) for name, path in c.inits.items()}
    grid = parse_grid(c, inits)  # every label amount parsed before any cell runs
    recipes = _init_recipes(recipe, inits)
    record: dict[str, Any] = {"fractions": c.fractions, "seeds": c.seeds, "inits": inits}
    if c.init_sets:
        record["init_sets"] = {k: list(v) for k, v in c.init_sets.items()}
    if c.fraction_seeds:
        record["fraction_seeds"] = {f: list(v) for f, v in c.fraction_seeds.items()}
    if c.lr_grid_seeds != "all":
        record["lr_grid_seeds"] = c.lr_grid_seeds
    grid_file = out / "grid.json"
    # A re-run continues the grid; a folder holding anything but a curve run is refused.
    run = RunDir.open(out, kind="curve", resume=not overwrite, overwrite=overwrite, recipe=recipe)
    if grid_file.is_file():
        previous = json.loads(grid_file.read_text())
        if previous != record and _any_cell_started(out):
            run.close()
            raise UserError(
                f"{out} holds a different grid ({previous}); continue it with the same "
                f"settings, or pass --overwrite / another --out"
            )
    with run.recording_failures(), _curve_interrupts(out):
        rows = _run_cells(
            recipe, out, run, record, grid, recipes, device, quiet, workers, trust_pickle
        )
        result = write_outputs(out, rows, c, grid)
    run.finish(cells=len(rows), **_cells_provenance(out, grid.cells()))
    return {"rows": rows, **result}


@contextlib.contextmanager
def _curve_interrupts(out: Path) -> Iterator[None]:
    """Ctrl-C in a cell: the advice names what `curve` has (re-running it), not --resume."""
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"curve interrupted; finished cells are kept and the cut-off cell resumes from its "
            f"checkpoint: run the same `beitdomain curve` command with --out {out} again to "
            f"continue"
        ) from None


def _run_cells(
    recipe: Recipe,
    out: Path,
    run: RunDir,
    record: dict[str, Any],
    grid: CurveGrid,
    recipes: dict[str, Recipe],
    device: str,
    quiet: bool,
    workers: int | None,
    trust_pickle: bool,
) -> list[dict[str, Any]]:
    """Runs the cells not finished yet; returns the rows of all finished cells."""
    c = recipe.curve
    resolved = str(resolve_device(device))  # "auto" says nothing about where it ran
    run.start("curve", recipe, resolved, requested_device=device)
    atomic_write_json(out / "grid.json", record)
    atomic_write_json(out / ARMS_FILE, _arm_settings(recipes, grid.inits))
    cells = grid.cells()
    if c.baselines and not (out / BASELINES_FILE).is_file():
        # Seconds on a CPU, and on the very subsets the cells train on: before the cells, so
        # the report compares against them from the first finished cell on.
        pairs = list(dict.fromkeys((cell.labels.text, cell.seed) for cell in cells))
        rows, used = baseline_rows(recipe, grid.inits, pairs, trust_pickle=trust_pickle)
        write_csv(
            [{"labels": k[0], "seed": k[1], "path": f} for k, files in used.items() for f in files],
            out / "baselines_labels_used.csv",
        )
        write_csv(rows, out / BASELINES_FILE)
    todo = [cell for cell in cells if not (out / "cells" / cell.name / RESULTS_FILE).is_file()]
    log.info("curve: %d cells, %d done, %d to run", len(cells), len(cells) - len(todo), len(todo))
    n_gpu = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    workers = workers or max(1, n_gpu)
    if workers > 1 and todo:
        # One process per device; cells of a device run one after another in its process.
        # With lr_grid_seeds 'first' the first seeds (which run the lr grid) go first: the
        # other seeds read the learning rate they chose.
        jobs = [
            (recipes[cell.init], grid, cell, str(out), f"cuda:{k % n_gpu}" if n_gpu else "cpu")
            for k, cell in enumerate(todo)
        ]
        lead = [c.lr_grid_seeds == "all" or grid.is_first_seed(cell) for cell in todo]
        waves = [
            [(*j, trust_pickle) for j, first in zip(jobs, lead) if first],
            [(*j, trust_pickle) for j, first in zip(jobs, lead) if not first],
        ]
        with mp.get_context("spawn").Pool(workers, maxtasksperchild=1) as pool:
            for wave in waves:
                for _ in pool.imap_unordered(_run_cell, wave):
                    write_outputs(out, collect_rows(out, cells), c, grid)
    else:
        from rich.console import Console
        from rich.progress import Progress

        with Progress(disable=quiet, console=Console(stderr=True)) as bar:
            task = bar.add_task("curve cells", total=len(cells), completed=len(cells) - len(todo))
            for cell in todo:
                bar.update(
                    task,
                    description=f"curve: {cell.init} {cell.labels.text} seed {cell.seed}",
                )
                finetune(
                    _cell_recipe(recipes[cell.init], grid, cell, out),
                    out / "cells" / cell.name,
                    device=device,
                    resume=True,
                    quiet=True,
                    trust_pickle=trust_pickle,
                )
                write_outputs(out, collect_rows(out, cells), c, grid)
                bar.advance(task)
    return collect_rows(out, cells)
