"""`beitdomain curve` checks every label amount before it creates or changes --out, so a refused
curve leaves the folder as it found it (issue 39 item 4); and the label amounts it reports are
the ones the cells got, with a warning where whole groups made them larger, a split holds under
3 groups, or a class is missing (item 2); report.md's schedule is the steps the cells ran and
curve.csv counts images in every row (item 8)."""

from __future__ import annotations

import csv
import logging

import pytest
from helpers import FINETUNE_SETS, sets_to_args, write_separable_set
from typer.testing import CliRunner

from beitdomain.cli.app import app
from beitdomain.engine.curve.report import _probe_on_top, subset_warnings
from beitdomain.eval.plots import fraction_tick
from beitdomain.eval.report import read_csv


def invoke(*args: str):
    return CliRunner().invoke(app, ["--device", "cpu", "--quiet", *args], env={"COLUMNS": "2000"})


def test_a_curve_refused_for_its_label_amounts_leaves_out_as_it_was(tmp_path):
    data = write_separable_set(tmp_path / "data", per_class=4, size=32)
    args = ["curve", "--data", str(data), "--init", "scratch", "--fractions", "1%,100%"]
    args += ["--seeds", "1", *sets_to_args([*FINETUNE_SETS, "finetune.train.steps=1"])]
    (tmp_path / "empty").mkdir()
    for name in ("missing", "empty"):
        out = tmp_path / name
        res = invoke(*args, "--out", str(out))
        assert res.exit_code == 2, res.output
        assert "1%" in res.output and "Traceback" not in res.output
        assert "run with --fractions 100%" in res.output  # what this data can hold
        left = sorted(p.name for p in out.iterdir()) if out.exists() else None
        assert left == (None if name == "missing" else []), left  # no marker, lock or grid


