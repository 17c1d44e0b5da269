"""Frozen features: k-NN / probe scoring, `load_backbone` + `embed`, `beitdomain eval`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FINETUNE_SETS, recipe, run_cli, write_separable_set

from beitdomain.eval.representation import knn_probs, probe_probs, representation_scores


def test_knn_votes_for_the_nearest_class_and_returns_probabilities():
    rng = np.random.default_rng(0)
    a = rng.normal([5, 0], 0.1, size=(10, 2))
    b = rng.normal([0, 5], 0.1, size=(10, 2))
    train_x, train_y = np.concatenate([a, b]), np.array([0] * 10 + [1] * 10)
    test_x = np.array([[4.0, 0.2], [0.1, 6.0]])
    p = knn_probs(train_x, train_y, test_x, 2, k=5)
    assert p.shape == (2, 2) and np.allclose(p.sum(1), 1.0)
    assert p.argmax(1).tolist() == [0, 1]
    # k larger than the memory is capped, not an error
    assert knn_probs(train_x[:3], train_y[:3], test_x, 2, k=50).shape == (2, 2)


def test_probe_separates_linear_classes_and_handles_a_class_without_examples():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3))
    y = (x[:, 0] > 0).astype(int)
    x[:, 0] += np.where(y == 1, 1.0, -1.0)  # a margin between the classes
    p = probe_probs(x, y, x, 3)  # three classes, class 2 never seen
    assert p.shape == (40, 3) and np.all(p[:, 2] == 0)
    assert (p.argmax(1) == y).mean() == 1.0


def test_scores_report_chance_and_sizes():
    x = np.eye(4)
    y = np.array([0, 1, 0, 1])
    m = representation_scores("knn", (x, y), (x, y), ["a", "b"], k=1)
    assert m["accuracy"] == 1.0 and m["n_train"] == 4 and m["chance_balanced_accuracy"] == 0.5
    with pytest.raises(ValueError, match="valid: knn, probe"):
        representation_scores("svm", (x, y), (x, y), ["a", "b"])


@pytest.fixture
def exported_run(tmp_path):
    """A pre-training run folder's shape: recipe.yaml + backbone.safetensors (timm layout)."""
    from beitdomain.config import dump_recipe
    from beitdomain.engine.build import backbone_config
    from beitdomain.models.export import export_timm_backbone
    from beitdomain.models.mim import BeitMIM

    r = recipe(FINETUNE_SETS, **{"data.normalize": "percentile"})
    torch.manual_seed(0)
    mim = BeitMIM.from_config(backbone_config(r), vocab_size=16)
    run = tmp_path / "pre"
    run.mkdir()
    dump_recipe(r, run / "recipe.yaml")
    export_timm_backbone(mim, run / "backbone.safetensors")
    return run, mim


def test_load_backbone_gives_a_timm_model_with_its_preprocessing(exported_run, tmp_path):
    from timm.models.beit import Beit

    from beitdomain import api

    run, mim = exported_run
    bb = api.load_backbone(run)
    assert isinstance(bb.model, Beit) and bb.model.num_classes == 0
    assert bb.data_config["input_size"] == (1, 64, 64)
    assert bb.spec.normalize == "percentile"  # from the run's recipe
    # the same weights as the trained backbone: patch embedding equal
    assert torch.equal(bb.model.patch_embed.proj.weight, mim.backbone.patch_embed.proj.weight)

    rng = np.random.default_rng(0)
    arrays = [rng.random((80, 96)).astype(np.float32), rng.integers(0, 4096, (3, 70, 70))]
    write_separable_set(tmp_path / "imgs", per_class=1)
    files = sorted((tmp_path / "imgs").rglob("*.png"))
    x = api.embed(bb, [*arrays, *files])
    assert x.shape == (4, 64) and np.isfinite(x).all()
    # one item at a time gives the same rows as a batch
    assert np.allclose(bb.embed(files[0]), x[2:3], atol=1e-5)
    # the same function from a path loads the run itself
    assert np.allclose(api.embed(run, files), x[2:], atol=1e-5)


def test_load_backbone_names_what_it_looked_for(tmp_path):
    from beitdomain.engine.represent import load_backbone
    from beitdomain.user import UserError

    with pytest.raises(UserError, match="not a pre-training run"):
        load_backbone(tmp_path)


def test_api_exports_the_engines():
    from beitdomain import api

    for name in api.__all__:
        assert callable(getattr(api, name)) or isinstance(getattr(api, name), type), name
    with pytest.raises(AttributeError):
        api.no_such_thing  # noqa: B018


def test_eval_knn_and_probe_beside_a_random_backbone(exported_run, tmp_path):
    run, _ = exported_run
    data = write_separable_set(tmp_path / "data", per_class=12)
    out = tmp_path / "eval.json"
    sets = [f"--set={s}" for s in FINETUNE_SETS]
    res = run_cli(
        ["--json", "eval", "knn", str(run), "--data", str(data), "--out", str(out), *sets]
    )
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    saved = json.loads(out.read_text())
    assert printed == saved
    knn = saved["methods"]["knn"]
    assert set(knn) == {"backbone", "random"}
    assert 0.0 <= knn["backbone"]["balanced_accuracy"] <= 1.0
    assert saved["classes"] == ["horizontal", "vertical"] and saved["n_test"] > 0

    res = run_cli(["eval", "probe", str(run), "--data", str(data), "--no-baseline", *sets])
    assert res.returncode == 0, res.stderr
    assert "probe" in res.stdout and "random" not in res.stdout


