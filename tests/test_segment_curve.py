"""`beitdomain curve --task segment` (issue 38): cells of segmentation fine-tunes on generated
discs, scored and judged in Dice, with MONAI's U-Net as an arm without pre-training and no
classical baseline invented for masks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import assert_same_tensors, cli, lose_newest_checkpoint, sets_to_args
from test_segment_job import SEGMENT_SETS, write_discs

from beitdomain.engine.run.checkpoint import CheckpointManager

# Tiny models on a shared 2-core machine: one torch thread (conftest), no spin-waiting.
pytestmark = pytest.mark.usefixtures("one_thread")

CURVE_SETS = [
    *SEGMENT_SETS,
    "finetune.train.steps=6",
    "finetune.train.deterministic=true",
]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _curve_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "curve",
        "--task",
        "segment",
        "--data",
        str(data),
        "--labels-csv",
        str(data / "labels.csv"),
        "--fractions",
        "50%,100%",
        "--seeds",
        "0",
        "--init",
        "scratch",
        "--init",
        "unet",
        "--out",
        str(out),
        *extra,
        *sets_to_args(CURVE_SETS),
    ]


def _train_files(cell: Path) -> set[str]:
    return {r["path"] for r in _rows(cell / "labels_used.csv") if r["split"] == "train"}


@pytest.fixture(scope="module")
def curve(tmp_path_factory):
    """The 2 fractions x 1 seed x {scratch, unet} segmentation curve on 16 discs."""
    import torch

    tmp = tmp_path_factory.mktemp("segcurve")
    data = write_discs(tmp / "discs", n=16)
    out = tmp / "curve"
    threads = torch.get_num_threads()  # one thread, as the tests that resume its cells run
    torch.set_num_threads(1)
    try:
        res = cli(*_curve_args(data, out))
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    return data, out


def test_the_cli_runs_a_segmentation_curve_in_dice(curve):
    _, out = curve
    rows = _rows(out / "curve.csv")
    assert {(r["init"], r["labels"]) for r in rows} == {
        (i, f) for i in ("scratch", "unet") for f in ("50%", "100%")
    }  # no pixels-logreg, pca-logreg or probe row: those classify whole images
    assert not (out / "baselines.csv").exists()
    for column in ("mean_dice", "mean_iou", "dice_disc", "n_labels", "n_train", "n_test"):
        assert column in rows[0], rows[0].keys()
    assert "balanced_accuracy" not in rows[0]
    for r in rows:  # each row is its cell's results.json
        res = json.loads(
            (
                out / "cells" / f"{r['init']}-{r['labels'].replace('%', 'pct')}-s0" / "results.json"
            ).read_text()
        )
        assert res["task"] == "segment"
        assert float(r["mean_dice"]) == pytest.approx(res["test"]["mean_dice"])
        assert float(r["mean_iou"]) == pytest.approx(res["test"]["mean_iou"])
        assert float(r["fraction"]) == pytest.approx(res["fraction"])
        assert 0.0 <= float(r["mean_dice"]) <= 1.0
    # 16 discs: 4 test, 3 val (unused with selection 'none'), 9 train; 50% of 9 is 5 images
    half = [r for r in rows if r["labels"] == "50%"]
    assert {r["n_labels"] for r in half} == {"5"} and {r["n_train"] for r in rows} == {"9"}
    assert {r["n_test"] for r in rows} == {"4"}
    assert {float(r["fraction"]) for r in half} == {5 / 9}  # the fraction got, not the asked

    report = (out / "report.md").read_text()
    assert report.startswith("# Label-efficiency report (foreground-mean Dice)")
    assert "balanced accuracy" not in report
    assert "Arm `unet`: MONAI's U-Net from random weights" in report
    assert "Arm `scratch`: BEiT segmenter" in report
    assert "50%: 55.6% (5 images)" in report  # asked and got
    assert "asked 50%, got 55.6% (5 annotated images" in report
    assert "Initialization `unet`: MONAI's U-Net, random initialization" in report
    assert "the same fixed split for every run" in report and "stratified" not in report
    assert "Classical baselines: not run" in report and "(`scratch`, `unet`)" in report
    assert "Metric: foreground-mean Dice on the test set" in report
    assert "pixels-logreg" not in report and "probe-" not in report
    assert "No pre-trained initialization was compared." in report  # both arms are random
    assert (out / "curve.png").stat().st_size > 0
    summary = _rows(out / "summary.csv")
    assert "mean_dice_mean" in summary[0] and "mean_iou_mean" in summary[0]


def test_label_subsets_are_nested_and_shared_by_the_arms(curve):
    _, out = curve
    cells = out / "cells"
    half, full = (_train_files(cells / f"scratch-{f}-s0") for f in ("50pct", "100pct"))
    assert len(half) == 5 and len(full) == 9 and half < full
    # the U-Net saw the very labels the BEiT saw: the verdict pairs them by seed
    assert _train_files(cells / "unet-50pct-s0") == half
    assert _train_files(cells / "unet-100pct-s0") == full


def test_a_cut_off_segmentation_cell_resumes_to_the_uninterrupted_one(curve, tmp_path):
    """A cell cut off after a checkpoint (its results and newest checkpoint gone) is resumed by
    re-running the curve and ends with the uninterrupted cell's weights and scores."""
    import shutil

    data, done = curve
    out = tmp_path / "curve"
    shutil.copytree(done, out)
    cell = out / "cells" / "scratch-100pct-s0"
    whole = CheckpointManager(cell / "checkpoints").load_latest()[1]["model"]
    before = json.loads((cell / "results.json").read_text())
    lose_newest_checkpoint(cell, "results.json")
    mgr = CheckpointManager(cell / "checkpoints")
    assert mgr.steps() == [3]
    kept = mgr.path_for(3).stat().st_mtime_ns
    others = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/results.json")}
    res = cli(*_curve_args(data, out))
    assert res.exit_code == 0, res.output
    assert_same_tensors(
        CheckpointManager(cell / "checkpoints").load_latest()[1]["model"], whole, "final weights"
    )
    assert mgr.path_for(3).stat().st_mtime_ns == kept  # resumed from step 3, not restarted
    assert {p: p.stat().st_mtime_ns for p in others} == others  # finished cells skipped
    after = json.loads((cell / "results.json").read_text())
    assert after["test"] == before["test"] and after["steps"] == 6
    assert _rows(out / "curve.csv") == _rows(done / "curve.csv")


