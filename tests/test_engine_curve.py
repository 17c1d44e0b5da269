"""`run_curve`: a tiny grid finishes with all four outputs; an interrupted grid re-runs only the
cells that were missing."""

from __future__ import annotations

import csv
import json
import logging
import queue

import pytest
import torch
from helpers import FINETUNE_SETS, PRETRAIN_SETS, recipe, write_separable_set
from PIL import Image

import beitdomain.engine.curve.run as curve_engine
from beitdomain.engine.curve.grid import Cell, cell_name, parse_grid
from beitdomain.engine.curve.run import run_curve
from beitdomain.engine.pretrain import pretrain
from beitdomain.engine.run.checkpoint import CheckpointManager
from beitdomain.engine.train.loop import Trainer

FRACTIONS = ["50%", "100%"]


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Stripes data and a 2-step pixel-target pre-training run as the 'domain' init."""
    tmp = tmp_path_factory.mktemp("curve")
    root = write_separable_set(tmp / "data", per_class=12)
    pre = recipe(
        [*PRETRAIN_SETS, "pretrain.train.steps=2", "model.target=pixels"],
        **{"data.root": str(root)},
    )
    pretrain(pre, tmp / "pre", device="cpu", quiet=True)
    return root, tmp / "pre"


def _curve_recipe(root, pre, seeds=(0,), baselines=False):
    return recipe(
        [*FINETUNE_SETS, "finetune.train.steps=4", "finetune.train.ckpt_every=2"],
        **{
            "data.root": str(root),
            "curve.fractions": FRACTIONS,
            "curve.seeds": list(seeds),
            "curve.inits": {"scratch": None, "domain": str(pre)},
            "curve.metric": "accuracy",
            "curve.baselines": baselines,  # the fine-tuned cells alone (see the baselines test)
        },
    )


def _results(out):
    return {p.parent.name: p for p in (out / "cells").glob("*/results.json")}


@pytest.fixture(scope="module")
def grid(setup, tmp_path_factory):
    """The 2 fractions x 1 seed x {scratch, domain} grid, cut off in its third cell right after
    that cell's first checkpoint (no results yet), then run again to completion, then once more.
    Records which cells each run fine-tuned and the finished cells' mtimes."""
    root, pre = setup
    out = tmp_path_factory.mktemp("grid") / "curve"
    real = curve_engine.finetune
    calls: list[str] = []

    def dies_in_third_cell(r, cell_dir, **kw):
        calls.append(cell_dir.name)
        if len(calls) != 3:
            return real(r, cell_dir, **kw)
        save = Trainer.save_checkpoint

        def save_then_die(self):
            save(self)
            raise KeyboardInterrupt("simulated kill after the first checkpoint")

        with pytest.MonkeyPatch.context() as inner:
            inner.setattr(Trainer, "save_checkpoint", save_then_die)
            return real(r, cell_dir, **kw)

    record: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(curve_engine, "finetune", dies_in_third_cell)
        with pytest.raises(KeyboardInterrupt):
            run_curve(_curve_recipe(root, pre), out, device="cpu", quiet=True)
        record["first"] = list(calls)
        cut = out / "cells" / calls[2]
        record["cut_checkpoints"] = CheckpointManager(cut / "checkpoints").steps()
        record["done_after_kill"] = {n: p.stat().st_mtime_ns for n, p in _results(out).items()}
        record["rows_after_kill"] = len(_rows(out / "curve.csv"))
        calls.clear()
        record["result"] = run_curve(_curve_recipe(root, pre), out, device="cpu", quiet=True)
        record["second"] = list(calls)
        calls.clear()
        run_curve(_curve_recipe(root, pre), out, device="cpu", quiet=True)
        record["third"] = list(calls)
    return out, record


