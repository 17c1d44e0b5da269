"""The checkpoints along one pre-training run, each probed on the curve's own label subsets."""

from __future__ import annotations

import csv

import pytest
from helpers import PRETRAIN_SETS, recipe, write_separable_set

from beitdomain.engine.curve.baselines import baseline_rows, probe_name
from beitdomain.engine.curve.pretrain_length import kept_checkpoints, probe_along_pretraining
from beitdomain.engine.pretrain import pretrain
from beitdomain.user import UserError

CELLS = [("50%", 0), ("50%", 1), ("100%", 0)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("length")
    root = write_separable_set(tmp / "data", per_class=10)
    r = recipe(
        [
            *PRETRAIN_SETS,
            "pretrain.train.steps=4",
            "pretrain.train.ckpt_every=2",
            "pretrain.train.keep_checkpoints=5",
            "model.target=pixels",
            "curve.metric=accuracy",
        ],
        **{"data.root": str(root)},
    )
    pretrain(r, tmp / "pre", device="cpu", quiet=True)
    return r, tmp / "pre", tmp


def test_every_kept_checkpoint_is_probed_beside_a_random_backbone(run):
    r, pre, tmp = run
    assert list(kept_checkpoints(pre)) == [2, 4]
    table = probe_along_pretraining(r, pre, CELLS, tmp / "out")
    assert [(row["step"], row["labels"]) for row in table] == [
        (0, "50%"), (2, "50%"), (4, "50%"), (0, "100%"), (2, "100%"), (4, "100%"),
    ]  # fmt: skip
    assert {row["seeds"] for row in table if row["labels"] == "50%"} == {2}
    with open(tmp / "out" / "pretrain_length.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert (tmp / "out" / "pretrain_length.png").stat().st_size > 1000
    # the last checkpoint's probe is the probe of the run's final backbone: the checkpoint was
    # loaded, not left random
    rows, _ = baseline_rows(r, {"final": str(pre / "backbone.safetensors")}, [("100%", 0)])
    final = next(x for x in rows if x["init"] == probe_name("final"))
    last = next(x for x in table if x["step"] == 4 and x["labels"] == "100%")
    assert last["probe_accuracy"] == round(final["accuracy"], 4)
    for row in table:
        assert row["gain_over_pixels"] == pytest.approx(
            row["probe_accuracy"] - row["pixels_accuracy"], abs=2e-4
        )


def test_a_checkpoint_without_its_checksum_is_not_probed_and_none_is_an_error(run, tmp_path):
    r, pre, _ = run
    (pre / "checkpoints" / "step-00000002.pt.json").rename(tmp_path / "sidecar.json")
    try:
        assert list(kept_checkpoints(pre)) == [4]
    finally:
        (tmp_path / "sidecar.json").rename(pre / "checkpoints" / "step-00000002.pt.json")
    with pytest.raises(UserError, match="no complete checkpoint"):
        probe_along_pretraining(r, tmp_path / "nothing", CELLS, tmp_path / "out")


def _table(values):
    return [
        {"step": s, "labels": "1%", "seeds": 6, "probe_balanced_accuracy": v, "probe_std": 0.01,
         "pixels_balanced_accuracy": 0.6, "gain_over_pixels": v - 0.6}
        for s, v in values
    ]  # fmt: skip


def test_the_demo_report_says_whether_the_probe_still_rises_at_the_last_step():
    from beitdomain.engine.demo import length_section

    rising = length_section(_table([(0, 0.55), (200, 0.60), (400, 0.63)]))
    assert "| 400 | 0.630 |" in rising and "0.600" in rising
    assert "still rising at the last step" in rising
    flat = length_section(_table([(0, 0.55), (200, 0.66), (400, 0.63)]))
    assert "best at step 200 of 400" in flat and "still rising" not in flat
