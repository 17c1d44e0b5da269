"""`beitdomain curve`: the grid of fine-tunes behind a label-efficiency curve.

Cells are `Cell(init, labels, seed)` values of a `CurveGrid` parsed once (`curve_grid`). Each
cell is an ordinary fine-tuning run in `cells/<init>-<labels>-s<seed>/`; its `results.json` is
the record that the cell is done, so a re-run skips finished cells and resumes a cell that was
cut off from its newest checkpoint.
`curve.csv`, `summary.csv`, `curve.png` and `report.md` are rebuilt from the cells after each one
(`report.write_outputs`). With `finetune.task: segment` every cell is a segmentation fine-tune
(`engine.segment`, through `finetune`), `unet` is an arm, and no classical baseline runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from beitdomain.config import Recipe, apply_sets
from beitdomain.data.labeled import labeled_data
from beitdomain.data.masks import MaskClasses, segment_data
from beitdomain.data.source import image_source
from beitdomain.engine.curve.baselines import (
    BASELINES_FILE,
    baseline_rows,
    from_random_weights,
    is_unet,
)
from beitdomain.engine.curve.grid import Cell, CurveGrid, cell_name, parse_grid
from beitdomain.engine.curve.report import (
    ARMS_FILE,
    collect_rows,
    curve_metric,
    subset_warnings,
    write_outputs,
)
from beitdomain.engine.finetune import finetune, resolve_init
from beitdomain.engine.job import RESULTS_FILE
from beitdomain.engine.run.folder import OtherDataError, RunDir
from beitdomain.engine.train.distributed import resolve_device, usable_cores
from beitdomain.eval.report import write_csv
from beitdomain.fileio import atomic_write_json
from beitdomain.labels import LabelSpec, LabelSubsetError
from beitdomain.models.cnn import timm_arch
from beitdomain.progress import CountProgress
from beitdomain.user import UserError

log = logging.getLogger(__name__)


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


# A worker process's queue of free slots (set by `_init_worker` in each worker).
_FREE_SLOTS: Any = None


def cell_slots(device: str, workers: int, n_gpu: int) -> list[tuple[str, tuple[int, ...]]]:
    """Where each of `workers` parallel cells runs: (device, CPU cores to keep to).

    With GPUs, slot k gets GPU k modulo their number (no core pinning). On a CPU the cores this
    process may use are split into `workers` contiguous shares, and a cell runs with as many
    torch threads as its share has cores: on 2 cores one thread did 55-60% of two threads'
    work per demo cell, so two one-thread cells at a time got more done (BENCHMARKS.md).
    With more workers than cores, the workers share cores one each, round robin. Where the
    system has no CPU affinity (macOS) the shares are of `os.cpu_count()` and set only the
    thread counts, so that n workers do not start n times the cores' threads.
    """
    if n_gpu:
        return [(f"cuda:{k % n_gpu}", ()) for k in range(workers)]
    if device != "cpu":
        return [(device, ())] * workers
    cores = usable_cores()
    if workers > len(cores):
        return [(device, (cores[k % len(cores)],)) for k in range(workers)]
    bounds = [round(k * len(cores) / workers) for k in range(workers + 1)]
    return [(device, tuple(cores[bounds[k] : bounds[k + 1]])) for k in range(workers)]


def largest_first(cells: Sequence[Cell]) -> list[Cell]:
    """`cells` with the most labels first (stable), where their label amounts are of one kind
    (all fractions, all counts or all per-class counts); otherwise in their grid order.

    A fine-tune's time grows with its labels (at the demo's size a 100% cell takes 3-4 times a
    1% one), so with the largest first the workers finish together."""
    if len({cell.labels.kind for cell in cells}) != 1:
        return list(cells)
    return sorted(cells, key=lambda cell: -cell.labels.value)


def _init_worker(free_slots: Any) -> None:
    global _FREE_SLOTS
    _FREE_SLOTS = free_slots


def _run_cell(args: tuple[Recipe, CurveGrid, Cell, str, bool]) -> None:
    """One fine-tune in a worker process, in a slot no other running cell holds: a slot is
    taken when the cell starts and given back when it ends, so a cell never shares a GPU (or
    its cores) with another while one stands idle."""
    recipe, grid, cell, out, trust_pickle = args
    device, cores = _FREE_SLOTS.get()
    try:
        if cores:
            if hasattr(os, "sched_setaffinity"):  # not on macOS: the thread count alone
                os.sched_setaffinity(0, cores)
            torch.set_num_threads(len(cores))
        cell_recipe = _cell_recipe(recipe, grid, cell, Path(out))
        cell_dir = Path(out) / "cells" / cell.name
        _finetune_cell(cell_recipe, cell_dir, device=device, trust_pickle=trust_pickle)
    finally:
        _FREE_SLOTS.put((device, cores))


def _finetune_cell(recipe: Recipe, cell_dir: Path, *, device: str, trust_pickle: bool) -> None:
    """One cell's fine-tune, resumed where a previous curve run cut it off. A cell cut off on
    other data than it reads now is refused with the curve's own advice: `curve` has no
    --resume-other-data, and mixing two data sets inside one cell would mislabel the curve."""
    try:
        finetune(
            recipe, cell_dir, device=device, resume=True, quiet=True, trust_pickle=trust_pickle
        )
    except OtherDataError:
        raise UserError(
            f"curve cell {cell_dir.name} was cut off while training on other data than the "
            "curve reads now (the data fingerprint in its manifest differs): run the curve "
            "again on the data it started with, or give it a new --out"
        ) from None


def _arm_settings(
    recipes: dict[str, Recipe], inits: dict[str, str | None]
) -> dict[str, dict[str, str]]:
    """How each fine-tuned arm is set to run, for report.md: its settings and the recipe's
    schedule (the report states the steps the cells ran instead, once they have run)."""
    out = {}
    for name, r in recipes.items():
        ft = r.finetune
        decay = ft.optim.layer_decay
        lr = f"lr grid {list(ft.lr_grid)}" if ft.lr_grid else f"lr {ft.optim.lr or 'scaled'}"
        tr = ft.train
        schedule = (  # train.steps overrides epochs and min_steps
            f"{tr.steps} steps"
            if tr.steps
            else f"{tr.epochs} epochs and at least {tr.min_steps} steps"
        )
        if ft.task == "segment":  # no classification head; the network is what differs
            net = (
                "MONAI's U-Net from random weights"
                if is_unet(inits[name])
                else f"BEiT segmenter ({r.segment.decoder} decoder, "
                f"{r.segment.decoder_channels} channels)"
            )
            how = f"{net}, fine-tuned, {lr}, layer decay {decay or 'none'}"
            settings = f"{how}, selection '{ft.selection}', batch {tr.batch_size}"
        else:
            settings = (
                f"fine-tuned, {lr}, layer decay {decay or 'none'}, selection "
                f"'{ft.selection}', batch {tr.batch_size}, head {ft.head_init}"
            )
        if ft.ema:  # the cells keep an average of their weights, not the last step's
            settings += f", weight average (EMA) decay {ft.ema}"
        out[name] = {"settings": settings, "schedule": schedule}
    return out


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
        if from_random_weights(path):
            # A random backbone (or the U-Net) trains without layer decay (finetune does the
            # same on its own; said here so arms.json and report.md show it).
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


def check_cells(recipes: dict[str, Recipe], grid: CurveGrid) -> dict[LabelSpec, dict[str, Any]]:
    """Draws every label amount's subset once (its first seed), before anything is written,
    so an amount the data cannot hold ('1%' of 28 images) refuses the whole curve at once
    instead of after the baselines, in a half-written folder. Warns where whole groups (or
    one image per class) make a subset larger than asked, and where a split holds under 3
    groups: the curve's cells run quietly, so this is where the user reads it.

    Returns:
        label amount -> its subset (`LabeledData.subset`: n_labels, n_train, fraction, splits).

    Raises:
        UserError / LabelSubsetError: unlabelled data, an amount the data cannot hold (named),
            a subset without an image of some class.
    """
    subsets: dict[LabelSpec, dict[str, Any]] = {}
    refused: dict[LabelSpec, str] = {}  # amount -> why the data cannot hold it
    checked: set[tuple[str, str]] = set()
    # The data's own warnings (skipped files, the split) come again from the baselines and the
    # cells, which read the same data; and the quarantine report of unreadable files goes to a
    # scratch folder (each cell writes its own): nothing is written outside --out, nor inside
    # it before every check has passed.
    data_log = logging.getLogger("beitdomain.data")
    level = data_log.level
    data_log.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="beitdomain-check-") as scratch:
            scanned: list[tuple[Any, Any]] = []
            for r in recipes.values() if grid.task != "segment" else ():
                r = _scanned_once(r, Path(scratch), scanned)
                for spec in grid.fractions:
                    key = (spec.text, r.finetune.selection)
                    if key in checked:
                        continue
                    checked.add(key)
                    try:
                        ld = labeled_data(
                            r,
                            labels=spec.text,
                            seed=grid.seeds[spec][0],
                            progress=False,
                            report_dir=Path(scratch),
                            selection=r.finetune.selection,
                        )
                    except LabelSubsetError as e:
                        refused.setdefault(spec, str(e))
                        continue
                    subsets.setdefault(spec, ld.subset)
                    missing = [c for c, k in ld.subset["per_class"].items() if k == 0]
                    if missing:  # its cells could not learn the class, its baselines not fit
                        refused.setdefault(
                            spec,
                            f"labels {spec.text}: the subset of seed {grid.seeds[spec][0]} "
                            f"holds no image of {', '.join(missing)} ({ld.subset['n_labels']} "
                            "images, whole groups kept together)",
                        )
            if grid.task == "segment":
                subsets, refused = _segment_subsets(recipes, grid)
    finally:
        data_log.setLevel(level)
    if refused:
        raise UserError(_refusal(grid, refused))
    said = dict.fromkeys(
        w for spec, sub in subsets.items() for w in subset_warnings(spec.text, sub, task=grid.task)
    )
    for line in said:  # a split's warning holds for every amount: once
        log.warning("curve: %s", line)
    return subsets


def _segment_subsets(
    recipes: dict[str, Recipe], grid: CurveGrid
) -> tuple[dict[LabelSpec, dict[str, Any]], dict[LabelSpec, str]]:
    """`check_cells` for a segmentation curve: each label amount's subset of annotated images
    drawn as its cells draw it (`data.masks.segment_data`, which reads and checks every
    (image, mask) pair first: a bad mask refuses the curve before --out is written).

    Returns:
        (label amount -> its subset, label amount -> why the data cannot hold it).
    """
    subsets: dict[LabelSpec, dict[str, Any]] = {}
    refused: dict[LabelSpec, str] = {}
    checked: set[tuple[str, str]] = set()
    for r in recipes.values():
        classes = MaskClasses.from_config(r.segment)
        for spec in grid.fractions:
            key = (spec.text, r.finetune.selection)
            if key in checked:
                continue
            checked.add(key)
            cell = replace(r, finetune=replace(r.finetune, labels=spec.text))
            try:
                sd = segment_data(cell, classes, seed=grid.seeds[spec][0])
            except LabelSubsetError as e:
                refused.setdefault(spec, str(e))
                continue
            subsets.setdefault(spec, sd.subset)
    return subsets, refused


def _scanned_once(r: Recipe, scratch: Path, scanned: list[tuple[Any, Any]]) -> Recipe:
    """`r` reading a manifest of its folder scanned once into `scratch` (a folder of DICOMs
    takes seconds to minutes to scan, and every label amount is drawn from it); a cache or a
    manifest is read as it is. `scanned`: (data settings, their manifest's data settings)."""
    d = r.data
    if d.cache or d.manifest or not d.root:
        return r
    done = next((m for data, m in scanned if data == d), None)
    if done is None:
        source, _ = image_source(r, progress=False, report_dir=scratch)
        path = scratch / f"manifest-{len(scanned)}.jsonl"
        source.manifest.save(path)
        done = replace(d, manifest=str(path))
        scanned.append((d, done))
    return replace(r, data=done)


def _refusal(grid: CurveGrid, refused: dict[LabelSpec, str]) -> str:
    """The first amount's reason, and the --fractions this data holds among those asked."""
    first = next(iter(refused.values())).rstrip(".")
    held = [spec.text for spec in grid.fractions if spec not in refused]
    if held:
        advice = (
            f"of curve.fractions {[s.text for s in grid.fractions]} this data holds "
            f"{held}: run with --fractions {','.join(held)}, or add counts such as 1/class"
        )
    else:
        advice = (
            "this data holds none of curve.fractions: give counts, e.g. --fractions "
            "1/class,4/class,100%"
        )
    return f"curve: {first}; {advice}"


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
        workers: cells at a time; default `curve.workers`, else one per visible GPU (1 on
            a CPU). On a CPU the workers split the cores between them.
        trust_pickle: allow pickle-based initializations (they can run code).
    """
    c = recipe.curve
    if not c.inits:
        raise UserError("curve.inits is empty: give at least one --init (e.g. --init scratch)")
    out = Path(out)
    task = recipe.finetune.task
    inits = {name: _resolve_arm(name, path, task) for name, path in c.inits.items()}
    curve_metric(c, task)  # a metric of the task's, refused before anything is written
    grid = parse_grid(c, inits, task)  # every label amount parsed before any cell runs
    recipes = _init_recipes(recipe, inits)
    record: dict[str, Any] = {"fractions": c.fractions, "seeds": c.seeds, "inits": inits}
    if task != "classify":  # a classification grid's record stays as before (it resumes)
        record["task"] = task
    if c.init_sets:
        record["init_sets"] = {k: list(v) for k, v in c.init_sets.items()}
    if c.fraction_seeds:
        record["fraction_seeds"] = {f: list(v) for f, v in c.fraction_seeds.items()}
    if c.lr_grid_seeds != "all":
        record["lr_grid_seeds"] = c.lr_grid_seeds
    grid_file = out / "grid.json"
    # Everything is checked before the folder is created or changed (as every job does): a
    # re-run continues the grid; a folder holding anything but a curve run, a different grid,
    # or a label amount the data cannot hold leaves --out as it found it.
    RunDir.check(out, kind="curve", resume=not overwrite, overwrite=overwrite, recipe=recipe)
    if not overwrite and grid_file.is_file():  # --overwrite deletes the old grid
        previous = json.loads(grid_file.read_text())
        if previous != record and _any_cell_started(out):
            raise UserError(
                f"{out} holds a different grid ({previous}); continue it with the same "
                f"settings, or pass --overwrite / another --out"
            )
    check_cells(recipes, grid)
    run = RunDir.open(out, kind="curve", resume=not overwrite, overwrite=overwrite, recipe=recipe)
    with run.recording_failures(), _curve_interrupts(out):
        rows = _run_cells(
            recipe, out, run, record, grid, recipes, device, quiet, workers, trust_pickle
        )
        result = write_outputs(out, rows, c, grid)
    run.finish(cells=len(rows), **_cells_provenance(out, grid.cells()))
    return {"rows": rows, **result}


def _resolve_arm(name: str, init: str | None, task: str) -> str | None:
    """What an arm's cells load (`resolve_init`); `unet` (MONAI's U-Net from random weights)
    for a segmentation curve, where a timm classifier has no place."""
    if is_unet(init):
        if task != "segment":
            raise UserError(
                f"curve.inits.{name}={init}: MONAI's U-Net is a segmentation arm: it needs "
                "finetune.task=segment (masks as labels: `beitdomain curve --task segment`), "
                "or give a classifier's init"
            )
        return "unet"
    resolved = resolve_init(init)
    if task == "segment" and resolved is not None and timm_arch(resolved) is not None:
        raise UserError(
            f"curve.inits.{name}={init}: a timm network is a classifier; a segmentation curve "
            "takes scratch, a pretrain run folder, BEiT weights, or unet (MONAI's U-Net from "
            "scratch, the arm without pre-training a practitioner would train)"
        )
    return resolved


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
    if c.baselines and grid.task == "segment":
        # A logistic regression on pixels or frozen features labels whole images; a mask has
        # no such arm here (report.md says so rather than showing one).
        log.info("curve: no classical baselines for a segmentation curve (they classify images)")
    elif c.baselines and not (out / BASELINES_FILE).is_file():
        # Seconds on a CPU, and on the very subsets the cells train on: before the cells, so
        # the report compares against them from the first finished cell on.
        pairs = list(dict.fromkeys((cell.labels.text, cell.seed) for cell in cells))
        rows, used = baseline_rows(
            recipe, grid.inits, pairs, trust_pickle=trust_pickle, quiet=quiet, report_dir=out
        )
        write_csv(
            [{"labels": k[0], "seed": k[1], "path": f} for k, files in used.items() for f in files],
            out / "baselines_labels_used.csv",
        )
        write_csv(rows, out / BASELINES_FILE)
    todo = [cell for cell in cells if not (out / "cells" / cell.name / RESULTS_FILE).is_file()]
    log.info("curve: %d cells, %d done, %d to run", len(cells), len(cells) - len(todo), len(todo))
    n_gpu = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    workers = workers or c.workers or max(1, n_gpu)
    with CountProgress("curve cells", len(cells), start=len(cells) - len(todo), quiet=quiet) as bar:
        if workers > 1 and todo:
            # With lr_grid_seeds 'first' the first seeds (which run the lr grid) go first: the
            # other seeds read the learning rate they chose.
            # Within a wave the longest cells start first, so that the last one to finish
            # does not run alone while the other workers wait (longest-processing-time order).
            order = largest_first(todo)
            lead = [c.lr_grid_seeds == "all" or grid.is_first_seed(cell) for cell in order]
            jobs = [(recipes[cell.init], grid, cell, str(out), trust_pickle) for cell in order]
            waves = [
                [j for j, first in zip(jobs, lead) if first],
                [j for j, first in zip(jobs, lead) if not first],
            ]
            ctx = mp.get_context("spawn")
            free_slots = ctx.Queue()
            for slot in cell_slots(resolved, workers, n_gpu):
                free_slots.put(slot)
            bar.describe(f"curve cells ({workers} at a time)")
            with ctx.Pool(workers, _init_worker, (free_slots,)) as pool:
                for wave in waves:
                    for _ in pool.imap_unordered(_run_cell, wave):
                        write_outputs(out, collect_rows(out, cells), c, grid)
                        bar.advance()
        else:
            for cell in todo:
                bar.describe(f"curve: {cell.init} {cell.labels.text} seed {cell.seed}")
                _finetune_cell(
                    _cell_recipe(recipes[cell.init], grid, cell, out),
                    out / "cells" / cell.name,
                    device=device,
                    trust_pickle=trust_pickle,
                )
                write_outputs(out, collect_rows(out, cells), c, grid)
                bar.advance()
    return collect_rows(out, cells)