def test_a_curve_killed_inside_a_segmentation_cell_resumes_to_the_uninterrupted_curve(
    curve, tmp_path, monkeypatch
):
    """Killed right after the second cell's first checkpoint (step 3 of 6), the curve is run
    again: the finished cell is skipped, the killed one resumes, and every cell ends as the
    uninterrupted curve's did."""
    import beitdomain.engine.curve.run as curve_engine
    from beitdomain.engine.train.loop import Trainer

    data, done = curve
    out = tmp_path / "curve"
    real = curve_engine.finetune

    def killed_in_second_cell(r, cell_dir, **kw):
        if cell_dir.name != "scratch-100pct-s0":
            return real(r, cell_dir, **kw)
        save = Trainer.save_checkpoint

        def save_then_die(self):
            save(self)
            raise KeyboardInterrupt("simulated kill after the first checkpoint")

        with pytest.MonkeyPatch.context() as inner:
            inner.setattr(Trainer, "save_checkpoint", save_then_die)
            return real(r, cell_dir, **kw)

    with monkeypatch.context() as m:
        m.setattr(curve_engine, "finetune", killed_in_second_cell)
        res = cli(*_curve_args(data, out))
    assert res.exit_code != 0
    cut = out / "cells" / "scratch-100pct-s0"
    assert not (cut / "results.json").exists()
    assert json.loads((cut / "manifest.json").read_text())["status"] == "interrupted"
    mgr = CheckpointManager(cut / "checkpoints")
    assert mgr.steps() == [3]
    kept = mgr.path_for(3).stat().st_mtime_ns
    first = (out / "cells" / "scratch-50pct-s0" / "results.json").stat().st_mtime_ns
    res = cli(*_curve_args(data, out))
    assert res.exit_code == 0, res.output
    assert mgr.steps() == [3, 6] and mgr.path_for(3).stat().st_mtime_ns == kept  # resumed
    assert (out / "cells" / "scratch-50pct-s0" / "results.json").stat().st_mtime_ns == first
    for cell in ("scratch-100pct-s0", "unet-100pct-s0"):
        assert_same_tensors(
            CheckpointManager(out / "cells" / cell / "checkpoints").load_latest()[1]["model"],
            CheckpointManager(done / "cells" / cell / "checkpoints").load_latest()[1]["model"],
            cell,
        )
    assert _rows(out / "curve.csv") == _rows(done / "curve.csv")


