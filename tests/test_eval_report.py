"""Curve summaries, the label-efficiency factor, report.md, CSVs and the figures."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from beitdomain.eval.plots import (
    plot_confusion_matrix,
    plot_label_efficiency,
    plot_training_curves,
)
from beitdomain.eval.report import (
    label_efficiency,
    paired_gains,
    read_csv,
    summarize,
    write_csv,
    write_report,
)
from beitdomain.user import UserError

FRACTIONS = (0.01, 0.05, 0.1, 0.25, 1.0)
N_TRAIN = 400


def _summary(scratch: list[float], domain: list[float], std: float = 0.02) -> list[dict]:
    """A hand-made summary: one mean per fraction for each init."""
    rows = []
    for init, means in (("scratch", scratch), ("domain", domain)):
        for f, m in zip(FRACTIONS, means):
            rows.append(
                {
                    "init": init,
                    "fraction": f,
                    "n_runs": 3,
                    "n_labels": round(f * N_TRAIN),
                    "balanced_accuracy_mean": m,
                    "balanced_accuracy_std": std,
                }
            )
    return rows


SCRATCH = [0.50, 0.55, 0.60, 0.66, 0.75]


# --------------------------------------------------------------------------------------------
# The label-efficiency factor
# --------------------------------------------------------------------------------------------


def test_factor_matches_at_ten_percent():
    eff = label_efficiency(_summary(SCRATCH, [0.60, 0.70, 0.76, 0.80, 0.85]), "balanced_accuracy")
    assert eff["pretrained_init"] == "domain" and eff["reference_init"] == "scratch"
    assert eff["reference_value"] == pytest.approx(0.75)
    assert eff["matching_fraction"] == pytest.approx(0.1)
    assert eff["factor"] == pytest.approx(10.0)
    assert eff["matching_n_labels"] == 40
    assert "10% of the labels" in eff["statement"] and "10× fewer labels" in eff["statement"]


def test_factor_matches_at_one_percent():
    eff = label_efficiency(_summary(SCRATCH, [0.80, 0.82, 0.84, 0.86, 0.9]), "balanced_accuracy")
    assert eff["matching_fraction"] == pytest.approx(0.01)
    assert eff["factor"] == pytest.approx(100.0)
    assert "100× fewer labels" in eff["statement"]


def test_factor_never_matches():
    eff = label_efficiency(_summary(SCRATCH, [0.40, 0.45, 0.50, 0.60, 0.74]), "balanced_accuracy")
    assert eff["factor"] is None and eff["matching_fraction"] is None
    assert "does not match" in eff["statement"]
    assert "0.740 at 100%" in eff["statement"]  # its best, said in words


def test_ties_count_as_matching():
    # 1.13 - 0.38 is 0.7499999999999999 in floating point: a tie that must still count
    tie = 1.13 - 0.38
    assert tie < 0.75
    eff = label_efficiency(_summary(SCRATCH, [0.5, 0.6, 0.7, tie, 0.8]), "balanced_accuracy")
    assert eff["matching_fraction"] == pytest.approx(0.25)
    assert eff["factor"] == pytest.approx(4.0)


def test_smallest_fraction_wins_even_if_a_later_one_dips():
    eff = label_efficiency(_summary(SCRATCH, [0.6, 0.76, 0.74, 0.8, 0.8]), "balanced_accuracy")
    assert eff["matching_fraction"] == pytest.approx(0.05)
    assert eff["factor"] == pytest.approx(20.0)


def test_gain_points_at_each_fraction():
    domain = [0.60, 0.70, 0.76, 0.80, 0.85]
    eff = label_efficiency(_summary(SCRATCH, domain), "balanced_accuracy")
    gains = {g["fraction"]: g["gain_points"] for g in eff["gains"]}
    assert list(gains) == list(FRACTIONS)
    assert gains[0.01] == pytest.approx(10.0)
    assert gains[0.05] == pytest.approx(15.0)
    assert gains[1.0] == pytest.approx(10.0)
    assert [g["n_labels"] for g in eff["gains"]] == [4, 20, 40, 100, 400]


def test_no_reference_at_full_labels():
    rows = [
        r for r in _summary(SCRATCH, SCRATCH) if not (r["init"] == "scratch" and r["fraction"] == 1)
    ]
    eff = label_efficiency(rows, "balanced_accuracy")
    assert eff["factor"] is None and "100% of the labels" in eff["statement"]
    assert eff["gains"][-1]["gain_points"] is None  # no scratch at 100% to subtract


def test_a_statement_shared_by_every_arm_is_written_once(tmp_path):
    rows = [
        r for r in _summary(SCRATCH, SCRATCH) if not (r["init"] == "scratch" and r["fraction"] == 1)
    ]
    eff = label_efficiency(rows, "balanced_accuracy")
    text = write_report(tmp_path / "r.md", rows, [eff, dict(eff)], "balanced_accuracy", {})
    assert text.read_text().count(eff["statement"]) == 1


def test_pretrained_init_must_be_named_when_ambiguous():
    imagenet = {"init": "imagenet", "fraction": 1.0, "n_runs": 1, "balanced_accuracy_mean": 0.9}
    rows = [*_summary(SCRATCH, SCRATCH), imagenet]
    with pytest.raises(UserError, match="pretrained_init"):
        label_efficiency(rows, "balanced_accuracy")
    eff = label_efficiency(rows, "balanced_accuracy", pretrained_init="imagenet")
    assert eff["factor"] == pytest.approx(1.0)
    with pytest.raises(UserError, match="'nope' is not in the summary"):
        label_efficiency(rows, "balanced_accuracy", pretrained_init="nope")


# --------------------------------------------------------------------------------------------
# summarize and CSV
# --------------------------------------------------------------------------------------------


def _runs() -> list[dict]:
    rows = []
    for init, base in (("scratch", 0.5), ("domain", 0.7)):
        for f in (0.1, 1.0):
            for seed, noise in zip((0, 1, 2), (-0.01, 0.0, 0.01)):
                rows.append(
                    {
                        "init": init,
                        "fraction": f,
                        "seed": seed,
                        "n_labels": round(f * N_TRAIN),
                        "accuracy": base + f / 10 + noise,
                        "balanced_accuracy": base + f / 10 + 2 * noise,
                        "auroc": None if (f == 0.1 and seed == 0) else 0.9,
                        "run": f"runs/{init}-{f}-{seed}",
                    }
                )
    return rows


def test_summarize_mean_std_counts():
    summary = summarize(_runs())
    assert [(r["init"], r["fraction"]) for r in summary] == [
        ("domain", 0.1),
        ("domain", 1.0),
        ("scratch", 0.1),
        ("scratch", 1.0),
    ]
    cell = summary[2]
    assert cell["n_runs"] == 3 and cell["n_labels"] == 40
    assert cell["accuracy_mean"] == pytest.approx(0.51)
    assert cell["accuracy_std"] == pytest.approx(0.01)  # sample std of -0.01, 0, 0.01
    assert cell["balanced_accuracy_std"] == pytest.approx(0.02)
    assert cell["auroc_mean"] == pytest.approx(0.9)  # the missing value is left out
    assert "run_mean" not in cell and "seed_mean" not in cell  # text and ids are not metrics


def test_summarize_single_run_has_no_std():
    summary = summarize([{"init": "scratch", "fraction": 1.0, "seed": 0, "accuracy": 0.8}])
    assert summary[0]["accuracy_mean"] == pytest.approx(0.8)
    assert summary[0]["accuracy_std"] is None


def test_csv_round_trip(tmp_path):
    rows = _runs()
    path = write_csv(rows, tmp_path / "curve.csv")
    back = read_csv(path)
    assert len(back) == len(rows)
    for a, b in zip(rows, back):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert b[k] == pytest.approx(a[k])
            else:
                assert b[k] == a[k]
    # the summary of rows read back equals the summary of the originals
    s1, s2 = summarize(back), summarize(rows)
    assert [x.keys() for x in s1] == [y.keys() for y in s2]
    for x, y in zip(s1, s2):
        for k in x:
            assert x[k] == (pytest.approx(y[k]) if isinstance(y[k], float) else y[k])
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


# --------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------


def test_report_states_the_factor_and_table(tmp_path):
    summary = _summary(SCRATCH, [0.60, 0.70, 0.76, 0.80, 0.85])
    eff = label_efficiency(summary, "balanced_accuracy")
    out = write_report(
        tmp_path / "report.md",
        summary,
        eff,
        "balanced_accuracy",
        {
            "seeds": [0, 1, 2],
            "n_test": 120,
            "n_train": N_TRAIN,
            "inits": {"domain": "runs/pretrain", "scratch": None},
            "figure": "curve.png",
            "device": "cpu",
        },
    )
    text = out.read_text()
    assert "Label-efficiency factor: 10" in text
    assert "10% of the labels" in text
    assert "| 10% | 40 | 0.600 ± 0.020 | 0.760 ± 0.020 | +16.0 |" in text
    assert "| 1% | 4 | 0.500 ± 0.020 | 0.600 ± 0.020 | +10.0 |" in text
    assert "Seeds: 0, 1, 2" in text and "120 images" in text
    assert "`scratch`: random (from scratch)" in text
    assert "](curve.png)" in text and "- device: cpu" in text


def test_paired_gains_pair_runs_by_seed_and_report_their_standard_error(tmp_path):
    def row(init, seed, score, fraction=0.01):
        return {"init": init, "fraction": fraction, "seed": seed, "balanced_accuracy": score}

    rows = [
        *(row("scratch", s, v) for s, v in enumerate([0.50, 0.60, 0.55, 0.58])),
        *(row("domain", s, v) for s, v in enumerate([0.56, 0.62, 0.61])),  # seed 3 missing
        row("domain", 0, 0.70, 0.1),  # no scratch run at 10%: nothing to pair
    ]
    (g,) = paired_gains(rows, "balanced_accuracy", "scratch", "domain")
    assert g["seeds"] == [0, 1, 2] and g["ahead"] == 3
    assert g["gains"] == pytest.approx([6.0, 2.0, 6.0])
    assert g["mean"] == pytest.approx(14 / 3)
    assert g["se"] == pytest.approx(np.std([6.0, 2.0, 6.0], ddof=1) / np.sqrt(3))
    # Rows read back from curve.csv (strings) pair the same way.
    back = read_csv(write_csv(rows, tmp_path / "curve.csv"))
    assert paired_gains(back, "balanced_accuracy", "scratch", "domain")[0]["mean"] == g["mean"]
    summary = summarize(rows)
    out = write_report(
        tmp_path / "report.md",
        summary,
        [],
        "balanced_accuracy",
        {"paired": {"domain": [g]}},
    )
    text = out.read_text()
    assert "## Paired by seed: domain vs scratch" in text
    assert "| 1% | 3 | +4.7 ± 1.3 | 3 of 3 | +6.0, +2.0, +6.0 |" in text


def test_report_never_matches(tmp_path):
    summary = _summary(SCRATCH, [0.40, 0.45, 0.50, 0.60, 0.74])
    eff = label_efficiency(summary, "balanced_accuracy")
    text = write_report(tmp_path / "r.md", summary, [eff], "balanced_accuracy", {}).read_text()
    assert "does not match" in text and "No label-efficiency factor" in text
    assert "| 100% | 400 | 0.750 ± 0.020 | 0.740 ± 0.020 | -1.0 |" in text


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _assert_real_png(path, min_w=300, min_h=200):
    assert path.is_file() and path.stat().st_size > 5_000
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= min_w and im.height >= min_h
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert pixels.std() > 10  # not blank: lines, text and fills
    assert (pixels < 100).mean() > 0.005  # some dark ink


def test_label_efficiency_png(tmp_path):
    figures_before = plt.get_fignums()
    summary = _summary(SCRATCH, [0.60, 0.70, 0.76, 0.80, 0.85])
    out = plot_label_efficiency(summary, tmp_path / "curve.png", "balanced_accuracy")
    _assert_real_png(out)
    assert plt.get_fignums() == figures_before  # no pyplot figures leaked


def test_a_curve_with_many_arms_puts_its_legend_beside_the_plot(tmp_path):
    few = _summary(SCRATCH, [0.60, 0.70, 0.76, 0.80, 0.85])
    many = [dict(r, init=f"{r['init']}-{k}") for k in range(5) for r in few]  # 10 arms
    a = plot_label_efficiency(few, tmp_path / "few.png", "balanced_accuracy")
    b = plot_label_efficiency(many, tmp_path / "many.png", "balanced_accuracy")
    _assert_real_png(b)
    with Image.open(a) as im_a, Image.open(b) as im_b:
        assert im_b.width > im_a.width * 1.2 and im_b.height == im_a.height


def test_label_efficiency_png_single_seed_and_missing_values(tmp_path):
    summary = _summary(SCRATCH, [0.60, 0.70, 0.76, 0.80, 0.85])
    for r in summary:
        r["balanced_accuracy_std"] = None
    summary[0]["balanced_accuracy_mean"] = None
    out = plot_label_efficiency(summary, tmp_path / "c.png", "balanced_accuracy", N_TRAIN)
    _assert_real_png(out)
    with pytest.raises(ValueError, match="auroc_mean"):
        plot_label_efficiency(summary, tmp_path / "x.png", "auroc")


def test_confusion_matrix_png(tmp_path):
    out = plot_confusion_matrix(
        [[5, 1, 0], [2, 7, 1], [0, 0, 3]], ["a", "b", "c"], tmp_path / "cm.png"
    )
    _assert_real_png(out)
    raw = plot_confusion_matrix([[5, 1], [0, 0]], ["a", "b"], tmp_path / "raw.png", normalize=False)
    _assert_real_png(raw)
    with pytest.raises(ValueError, match="shape"):
        plot_confusion_matrix([[1, 2]], ["a", "b"], tmp_path / "bad.png")


def test_training_curves_png(tmp_path):
    log = tmp_path / "run" / "metrics.jsonl"
    log.parent.mkdir()
    records = [{"step": s, "epoch": 0, "loss": 2.0 / s, "lr": 1e-3} for s in range(1, 40)]
    records += [{"step": s, "val_balanced_accuracy": 0.5 + s / 100} for s in (10, 20, 30)]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = plot_training_curves(log, tmp_path / "train.png", ["loss", "val_balanced_accuracy"])
    _assert_real_png(out)
    with pytest.raises(ValueError, match="logged keys: epoch, loss, lr"):
        plot_training_curves(log, tmp_path / "x.png", ["nope"])


def _two_init_summary(domain_10, domain_std, scratch_100, scratch_std):
    return [
        {
            "init": "scratch",
            "fraction": 1.0,
            "n_labels": 100,
            "balanced_accuracy_mean": scratch_100,
            "balanced_accuracy_std": scratch_std,
        },
        {
            "init": "domain",
            "fraction": 0.1,
            "n_labels": 10,
            "balanced_accuracy_mean": domain_10,
            "balanced_accuracy_std": domain_std,
        },
        {
            "init": "domain",
            "fraction": 1.0,
            "n_labels": 100,
            "balanced_accuracy_mean": 0.9,
            "balanced_accuracy_std": 0.01,
        },
    ]


def test_a_match_within_the_seed_spread_is_called_tentative():
    eff = label_efficiency(_two_init_summary(0.646, 0.026, 0.622, 0.003), "balanced_accuracy")
    assert eff["factor"] == pytest.approx(10)
    assert (
        "within the seed-to-seed spread" in eff["statement"] and "+2.4 points" in eff["statement"]
    )


def test_a_clear_match_carries_no_caution():
    eff = label_efficiency(_two_init_summary(0.80, 0.01, 0.62, 0.01), "balanced_accuracy")
    assert eff["factor"] == pytest.approx(10) and "tentative" not in eff["statement"]


def test_a_single_seed_match_is_called_tentative():
    eff = label_efficiency(_two_init_summary(0.80, None, 0.62, None), "balanced_accuracy")
    assert "One run per cell" in eff["statement"]


# --------------------------------------------------------------------------------------------
# The strongest arm without pre-training, and the verdict against it
# --------------------------------------------------------------------------------------------


def _arm_runs(arms: dict[str, dict[float, list[float]]]) -> list[dict]:
    return [
        {
            "init": a,
            "fraction": f,
            "seed": s,
            "n_labels": round(f * N_TRAIN),
            "balanced_accuracy": v,
        }
        for a, per in arms.items()
        for f, vals in per.items()
        for s, v in enumerate(vals)
    ]


def test_the_reference_is_the_strongest_arm_without_pretraining_at_each_fraction():
    from beitdomain.eval.report import STRONGEST, as_reference, strongest_arms

    rows = _arm_runs(
        {
            "scratch": {0.01: [0.54, 0.55], 1.0: [0.74, 0.75]},
            "pixels": {0.01: [0.66, 0.68], 1.0: [0.72, 0.73]},
            "domain": {0.01: [0.90, 0.90], 1.0: [0.95, 0.95]},
        }
    )
    summary = summarize(rows)
    choice = strongest_arms(summary, "balanced_accuracy", ["scratch", "pixels"])
    assert choice == {0.01: "pixels", 1.0: "scratch"}  # domain is never a candidate
    ref = as_reference(rows, choice)
    assert {(r["arm"], r["fraction"]) for r in ref} == {("pixels", 0.01), ("scratch", 1.0)}
    assert all(r["init"] == STRONGEST for r in ref)
    eff = label_efficiency(summarize(rows + ref), "balanced_accuracy", STRONGEST, "domain")
    assert eff["reference_value"] == pytest.approx(0.745)
    assert eff["gains"][0]["gain_points"] == pytest.approx(100 * (0.90 - 0.67))


def test_verdict_says_plainly_when_pretraining_does_not_pay(tmp_path):
    from beitdomain.eval.report import STRONGEST, as_reference, strongest_arms, verdict

    rows = _arm_runs(
        {
            "scratch": {0.01: [0.54, 0.55, 0.53], 0.1: [0.64, 0.65, 0.63]},
            "pixels": {0.01: [0.67, 0.66, 0.68], 0.1: [0.69, 0.70, 0.70]},
            "domain": {0.01: [0.60, 0.59, 0.58], 0.1: [0.72, 0.69, 0.71]},
        }
    )
    summary = summarize(rows)
    choice = strongest_arms(summary, "balanced_accuracy", ["scratch", "pixels"])
    paired = paired_gains(
        rows + as_reference(rows, choice), "balanced_accuracy", STRONGEST, "domain"
    )
    text = verdict(paired, choice, "domain", "balanced_accuracy", {0.01: 4, 0.1: 40})
    assert text.startswith("Domain pre-training ('domain') does not pay on this data")
    assert "at 1% (4 labels) behind pixels (-8.0 ± 1.0 points, ahead on 0 of 3 seeds)" in text
    assert "at 10% (40 labels) within noise of pixels (+1.0 ± 1.2 points" in text
    # A single seed ahead is one seed's sign, never a win: the demo's 100% cell (+0.6 on seed
    # 0) once turned "behind at 1%, level at 10%" into "pays".
    one = paired_gains(
        _arm_runs(
            {
                "a": {0.01: [0.60, 0.62, 0.55], 1.0: [0.734]},
                STRONGEST: {0.01: [0.65, 0.66, 0.67], 1.0: [0.729]},
            }
        ),
        "balanced_accuracy",
        STRONGEST,
        "a",
    )
    said = verdict(one, {0.01: "pixels", 1.0: "probe"}, "a", "balanced_accuracy")
    assert said.startswith("Domain pre-training ('a') does not pay on this data"), said
    assert "at 100% ahead of probe on its one seed (+0.5 points; one seed cannot tell" in said
    wins = paired_gains(
        _arm_runs({"a": {0.1: [0.5, 0.5, 0.5]}, STRONGEST: {0.1: [0.4, 0.41, 0.39]}}),
        "balanced_accuracy",
        STRONGEST,
        "a",
    )
    assert verdict(wins, {0.1: "pixels"}, "a", "balanced_accuracy").startswith(
        "Domain pre-training ('a') pays on this data"
    )
    out = write_report(
        tmp_path / "report.md",
        summary,
        [],
        "balanced_accuracy",
        {"verdicts": [text], "selection_note": "Selection used 197 labels beyond the budget."},
    )
    lines = out.read_text().splitlines()
    assert lines[2] == "**Selection used 197 labels beyond the budget.**"
    assert lines[6] == f"- **{text}**"


def test_baseline_arms_are_drawn_dashed(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    styles = {}
    real = Axes.plot

    def spy(self, *args, **kw):
        styles[kw.get("label")] = kw.get("ls", "-")
        return real(self, *args, **kw)

    monkeypatch.setattr(Axes, "plot", spy)
    summary = _summary(SCRATCH, [0.60, 0.70, 0.76, 0.80, 0.85])
    summary += [{**r, "init": "pixels"} for r in summary if r["init"] == "scratch"]
    plot_label_efficiency(summary, tmp_path / "c.png", "balanced_accuracy", dashed=["pixels"])
    assert styles == {"scratch": "-", "domain": "-", "pixels": "--"}