def test_tiny_grid_writes_all_outputs(grid):
    out, record = grid
    result = record["result"]
    rows = _rows(out / "curve.csv")
    cells = {(r["init"], r["labels"], r["seed"]) for r in rows}
    assert cells == {(i, f, "0") for i in ("scratch", "domain") for f in FRACTIONS}
    assert len(rows) == 4 and len(result["rows"]) == 4
    for r in rows:
        # the realised fraction of the train split
        assert float(r["fraction"]) == pytest.approx(int(r["n_labels"]) / int(r["n_train"]))
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and int(r["steps"]) == 4
    half = {int(r["n_labels"]) for r in rows if r["labels"] == "50%"}
    full = {int(r["n_labels"]) for r in rows if r["labels"] == "100%"}
    assert len(half) == 1 and len(full) == 1 and half.pop() < full.pop()  # same subset per init
    summary = _rows(out / "summary.csv")
    assert len(summary) == 4
    fractions = {float(r["fraction"]) for r in rows}
    assert {(s["init"], float(s["fraction"])) for s in summary} == {
        (i, f) for i in ("scratch", "domain") for f in fractions
    }
    assert all(s["n_runs"] == "1" for s in summary)
    for s in summary:  # the mean of one seed is that seed's value
        (row,) = [r for r in rows if (r["init"], r["fraction"]) == (s["init"], s["fraction"])]
        assert float(s["accuracy_mean"]) == pytest.approx(float(row["accuracy"]))
    with Image.open(out / "curve.png") as im:
        im.verify()
    with Image.open(out / "curve.png") as im:
        assert im.width >= 300 and im.height >= 200
    assert (out / "curve.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "domain" in report and "scratch" in report and "curve.png" in report
    # the paired table: one seed per cell, so one gain and no standard error per fraction
    by = {(r["init"], r["fraction"]): float(r["accuracy"]) for r in rows}
    gain = 100 * (by[("domain", rows[0]["fraction"])] - by[("scratch", rows[0]["fraction"])])
    assert "## Paired by seed: domain vs scratch" in report
    assert f"| 1 | {gain:+.1f} | " in report
    expected = {cell_name(i, f, 0) for i in ("scratch", "domain") for f in FRACTIONS}
    assert set(_results(out)) == expected


def test_interrupted_grid_reruns_only_missing_cells(grid):
    out, record = grid
    assert len(record["first"]) == 3 and len(record["done_after_kill"]) == 2
    assert record["rows_after_kill"] == 2  # outputs are rebuilt after every finished cell
    # the re-run fine-tuned exactly the two missing cells (the cut-off one among them)
    assert sorted(record["second"]) == sorted(
        set(record["first"][2:]) | (set(_results(out)) - set(record["first"]))
    )
    assert len(record["second"]) == 2 and not set(record["second"]) & set(record["done_after_kill"])
    after = _results(out)
    for name, mtime in record["done_after_kill"].items():
        assert after[name].stat().st_mtime_ns == mtime, f"{name} was re-run"
    assert record["third"] == []  # nothing left to do
    # the cut-off cell held its step-2 checkpoint and was resumed from it, not restarted
    assert record["cut_checkpoints"] == [2]
    cut = json.loads((out / "cells" / record["first"][2] / "manifest.json").read_text())
    assert len(cut["starts"]) == 2 and cut["status"] == "completed"


def test_a_different_grid_in_the_same_folder_is_refused(grid, setup):
    from beitdomain.user import UserError

    out, _ = grid
    root, pre = setup
    r = _curve_recipe(root, pre)
    r.curve.fractions = ["100%"]
    with pytest.raises(UserError, match="different grid"):
        run_curve(r, out, device="cpu", quiet=True)


def test_init_sets_fine_tune_each_initialization_with_its_own_settings(setup, tmp_path):
    # curve.init_sets gives one initialization its own fine-tuning settings; the cells' saved
    # recipes show them, the other initialization keeps the shared ones, the report names them.
    import yaml

    root, pre = setup
    r = _curve_recipe(root, pre)
    r.curve.fractions = ["100%"]
    r.curve.init_sets = {"domain": ["finetune.optim.lr=1.0e-4", "finetune.head_init=probe"]}
    out = tmp_path / "curve"
    run_curve(r, out, device="cpu", quiet=True)
    dom = yaml.safe_load(
        (out / "cells" / cell_name("domain", "100%", 0) / "recipe.yaml").read_text()
    )
    scr = yaml.safe_load(
        (out / "cells" / cell_name("scratch", "100%", 0) / "recipe.yaml").read_text()
    )
    assert dom["finetune"]["optim"]["lr"] == 1.0e-4 and dom["finetune"]["head_init"] == "probe"
    assert scr["finetune"]["optim"]["lr"] == r.finetune.optim.lr
    assert scr["finetune"]["head_init"] == "random"
    assert (out / "cells" / cell_name("domain", "100%", 0) / "head_probe.json").is_file()
    report = (out / "report.md").read_text()
    assert "fine-tuned with finetune.optim.lr=1.0e-4, finetune.head_init=probe" in report
    grid = json.loads((out / "grid.json").read_text())
    assert grid["init_sets"] == {"domain": r.curve.init_sets["domain"]}


def test_init_sets_are_checked_before_any_cell_runs(setup, tmp_path, monkeypatch, caplog):
    from beitdomain.config import RecipeError

    root, pre = setup
    r = _curve_recipe(root, pre)
    r.curve.init_sets = {"domain": ["finetune.optim.lrr=1e-4"]}
    with pytest.raises(RecipeError, match="curve.init_sets.domain.*Did you mean 'lr'"):
        run_curve(r, tmp_path / "b", device="cpu", quiet=True)
    assert not (tmp_path / "b" / "cells").exists()
    # Settings for an initialization this curve does not have (a recipe's `domain`, a curve
    # that calls it `pre`) are named in a warning and left unused; the cells still run.
    r.curve.init_sets = {"imagenet": ["finetune.optim.lrr=1e-4"]}
    r.curve.inits = {"scratch": None}
    r.curve.fractions = ["100%"]
    ran = []
    monkeypatch.setattr(curve_engine, "finetune", lambda rr, d, **kw: ran.append(rr))
    with caplog.at_level("WARNING"):
        run_curve(r, tmp_path / "a", device="cpu", quiet=True)
    assert "['imagenet']" in caplog.text and "not used" in caplog.text
    assert len(ran) == 1 and ran[0].finetune.optim.lr == r.finetune.optim.lr


def test_fraction_seeds_run_more_seeds_where_asked(setup, tmp_path, monkeypatch, caplog):
    root, pre = setup
    r = _curve_recipe(root, pre)
    r.curve.inits = {"scratch": None}
    r.curve.fraction_seeds = {"50%": [0, 1, 2]}
    out = tmp_path / "curve"
    run_curve(r, out, device="cpu", quiet=True)
    assert sorted(_results(out)) == sorted(
        [cell_name("scratch", "50%", s) for s in (0, 1, 2)] + [cell_name("scratch", "100%", 0)]
    )
    runs = {row["fraction"]: row["n_runs"] for row in _rows(out / "summary.csv")}
    assert sorted(runs.values()) == ["1", "3"]
    assert "at 50%: 0, 1, 2 (3)" in (out / "report.md").read_text()
    # A fraction the curve does not run (a recipe's 1% seeds, --fractions 50%,100%): warned
    # about, not used.
    r.curve.fraction_seeds = {"5%": [0, 1]}
    ran = []
    monkeypatch.setattr(curve_engine, "finetune", lambda rr, d, **kw: ran.append(d.name))
    with caplog.at_level("WARNING"):
        run_curve(r, tmp_path / "other", device="cpu", quiet=True)
    assert "['5%']" in caplog.text and "not used" in caplog.text
    assert sorted(ran) == [cell_name("scratch", f, 0) for f in ("100%", "50%")]


def _lr_grid_first(setup):
    """Scratch at 100%, seeds 0 and 1, an lr grid [0, 2e-3] and curve.lr_grid_seeds 'first';
    the shared lr (5e-4) is in neither, so a follower that ran at it would show."""
    root, pre = setup
    r = _curve_recipe(root, pre, seeds=(0, 1))
    r.curve.fractions = ["100%"]
    r.curve.inits = {"scratch": None}
    r.curve.init_sets = {"scratch": ["finetune.lr_grid=[0.0, 2.0e-3]"]}
    r.curve.lr_grid_seeds = "first"
    r.finetune.optim.lr = 5.0e-4
    r.finetune.selection = "outside"  # an lr grid needs a validation split to choose on
    return r


def test_lr_grid_seeds_first_tunes_once_per_fraction(setup, tmp_path):
    # With curve.lr_grid_seeds 'first', seed 0 runs the lr grid and seed 1 fine-tunes once at
    # the lr seed 0's validation split chose, not at the shared finetune.optim.lr.
    import yaml

    from beitdomain.data.splits import parse_labels_spec
    from beitdomain.user import UserError

    r, out = _lr_grid_first(setup), tmp_path / "curve"
    run_curve(r, out, device="cpu", quiet=True)
    lead, follower = (out / "cells" / cell_name("scratch", "100%", s) for s in (0, 1))
    assert sorted(p.name for p in lead.glob("lr-*")) == ["lr-0", "lr-0.002"]
    chosen = json.loads((lead / "results.json").read_text())["lr"]
    assert chosen in (0.0, 2.0e-3)
    assert not list(follower.glob("lr-*"))
    saved = yaml.safe_load((follower / "recipe.yaml").read_text())["finetune"]
    assert saved["optim"]["lr"] == chosen and saved["lr_grid"] == []
    assert json.loads((follower / "results.json").read_text())["lr"] == chosen
    assert [float(row["lr"]) for row in _rows(out / "curve.csv")] == [chosen, chosen]
    assert f"scratch {chosen:.0e} (all) (where an lr grid ran" in (out / "report.md").read_text()
    assert json.loads((out / "grid.json").read_text())["lr_grid_seeds"] == "first"
    # A follower whose first seed has no result cannot guess its lr: a clear error.
    (lead / "results.json").unlink()
    with pytest.raises(UserError, match="takes its learning rate from .*is missing"):
        grid = parse_grid(r.curve, {"scratch": None})
        follower = Cell("scratch", parse_labels_spec("100%"), 1)
        scratch = curve_engine._init_recipes(r, grid.inits)["scratch"]
        curve_engine._cell_recipe(scratch, grid, follower, out)


def test_lr_grid_seeds_first_across_worker_processes(setup, tmp_path):
    # With parallel workers the first seeds run in a wave of their own, so the other seeds find
    # the lr they chose (two CPU worker processes, from the recipe's curve.workers).
    from dataclasses import replace

    import yaml

    r, out = _lr_grid_first(setup), tmp_path / "curve"
    run_curve(replace(r, curve=replace(r.curve, workers=2)), out, device="cpu", quiet=True)
    lead, follower = (out / "cells" / cell_name("scratch", "100%", s) for s in (0, 1))
    # Each worker ran on its share of the cores, one torch thread per core.
    slots = curve_engine.cell_slots("cpu", 2, 0)
    shares = {len(c) for _, c in slots if c} or {torch.get_num_threads()}
    for cell in (lead, follower):
        assert json.loads((cell / "manifest.json").read_text())["cpu_threads"] in shares
    chosen = json.loads((lead / "results.json").read_text())["lr"]
    assert chosen in (0.0, 2.0e-3) and not list(follower.glob("lr-*"))
    saved = yaml.safe_load((follower / "recipe.yaml").read_text())["finetune"]
    assert saved["optim"]["lr"] == chosen and saved["lr_grid"] == []


def test_grid_is_typed_and_parsed_before_any_cell(tmp_path, monkeypatch):
    # '10%' and '0.1' are one label amount (as fractions and as fraction_seeds keys); a bad
    # amount anywhere in the list fails before the first cell trains.
    from beitdomain.config import RecipeError, load_recipe
    from beitdomain.data.splits import LabelSubsetError, parse_labels_spec

    c = load_recipe(
        sets=[
            "curve.fractions=['0.1', '100%']",
            "curve.seeds=[0]",
            "curve.fraction_seeds={'10%': [0, 1]}",
        ]
    ).curve
    grid = parse_grid(c, {"scratch": None})
    ten = parse_labels_spec("10%")
    assert grid.fractions[0] == ten and hash(grid.fractions[0]) == hash(ten)
    assert grid.seeds[ten] == (0, 1)
    cells = grid.cells()
    assert [(x.init, x.labels.text, x.seed) for x in cells] == [
        ("scratch", "0.1", 0),
        ("scratch", "0.1", 1),
        ("scratch", "100%", 0),
    ]
    assert [grid.is_first_seed(x) for x in cells] == [True, False, True]
    assert cells[0].name == cell_name("scratch", "0.1", 0)
    c.fractions = ["10%", "0.1"]
    with pytest.raises(Exception, match="twice"):
        parse_grid(c, {"scratch": None})

    ran = []
    monkeypatch.setattr(curve_engine, "finetune", lambda r, d, **kw: ran.append(d))
    # the recipe refuses it as it loads; a recipe changed in code after loading, at run_curve
    with pytest.raises(RecipeError, match="'abc'"):
        load_recipe(sets=["curve.fractions=['100%', 'abc']", "curve.inits={scratch: null}"])
    r = load_recipe(sets=["curve.inits={scratch: null}"])
    r.curve.fractions = ["100%", "abc"]
    with pytest.raises(LabelSubsetError, match="'abc'"):
        run_curve(r, tmp_path / "c", device="cpu", quiet=True)
    assert ran == [] and not (tmp_path / "c").exists()


def test_a_worker_receives_a_recipe_not_a_file_and_runs_in_a_free_slot(monkeypatch, tmp_path):
    # The worker's argument pickles as it is (spawn), and it holds the Recipe object itself.
    # The cell takes a free slot (device, cores) for its run, keeps to the slot's cores with
    # one torch thread per core, and gives the slot back, also when the fine-tune fails.
    import pickle

    from beitdomain.config import Recipe, load_recipe

    r = load_recipe(sets=["curve.fractions=['100%']", "curve.seeds=[0]"])
    grid = parse_grid(r.curve, {"scratch": None})
    (cell,) = grid.cells()
    args = (r, grid, cell, str(tmp_path), False)
    free = queue.Queue()
    free.put(("cpu", (5, 7)))
    monkeypatch.setattr(curve_engine, "_FREE_SLOTS", free)
    pinned, threads, seen = [], [], []
    monkeypatch.setattr(curve_engine.os, "sched_setaffinity", lambda pid, c: pinned.append(c))
    monkeypatch.setattr(curve_engine.torch, "set_num_threads", threads.append)
    monkeypatch.setattr(curve_engine, "finetune", lambda rr, d, **kw: seen.append((rr, d, kw)))
    curve_engine._run_cell(pickle.loads(pickle.dumps(args)))
    (got, folder, kw) = seen[0]
    assert isinstance(got, Recipe) and got.finetune.labels == "100%" and got.seed == 0
    assert folder == tmp_path / "cells" / cell.name and kw["trust_pickle"] is False
    assert kw["device"] == "cpu" and pinned == [(5, 7)] and threads == [2]
    assert free.get_nowait() == ("cpu", (5, 7))

    def fail(*a, **kw):
        raise RuntimeError("out of memory")

    free.put(("cuda:1", ()))
    monkeypatch.setattr(curve_engine, "finetune", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        curve_engine._run_cell(args)
    assert free.get_nowait() == ("cuda:1", ()) and pinned == [(5, 7)] and threads == [2]


def test_cell_slots_split_the_cores_or_take_a_gpu_each(monkeypatch):
    monkeypatch.setattr(curve_engine.os, "sched_getaffinity", lambda pid: {3, 0, 1, 2})
    assert curve_engine.cell_slots("cpu", 2, 0) == [("cpu", (0, 1)), ("cpu", (2, 3))]
    assert curve_engine.cell_slots("cpu", 3, 0) == [("cpu", (0,)), ("cpu", (1, 2)), ("cpu", (3,))]
    six = [c for _, c in curve_engine.cell_slots("cpu", 6, 0)]
    assert six == [(0,), (1,), (2,), (3,), (0,), (1,)]
    assert curve_engine.cell_slots("cpu", 3, 2) == [("cuda:0", ()), ("cuda:1", ()), ("cuda:0", ())]
    assert curve_engine.cell_slots("mps", 2, 0) == [("mps", ()), ("mps", ())]


def test_without_cpu_affinity_the_workers_split_the_thread_count(monkeypatch, tmp_path):
    # macOS has no sched_getaffinity/sched_setaffinity: two workers on 8 cores take 4 threads
    # each, unpinned, instead of 8 each.
    monkeypatch.delattr(curve_engine.os, "sched_getaffinity", raising=False)
    monkeypatch.delattr(curve_engine.os, "sched_setaffinity", raising=False)
    monkeypatch.setattr(curve_engine.os, "cpu_count", lambda: 8)
    slots = curve_engine.cell_slots("cpu", 2, 0)
    assert slots == [("cpu", (0, 1, 2, 3)), ("cpu", (4, 5, 6, 7))]

    from beitdomain.config import load_recipe

    r = load_recipe(sets=["curve.fractions=['100%']", "curve.seeds=[0]"])
    grid = parse_grid(r.curve, {"scratch": None})
    (cell,) = grid.cells()
    free = queue.Queue()
    free.put(slots[1])
    monkeypatch.setattr(curve_engine, "_FREE_SLOTS", free)
    threads = []
    monkeypatch.setattr(curve_engine.torch, "set_num_threads", threads.append)
    monkeypatch.setattr(curve_engine, "finetune", lambda *a, **kw: None)
    curve_engine._run_cell((r, grid, cell, str(tmp_path), False))
    assert threads == [4] and free.get_nowait() == slots[1]


def test_parallel_cells_start_with_the_most_labels():
    from beitdomain.config import load_recipe

    sets = ["curve.fractions=['1%', '100%', '10%']", "curve.seeds=[0, 1]"]
    cells = parse_grid(load_recipe(sets=sets).curve, {"a": None, "b": None}).cells()
    order = curve_engine.largest_first(cells)
    assert [c.labels.text for c in order] == ["100%"] * 4 + ["10%"] * 4 + ["1%"] * 4
    ones = [c for c in cells if c.labels.text == "1%"]
    assert [c for c in order if c.labels.text == "1%"] == ones
    # Amounts of different kinds do not compare: the grid's order stays.
    sets = ["curve.fractions=['5/class', '100%', '20']", "curve.seeds=[0]"]
    mixed = parse_grid(load_recipe(sets=sets).curve, {"a": None}).cells()
    assert curve_engine.largest_first(mixed) == mixed


def test_the_curve_manifest_records_the_device_used_and_the_data(grid):
    out, _ = grid
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["device"] == "cpu" and manifest["requested_device"] == "cpu"
    cell = json.loads((out / "cells" / next(iter(_results(out))) / "manifest.json").read_text())
    assert manifest["data_fingerprint"] == cell["data_fingerprint"] is not None
    assert manifest["cell_devices"] == ["cpu"]


def test_a_grid_whose_cells_never_started_can_be_replaced(setup, tmp_path, monkeypatch):
    from beitdomain.user import UserError

    root, pre = setup
    out = tmp_path / "curve"

    def fails_before_training(r, cell_dir, **kw):
        cell_dir.mkdir(parents=True)  # as a cell that fails while reading its data
        raise UserError("simulated: the data could not be read")

    with monkeypatch.context() as m:
        m.setattr(curve_engine, "finetune", fails_before_training)
        with pytest.raises(UserError, match="simulated"):
            run_curve(_curve_recipe(root, pre), out, device="cpu", quiet=True)
    r = _curve_recipe(root, pre)
    r.curve.fractions = ["100%"]
    r.curve.inits = {"scratch": None}
    result = run_curve(r, out, device="cpu", quiet=True)  # not refused: nothing had run
    assert len(result["rows"]) == 1


def test_curve_runs_the_baselines_on_its_subsets_and_judges_against_the_strongest(setup, tmp_path):
    # The classical arms train on exactly the labels each cell trained on; scratch fine-tunes
    # without layer decay; report.md's verdict is against the strongest arm without
    # pre-training and comes first.
    root, pre = setup
    out = tmp_path / "curve"
    run_curve(_curve_recipe(root, pre, baselines=True), out, device="cpu", quiet=True)
    rows = _rows(out / "curve.csv")
    arms = {"pixels-logreg", "pca-logreg", "probe-scratch", "probe-domain"}
    assert {(r["init"], r["labels"]) for r in rows} >= {(a, f) for a in arms for f in FRACTIONS}
    used = _rows(out / "baselines_labels_used.csv")
    for f in FRACTIONS:
        for init in ("scratch", "domain"):
            cell = out / "cells" / cell_name(init, f, 0)
            trained = {r["path"] for r in _rows(cell / "labels_used.csv") if r["split"] == "train"}
            assert trained == {r["path"] for r in used if r["labels"] == f}
            res = json.loads((cell / "results.json").read_text())
            assert res["layer_decay"] == (None if init == "scratch" else 0.9)
            assert res["selection"] == "none"
    report = (out / "report.md").read_text().splitlines()
    result = report.index("## Result")
    assert report[result + 2].startswith("- **Domain pre-training ('domain')")
    assert any("strongest without pre-training" in line for line in report)
    assert any(
        line.startswith("- Arm `scratch`:") and "layer decay none" in line for line in report
    )
    assert any(line.startswith("- Arm `pixels-logreg`:") for line in report)
    assert not any("beyond each cell's budget" in line for line in report)


def test_off_a_terminal_the_curve_and_its_baselines_print_progress_lines(
    setup, tmp_path, monkeypatch, caplog
):
    # A batch job's stderr is a file: the curve said "N cells, 0 done" and then nothing until
    # the end (a rich bar draws nothing off a terminal), and the baselines not one line.
    monkeypatch.setenv("BEITDOMAIN_LOG_EVERY", "0")
    monkeypatch.setattr("beitdomain.progress.stderr_is_terminal", lambda: False)
    root, pre = setup
    with caplog.at_level(logging.INFO, logger="beitdomain"):
        run_curve(_curve_recipe(root, pre, baselines=True), tmp_path / "c", device="cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "beitdomain.progress"]
    cells = [line for line in lines if line.startswith("curve cells ")]
    assert [line.split(",")[0] for line in cells] == [
        f"curve cells {k}/4 ({25 * k}%)" for k in range(5)
    ]
    assert all("elapsed" in line and "ETA" in line for line in cells)
    fits = [line for line in lines if line.startswith("curve baselines: fits ")]
    assert fits and fits[-1].startswith("curve baselines: fits 8/8 (100%)")
    # report.md states the schedule the cells ran (train.steps=4), not epochs and min_steps
    arms = [
        line
        for line in (tmp_path / "c" / "report.md").read_text().splitlines()
        if line.startswith(("- Arm `scratch`:", "- Arm `domain`:"))
    ]
    assert len(arms) == 2
    assert all(a.endswith(", 4 steps per cell") for a in arms), arms
    assert not any("epochs" in a for a in arms)