def test_a_unet_arm_is_refused_for_a_classification_curve(tmp_path):
    from helpers import write_separable_set

    data = write_separable_set(tmp_path / "data", per_class=4)
    out = tmp_path / "curve"
    res = cli("curve", "--data", str(data), "--init", "unet", "--out", str(out))
    assert res.exit_code != 0
    assert "U-Net is a segmentation arm" in res.text and "curve --task segment" in res.text
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--init", "cnn=timm:resnet10t"], "a timm network is a classifier"),
        (["--metric", "accuracy"], "curve.metric=accuracy: a classification metric"),
    ],
    ids=["timm", "metric"],
)
def test_what_a_segmentation_curve_cannot_take_is_refused_first(tmp_path, extra, match):
    data = write_discs(tmp_path / "discs", n=8)
    out = tmp_path / "curve"
    res = cli(*_curve_args(data, out, *extra))
    assert res.exit_code != 0
    assert match in res.text, res.text
    assert not out.exists()


def _fake_cell(out: Path, init: str, labels: str, seed: int, dice: float) -> None:
    """A finished segmentation cell's results.json, as `finetune_segment` writes it."""
    from beitdomain.engine.curve.grid import cell_name

    cell = out / "cells" / cell_name(init, labels, seed)
    cell.mkdir(parents=True)
    n = {"10%": 2, "100%": 20}[labels]
    res = {
        "task": "segment",
        "labels": labels,
        "fraction": n / 20,
        "n_labels": n,
        "n_train": 20,
        "seed": seed,
        "lr": 1e-3,
        "steps": 10,
        "best_step": 10,
        "classes": ["background", "lesion"],
        "test": {
            "mean_dice": dice,
            "mean_iou": dice / (2 - dice),
            "dice": {"background": 0.99, "lesion": dice},
            "n_images": 8,
        },
    }
    (cell / "results.json").write_text(json.dumps(res))


def test_the_verdict_pairs_seeds_on_dice_against_the_strongest_random_arm(tmp_path):
    """A pre-trained arm is judged on Dice against the best arm from random weights at each
    fraction: here the U-Net, which beats the BEiT from scratch."""
    from beitdomain.config import CurveConfig
    from beitdomain.engine.curve.grid import parse_grid
    from beitdomain.engine.curve.report import collect_rows, write_outputs

    c = CurveConfig(fractions=["10%", "100%"], seeds=[0, 1, 2])
    inits = {"domain": str(tmp_path / "backbone.safetensors"), "scratch": None, "unet": "unet"}
    grid = parse_grid(c, inits, "segment")
    for seed in c.seeds:
        for labels, base in (("10%", 0.5), ("100%", 0.7)):
            _fake_cell(tmp_path, "scratch", labels, seed, base - 0.1)
            _fake_cell(tmp_path, "unet", labels, seed, base + 0.01 * seed)
            _fake_cell(tmp_path, "domain", labels, seed, base + 0.1 + 0.02 * seed)
    result = write_outputs(tmp_path, collect_rows(tmp_path, grid.cells()), c, grid)
    (verdict,) = result["verdicts"]
    assert verdict.startswith(
        "Domain pre-training ('domain') pays on this data (foreground-mean Dice, paired by seed)"
    ), verdict
    assert "at 10% (2 labels) ahead of unet (+11.0 ± 0.6 points" in verdict
    report = (tmp_path / "report.md").read_text()
    assert "## Paired by seed: domain vs unet" in report
    assert f"**{verdict}**" in report
    # domain at 10% (0.62) does not reach the U-Net at 100% (0.71): it first does at 100%
    assert "(foreground-mean Dice 0.710) with 100% of the labels (20 images): 0.820" in report
    plain = [r["init"] for r in _rows(tmp_path / "curve.csv")]
    assert sorted(set(plain)) == ["domain", "scratch", "unet"]
