"""Results that used to be wrong without a word: each now says so (or is drawn right)."""

from __future__ import annotations

import json
import math


def test_loss_plot_has_no_offset_notation(tmp_path, monkeypatch):
    """A loss stuck at ln 2 reads as a flat line at 0.693, not '+6.931e-1' and wiggles."""
    from beitdomain.eval import plots

    m = tmp_path / "metrics.jsonl"
    m.write_text(
        "".join(
            json.dumps({"step": s, "loss": math.log(2) + 1e-5 * (s % 3)}) + "\n"
            for s in range(1, 40)
        )
    )
    figures = []
    real_save = plots._save

    def keep(fig, out):
        fig.canvas.draw()
        figures.append(fig)
        return real_save(fig, out)

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_training_curves(m, tmp_path / "curves.png", ["loss"])
    ax = figures[0].axes[0]
    assert ax.yaxis.get_offset_text().get_text() == ""
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert any(lab.startswith("0.693") for lab in labels), labels
    assert (tmp_path / "curves.png").is_file()


def test_inspect_warns_when_a_ct_window_flattens_mr_frames(tmp_path, caplog):
    import logging

    from helpers import bundled_dicom

    from beitdomain.data.inspect import contact_sheet, describe_spec
    from beitdomain.io import IntensitySpec

    mr = [bundled_dicom("MR_small.dcm"), bundled_dicom("MR_small_RLE.dcm")]
    lung = IntensitySpec(window="ct-lung")
    with caplog.at_level(logging.WARNING, logger="beitdomain.data.inspect"):
        contact_sheet(mr, lung, tmp_path / "lung.png", n=2)
    text = caplog.text
    assert "2 of 2 images are flat after normalization (auto: window ct-lung)" in text
    assert "Hounsfield" in text and "MR 2" in text and "--normalize percentile" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="beitdomain.data.inspect"):
        contact_sheet(mr, IntensitySpec(normalize="percentile"), tmp_path / "p.png", n=2)
    assert caplog.text == ""
    # the sheet's title says what was applied, not just "auto"
    assert describe_spec(lung) == "auto: window ct-lung"
    assert describe_spec(IntensitySpec(normalize="percentile")) == "percentile 0.5-99.5"


def test_a_tokenizer_used_at_another_size_than_it_was_trained_at_warns(tmp_path, caplog):
    import logging

    import torch

    from beitdomain.config import load_recipe
    from beitdomain.engine.pretrain import load_frozen_tokenizer
    from beitdomain.tokenizer import create_tokenizer
    from beitdomain.tokenizer.io import save_tokenizer

    tok = create_tokenizer("tiny", in_chans=1, input_size=16, downsample=4)
    save_tokenizer(tok, tmp_path / "tok16")
    r = load_recipe(
        None,
        {"tokenizer.path": str(tmp_path / "tok16")},
        ["data.tokenizer_size=32", "data.image_size=64", "model.preset=tiny"],
    )
    with caplog.at_level(logging.WARNING):
        load_frozen_tokenizer(r, torch.device("cpu"), (8, 8))  # 32 / 4 = the 8x8 patch grid
    assert "was trained on 16 px views but is used on 32 px views" in caplog.text
    assert "data.tokenizer_size=16" in caplog.text
    caplog.clear()
    r16 = load_recipe(None, {"tokenizer.path": str(tmp_path / "tok16")}, ["data.tokenizer_size=16"])
    with caplog.at_level(logging.WARNING):
        load_frozen_tokenizer(r16, torch.device("cpu"), (4, 4))
    assert caplog.text == ""


def _summary(means):
    return [
        {"init": init, "fraction": f, "n_labels": 10, "n_runs": 1, "balanced_accuracy_mean": m}
        for (init, f), m in means.items()
    ]


def test_report_warns_when_both_arms_sit_at_chance(tmp_path):
    from beitdomain.eval.report import label_efficiency, write_report

    summary = _summary(
        {("scratch", 0.1): 0.5, ("scratch", 1.0): 0.5, ("domain", 0.1): 0.5, ("domain", 1.0): 0.5}
    )
    eff = label_efficiency(summary, "balanced_accuracy", "scratch", "domain")
    assert "matches or beats" in eff["statement"]  # the sentence that misled
    text = write_report(
        tmp_path / "r.md", summary, eff, "balanced_accuracy", {"n_classes": 2}
    ).read_text()
    result = text.split("## Mean")[0]
    assert "**Warning:** every model sits at chance level (balanced accuracy 0.500 for 2 " in result
    assert "says nothing about pre-training" in result


def test_report_names_the_arm_at_chance_and_stays_quiet_when_none_is(tmp_path):
    from beitdomain.eval.report import chance_warnings

    some = _summary({("scratch", 0.1): 0.34, ("scratch", 1.0): 0.7, ("domain", 0.1): 0.6})
    (w,) = chance_warnings(some, "balanced_accuracy", 3)
    assert w.startswith("'scratch' sits at chance level (balanced accuracy 0.333 for 3 classes)")
    assert "10%" in w and "100%" not in w
    fine = _summary({("scratch", 1.0): 0.8, ("domain", 1.0): 0.85})
    assert chance_warnings(fine, "balanced_accuracy", 2) == []
    assert chance_warnings(some, "accuracy", 3) == []  # chance depends on the class balance
