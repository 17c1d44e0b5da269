"""The curve's classical arms: on exactly the label subsets the fine-tunes train on, and the
verdict against the strongest arm without pre-training."""

from __future__ import annotations

import pytest
from helpers import FINETUNE_SETS, recipe, write_separable_set

from beitdomain.data.labeled import labeled_data
from beitdomain.engine.curve.baselines import (
    PCA,
    PIXELS,
    baseline_rows,
    compare_with_strongest,
    probe_name,
    without_pretraining,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_separable_set(tmp_path_factory.mktemp("curvebase") / "data", per_class=20)


def test_baselines_use_exactly_the_subsets_a_finetune_of_the_same_cell_trains_on(data):
    r = recipe(FINETUNE_SETS, **{"data.root": str(data)})
    cells = [("10", 0), ("10", 1), ("100%", 0)]
    rows, used = baseline_rows(r, {"scratch": None}, cells)
    for spec, seed in cells:
        cell = labeled_data(r, labels=spec, seed=seed, progress=False)  # a fine-tune's labels
        assert used[(spec, seed)] == cell.files["train"]
    assert {(x["init"], x["labels"], x["seed"]) for x in rows} == {
        (arm, spec, seed) for arm in (PIXELS, PCA, probe_name("scratch")) for spec, seed in cells
    }
    ten = [x for x in rows if x["labels"] == "10"]
    assert all(x["n_labels"] == 10 and x["n_test"] == 12 for x in ten)
    full = [x for x in rows if x["labels"] == "100%"]
    assert all(x["n_labels"] == 22 and 0 <= x["balanced_accuracy"] <= 1 for x in full)


def test_the_verdict_compares_against_the_strongest_arm_without_pretraining():
    inits = {"domain": "/weights.safetensors", "scratch": None}
    assert without_pretraining(inits) == ["scratch", PIXELS, PCA, probe_name("scratch")]
    rows = []
    for seed in range(3):
        for arm, v in (("domain", 0.60), ("scratch", 0.55), (PIXELS, 0.67), (PCA, 0.65)):
            rows.append(
                {
                    "init": arm,
                    "fraction": 0.01,
                    "seed": seed,
                    "n_labels": 18,
                    "balanced_accuracy": v + 0.01 * seed,
                }
            )
        rows.append(
            {
                "init": probe_name("domain"),
                "fraction": 0.01,
                "seed": seed,
                "n_labels": 18,
                "balanced_accuracy": 0.99,
            }
        )  # a probe of the pre-trained backbone is pre-trained: never the reference
    out = compare_with_strongest(rows, inits, "balanced_accuracy")
    assert out["choice"] == {0.01: PIXELS}
    assert out["paired"]["domain"][0]["against"] == PIXELS
    assert out["paired"]["domain"][0]["mean"] == pytest.approx(-7.0)
    (text,) = out["verdicts"]
    assert text.startswith("Domain pre-training ('domain') does not pay on this data")
    assert f"behind {PIXELS}" in text


def test_a_timm_cnn_from_random_weights_is_judged_as_an_arm_without_pretraining():
    inits = {"domain": "/weights.safetensors", "scratch": None, "cnn": "timm:resnet10t"}
    rows = [
        {"init": arm, "fraction": 0.1, "seed": seed, "n_labels": 177, "balanced_accuracy": v}
        for seed in range(3)
        for arm, v in (("domain", 0.70), ("scratch", 0.66), ("cnn", 0.72), (PIXELS, 0.69))
    ]
    out = compare_with_strongest(rows, inits, "balanced_accuracy")
    assert out["choice"] == {0.1: "cnn"}  # the CNN is the reference to beat, not a pre-trained arm
    assert list(out["paired"]) == ["domain"] and len(out["verdicts"]) == 1
    assert "('domain')" in out["verdicts"][0] and "behind cnn" in out["verdicts"][0]