@pytest.fixture(scope="module")
def grouped_curve(tmp_path_factory):
    """A two-cell curve (15% and 100%, one seed, one epoch) on 40 images in groups of two,
    with its baselines: 15% of the 24 train images takes a group per class (4 images, 16.7%)."""
    tmp = tmp_path_factory.mktemp("grouped")
    data = write_separable_set(tmp / "data", per_class=20, size=32)
    labels = tmp / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group"])
        for p in sorted(data.rglob("*.png")):
            k = int(p.stem.split("_")[-1])
            w.writerow([p.relative_to(data).as_posix(), p.parent.name, f"{p.parent.name}-{k // 2}"])
    sets = [
        *FINETUNE_SETS,
        "finetune.train.epochs=1",
        "data.test_fraction=0.25",
        "data.image_size=32",
        "model.patch_size=8",
    ]
    out = tmp / "curve"
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("beitdomain").addHandler(handler)
    try:
        res = invoke(
            "curve",
            "--data",
            str(data),
            "--labels-csv",
            str(labels),
            "--init",
            "scratch",
            "--fractions",
            "15%,100%",
            "--seeds",
            "1",
            "--out",
            str(out),
            *sets_to_args(sets),
        )
    finally:
        logging.getLogger("beitdomain").removeHandler(handler)
    assert res.exit_code == 0, res.output
    return out, [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def test_the_curve_says_what_each_label_amount_got(grouped_curve):
    out, warnings = grouped_curve
    said = [w for w in warnings if "asked 15%, got 16.7% (4 images, 2 groups" in w]
    assert len(said) == 1, warnings  # once, before the cells, not once per cell
    report = (out / "report.md").read_text()
    assert "15%: 16.7% (4 images, 2 groups); 100%: 100% (24 images, 12 groups)" in report
    assert "asked 15%, got 16.7%" in report
    rows = read_csv(out / "curve.csv")
    at_15 = {r["init"]: r for r in rows if r["labels"] == "15%"}
    assert [r["fraction"] for r in at_15.values()] == pytest.approx([4 / 24] * len(at_15))


def test_curve_csv_counts_images_and_the_report_states_the_steps_run(grouped_curve):
    out, _ = grouped_curve
    rows = read_csv(out / "curve.csv")
    for labels, n in (("15%", 4), ("100%", 24)):
        mine = [r for r in rows if r["labels"] == labels]
        assert {r["init"] for r in mine} >= {"scratch", "pixels-logreg", "probe-scratch"}
        assert {int(r["n_labels"]) for r in mine} == {n}, mine  # baselines too
        assert {int(r["n_test"]) for r in mine} == {10}
    arm = next(
        line
        for line in (out / "report.md").read_text().splitlines()
        if line.startswith("- Arm `scratch`:")
    )
    assert "steps per cell 15%: 1, 100%: 3" in arm, arm  # 4 and 24 images at batch 8
    assert "epochs" not in arm, arm  # not the recipe's "1 epochs and at least 0 steps"


def test_subset_warnings_name_a_missing_class_and_keep_a_rounded_fraction_quiet():
    base = {"n_labels": 18, "n_train": 1771, "fraction": 18 / 1771, "splits": {}}
    assert subset_warnings("1%", base) == []  # 1.02% is 1%
    missing = {**base, "per_class": {"a": 0, "b": 18}}
    assert "no image of a" in subset_warnings("1%", missing)[0]
    one_group = {
        "n_labels": 8,
        "n_train": 28,
        "fraction": 8 / 28,
        "splits": {"subset": {"images": 8, "groups": 1}},
    }
    assert subset_warnings("10%", one_group)[0].startswith(
        "labels: asked 10%, got 28.6% (8 images, 1 group;"
    )
    one_test_group = {**base, "splits": {"test": {"images": 27, "groups": 1}}}
    (said,) = subset_warnings("1%", one_test_group)
    assert said.startswith("the test split holds 27 images from only 1 group:")


def test_ticks_read_the_real_fraction_legibly():
    assert [fraction_tick(f) for f in (18 / 1771, 0.0999, 8 / 28, 1.0, 0.005)] == [
        "1%",
        "10%",
        "29%",
        "100%",
        "0.5%",
    ]


def test_the_verdict_says_when_the_frozen_probe_is_the_top_arm():
    summary = [
        {"init": arm, "fraction": f, "balanced_accuracy_mean": m}
        for f, means in ((0.01, (0.6, 0.7, 0.65)), (1.0, (0.8, 0.9, 0.85)))
        for arm, m in zip(("domain", "probe-domain", "scratch"), means)
    ]
    inits = {"domain": "runs/pre/backbone.safetensors", "scratch": None}
    (said,) = _probe_on_top(summary, inits, "balanced_accuracy")
    assert said.startswith("probe-domain") and "1%, 100%" in said
    summary[0]["balanced_accuracy_mean"] = 0.75  # domain fine-tuned wins at 1%
    assert _probe_on_top(summary, inits, "balanced_accuracy") == []


def test_the_plot_draws_chance_and_collapses_baselines_at_chance(tmp_path, monkeypatch):
    from beitdomain.eval import plots

    drawn: dict[str, list[str]] = {}
    real = plots._save

    def keep_labels(fig, out_png):
        ax = fig.axes[0]
        drawn["labels"] = [line.get_label() for line in ax.get_lines()]
        drawn["ylim"] = list(ax.get_ylim())
        return real(fig, out_png)

    summary = [
        {"init": arm, "fraction": f, "balanced_accuracy_mean": m, "balanced_accuracy_std": s}
        for arm, f, m, s in (
            ("scratch", 0.01, 0.71, 0.01),
            ("scratch", 1.0, 0.72, None),
            ("pixels", 0.01, 0.5, None),
            ("pixels", 1.0, 0.5, None),
            ("pca", 0.01, 0.5, None),
            ("pca", 1.0, 0.5, None),
        )
    ]
    monkeypatch.setattr(plots, "_save", keep_labels)
    plots.plot_label_efficiency(
        summary, tmp_path / "c.png", "balanced_accuracy", dashed=["pixels", "pca"], chance=0.5
    )
    labels = [x for x in drawn["labels"] if not x.startswith("_")]
    assert "chance (0.500): pca, pixels" in labels
    assert "pixels" not in labels and "pca" not in labels
    lo, hi = drawn["ylim"]
    assert lo <= 0.5 and hi - lo >= 0.2


def test_old_arms_json_strings_still_read():
    from beitdomain.engine.curve.report import _with_steps_run

    rows = [{"init": "a", "labels": "10%", "fraction": 0.1, "steps": 5}]
    assert _with_steps_run({"a": "fine-tuned, lr 1e-3"}, rows) == {
        "a": "fine-tuned, lr 1e-3, 5 steps per cell"
    }


def test_one_label_amount_is_one_point_whatever_its_seeds_got():
    from beitdomain.engine.curve.report import one_fraction_per_amount
    from beitdomain.eval.report import summarize

    rows = [  # whole groups: seed 0 got 4 of 40 images for 10%, seed 1 got 6
        {"init": arm, "labels": "10%", "fraction": f, "seed": s, "n_labels": n, "acc": a}
        for arm in ("scratch", "pixels-logreg")
        for s, f, n, a in ((0, 0.1, 4, 0.6), (1, 0.15, 6, 0.7))
    ] + [{"init": "scratch", "labels": "100%", "fraction": 1.0, "seed": 0, "n_labels": 40}]
    fixed = one_fraction_per_amount(rows)
    assert [r["fraction"] for r in fixed[:4]] == pytest.approx([0.125] * 4)
    assert [r["seed_fraction"] for r in fixed[:2]] == [0.1, 0.15]
    assert "seed_fraction" not in fixed[4]
    cells = {(r["init"], r["fraction"]): r for r in summarize(fixed)}
    assert cells[("scratch", 0.125)]["n_runs"] == 2  # one point over both seeds, not two
    assert cells[("scratch", 0.125)]["n_labels"] == 5


def test_a_curve_cell_cut_off_on_other_data_gets_the_curves_own_advice(monkeypatch, tmp_path):
    import beitdomain.engine.curve.run as curve_run
    from beitdomain.engine.run.folder import OtherDataError
    from beitdomain.user import UserError

    def other_data(*a, **kw):
        raise OtherDataError("x trained on other data ... add --resume-other-data")

    monkeypatch.setattr(curve_run, "finetune", other_data)
    with pytest.raises(UserError) as e:
        curve_run._finetune_cell(None, tmp_path / "cells" / "domain-10pct-s0", device="cpu",
                                 trust_pickle=False)  # fmt: skip
    assert "domain-10pct-s0" in str(e.value) and "--out" in str(e.value)
    assert "--resume-other-data" not in str(e.value)