def test_knn_monitor_logs_once_per_epoch(tmp_path):
    from beitdomain.data.labeled import labeled_data
    from beitdomain.engine.represent_eval import KnnMonitor
    from beitdomain.models.backbone import create_backbone, get_preset

    data = write_separable_set(tmp_path / "data", per_class=8)
    r = recipe(FINETUNE_SETS, **{"data.root": str(data)})
    ld = labeled_data(r, progress=False)
    bb = create_backbone(get_preset("tiny", in_chans=1), final_norm="tokens")
    mon = KnnMonitor(lambda m: m, ld.train, ld.val or ld.test, ld.classes, 64)

    logged = []

    class FakeTrainer:
        model, device, total_steps = bb, torch.device("cpu"), 6
        loader = type("L", (), {"batch_sampler": [0, 1]})()  # two batches per epoch
        dist = type("D", (), {"is_main": True})()

        def log(self, **v):
            logged.append((self.state.step, v))

    t = FakeTrainer()
    for step, (epoch, in_epoch) in enumerate([(0, 1), (0, 2), (1, 1), (1, 2), (2, 1)], 1):
        t.state = type("S", (), {"step": step, "epoch": epoch, "batch_in_epoch": in_epoch})()
        mon.on_step_end(t)
    assert [s for s, _ in logged] == [2, 4]
    assert set(logged[0][1]) == {"knn_balanced_accuracy", "knn_accuracy"}


def _knn_pretrain(
    data: Path, out: Path, steps: int, sets: list[str]
) -> subprocess.CompletedProcess:
    """`beitdomain pretrain` on pixel targets (no tokenizer) with the k-NN monitor every epoch."""
    from helpers import sets_to_args

    argv = ["pretrain", "--data", str(data), "--target", "pixels", "--knn-every", "1"]
    return run_cli([*argv, "--steps", str(steps), "--out", str(out), *sets_to_args(sets)])


def test_pretrain_logs_the_knn_monitor_each_epoch(tmp_path):
    from helpers import PRETRAIN_SETS

    from beitdomain.engine.run.metrics_log import read_metrics

    data = write_separable_set(tmp_path / "data", per_class=8)
    out = tmp_path / "pre"
    # the k-NN memory is the train split, the query the validation split; pre-training leaves
    # the test split out, so an epoch is as many steps as the remaining images make batches
    sets = [
        *PRETRAIN_SETS,
        "pretrain.train.batch_size=4",  # several steps an epoch
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
    ]
    res = _knn_pretrain(data, out, 6, sets)
    assert res.returncode == 0, res.stderr
    records = read_metrics(out / "metrics.jsonl")
    knn = [r for r in records if "knn_balanced_accuracy" in r]
    train = [r for r in records if "loss" in r]
    epoch_ends = [
        max(r["step"] for r in train if r["epoch"] == e) for e in {r["epoch"] for r in train}
    ]
    assert [r["step"] for r in knn] == sorted(epoch_ends)  # once, at the end of every epoch
    assert knn[-1]["step"] == 6 and 1 < len(knn) < 6
    assert all(0.0 <= r["knn_balanced_accuracy"] <= 1.0 for r in knn)


def test_knn_monitor_without_labels_says_what_to_give(tmp_path):
    from helpers import PRETRAIN_SETS

    data = tmp_path / "flat"
    write_separable_set(tmp_path / "d", per_class=4)
    data.mkdir()
    for i, f in enumerate(sorted((tmp_path / "d").rglob("*.png"))):
        f.rename(data / f"{i}.png")  # no subfolders: no labels
    res = _knn_pretrain(data, tmp_path / "pre", 2, PRETRAIN_SETS)
    assert res.returncode == 2
    assert "pretrain.knn_every=1 needs labelled images" in res.stderr
    assert "--labels-csv" in res.stderr


def test_embed_applies_the_weights_input_convention(exported_run, tmp_path):
    """Official-BEiT-style weights expect (x - 0.5) / 0.5: an export carries it, and `embed`
    applies it (the timm model itself does not normalize)."""
    from beitdomain.engine.represent import load_backbone, pooled_features
    from beitdomain.models.export import export_timm_backbone

    run, mim = exported_run
    plain = load_backbone(run)
    assert plain.data_config["mean"] == (0.0,) and plain.data_config["std"] == (1.0,)
    mim.input_norm.set(0.5, 0.5)
    export_timm_backbone(mim, run / "backbone.safetensors")
    bb = load_backbone(run)
    assert bb.data_config["mean"] == (0.5,) and bb.data_config["std"] == (0.5,)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected = pooled_features(bb.model, (x - 0.5) / 0.5)
        assert torch.allclose(bb.features(x), expected)
        assert not torch.allclose(plain.features(x), bb.features(x))
