"""`finetune` and `predict` end to end: learns a separable set, records its labels, reproduces
its test predictions, refuses impossible label requests up front, resumes exactly."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from helpers import (
    FINETUNE_SETS,
    assert_same_tensors,
    checkpointed_sets,
    flat,
    list_images,
    load_tensors,
    lose_newest_checkpoint,
    recipe,
    sets_to_args,
    write_separable_set,
)
from typer.testing import CliRunner

from beitdomain.cli.app import app
from beitdomain.data.splits import LabelSubsetError
from beitdomain.engine.finetune import finetune
from beitdomain.engine.predict import predict
from beitdomain.engine.run.checkpoint import CheckpointManager
from beitdomain.engine.run.metrics_log import read_metrics

runner = CliRunner()


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_separable_set(tmp_path_factory.mktemp("ft") / "data", per_class=16)


@pytest.fixture(scope="module")
def ft_run(data, tmp_path_factory):
    """A scratch fine-tune on horizontal-vs-vertical stripes, reading files directly (no cache).
    60 steps: a random backbone trains without layer decay and needs about 30 to separate them."""
    out = tmp_path_factory.mktemp("ftrun") / "run"
    # selection 'outside': the split's validation images pick the checkpoint (listed in
    # labels_used.csv), as before within-budget selection became the default
    r = recipe(
        [*FINETUNE_SETS, "finetune.train.steps=60", "finetune.selection=outside"],
        **{"data.root": str(data)},
    )
    res = finetune(r, out, device="cpu", quiet=True)
    return out, res


def test_beats_chance_on_the_test_split(ft_run):
    out, res = ft_run
    test = res["test"]
    assert test["n"] >= 8
    assert test["accuracy"] >= 0.8, test  # chance is 0.5
    assert test["balanced_accuracy"] >= 0.75
    saved = json.loads((out / "results.json").read_text())
    assert saved["test"]["accuracy"] == test["accuracy"] and saved["init"] == "scratch"
    for name in ("confusion_matrix.png", "best.safetensors", "labels.json", "training_curves.png"):
        assert (out / name).is_file(), name
    val = [m for m in read_metrics(out / "metrics.jsonl") if "val_balanced_accuracy" in m]
    assert val, "validation was never logged"


def test_labels_used_lists_exactly_the_images_used(ft_run, data):
    out, res = ft_run
    rows = _rows(out / "labels_used.csv")
    by_split: dict[str, set[str]] = {}
    for r in rows:
        by_split.setdefault(r["split"], set()).add(r["path"])
    assert len(rows) == sum(len(v) for v in by_split.values())  # no path listed twice
    everything = {p.relative_to(data).as_posix() for p in list_images(data)}
    assert set().union(*by_split.values()) == everything  # 100% labels: every file is used
    assert not (by_split["train"] & by_split["test"]) and not (by_split["val"] & by_split["test"])
    assert len(by_split["train"]) == res["n_labels"] == res["n_train"]
    # the test split in labels_used.csv is the one that was scored
    scored = {r["path"] for r in _rows(out / "test_predictions.csv")}
    assert scored == by_split["test"]


def test_label_subset_is_recorded(data, tmp_path):
    r = recipe(
        [*FINETUNE_SETS, "finetune.train.steps=2", "finetune.labels=4/class"],
        **{"data.root": str(data)},
    )
    res = finetune(r, tmp_path / "run", device="cpu", quiet=True)
    rows = _rows(tmp_path / "run" / "labels_used.csv")
    train = [r["path"] for r in rows if r["split"] == "train"]
    assert res["n_labels"] == len(train) == 8 and res["n_train"] > 8
    assert sorted(p.split("/")[0] for p in train) == ["horizontal"] * 4 + ["vertical"] * 4
    labels = json.loads((tmp_path / "run" / "labels.json").read_text())
    assert labels["per_class"] == {"horizontal": 4, "vertical": 4}


def test_predict_reproduces_the_test_predictions(ft_run, data, tmp_path):
    out, _ = ft_run
    expected = _rows(out / "test_predictions.csv")
    files = [str(data / r["path"]) for r in expected]
    predict(out, files, tmp_path / "pred.csv", device="cpu")
    got = {r["path"]: r for r in _rows(tmp_path / "pred.csv")}
    assert len(got) == len(expected)
    for e in expected:
        g = got[str(data / e["path"])]
        assert g["predicted"] == e["predicted"]
        for c in ("p_horizontal", "p_vertical"):
            # bf16 autocast on this CPU, and predict's batches differ from the test split's:
            # bf16 holds about 3 digits
            assert float(g[c]) == pytest.approx(float(e[c]), abs=1e-3), (e["path"], c)
    # a folder works too, through the CLI
    res = runner.invoke(
        app, ["--device", "cpu", "predict", str(out), str(data), "--out", str(tmp_path / "d.csv")]
    )
    assert res.exit_code == 0, res.output
    assert len(_rows(tmp_path / "d.csv")) == len(list_images(data))


@pytest.fixture(scope="module")
def four_classes(tmp_path_factory):
    """30 images in 4 classes: too few for 1% of the labels to hold one of each class."""
    from PIL import Image

    root = tmp_path_factory.mktemp("four") / "data"
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(8 if c < 2 else 7):
            img = rng.integers(0, 255, (64, 64), dtype=np.uint8)
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.png")
    return root


def test_impossible_label_request_fails_before_training(four_classes, tmp_path):
    r = recipe(
        [*FINETUNE_SETS, "finetune.train.steps=2", "finetune.labels=1%"],
        **{"data.root": str(four_classes)},
    )
    with pytest.raises(LabelSubsetError) as err:
        finetune(r, tmp_path / "run", device="cpu", quiet=True)
    message = str(err.value)
    assert "1%" in message and "fewer than the 4 classes" in message
    # nothing trained: no checkpoints, no metrics, no results
    for name in ("checkpoints", "metrics.jsonl", "results.json", "best.safetensors"):
        assert not (tmp_path / "run" / name).exists(), name
    res = runner.invoke(
        app,
        [
            "--device",
            "cpu",
            "finetune",
            "--data",
            str(four_classes),
            "--labels",
            "1%",
            "--init",
            "scratch",
            "--out",
            str(tmp_path / "cli"),
            *sets_to_args(FINETUNE_SETS),
        ],
    )
    assert res.exit_code == 2, res.output
    assert "fewer than the 4 classes" in flat(res.output) and "Traceback" not in res.output
    assert not (tmp_path / "cli" / "checkpoints").exists()


def test_resume_continues_with_the_same_step_and_lr(data, tmp_path):
    r = recipe([*FINETUNE_SETS, *checkpointed_sets("finetune", 8, 3)], **{"data.root": str(data)})
    run = tmp_path / "run"
    first_res = finetune(r, run, device="cpu", quiet=True)
    first = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    mgr = CheckpointManager(run / "checkpoints")
    final = mgr.load_latest()[1]["model"]
    best = load_tensors(run / "best.safetensors")
    assert mgr.steps() == [3, 6, 8]
    lose_newest_checkpoint(run, "results.json")
    res = finetune(r, run, device="cpu", quiet=True, resume=True)
    again = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in again] == list(range(1, 9))
    for a, b in zip(first, again):
        assert (a["step"], a["lr"], a["loss"]) == (b["step"], b["lr"], b["loss"])
    assert res["steps"] == 8 and res["test"] == first_res["test"]
    assert_same_tensors(mgr.load_latest()[1]["model"], final, "final weights")
    assert_same_tensors(load_tensors(run / "best.safetensors"), best, "best weights")


def _probe_model(num_classes: int):
    from beitdomain.models.backbone import get_preset
    from beitdomain.models.classifier import BeitClassifier

    cfg = get_preset("tiny", img_size=32, patch_size=8, in_chans=1, embed_dim=16, depth=1)
    return BeitClassifier.from_config(cfg, num_classes)


def test_probe_head_is_the_fitted_logistic_regression_on_raw_features():
    # LP-FT's head: the standardization of the fit is folded into the head, so the head applied
    # to the raw features gives sklearn's decision function (binary: logit difference).
    import torch
    from sklearn.linear_model import LogisticRegression

    from beitdomain.models.probe import fit_probe_head

    rng = np.random.default_rng(0)
    X = rng.normal(3.0, [0.5, 4.0] * 8, size=(40, 16))  # shifted, unequal scales
    y = (X[:, 0] - 3.0 + 0.1 * rng.normal(size=40) > 0).astype(int)
    model = _probe_model(2)
    info = fit_probe_head(model, X, y, c=0.5, balanced=True)
    assert info["fitted"] and info["train_accuracy"] >= 0.9
    z = (X - X.mean(0)) / (X.std(0) + 1e-6)
    ref = LogisticRegression(C=0.5, max_iter=5000, class_weight="balanced").fit(z, y)
    with torch.no_grad():
        logits = model.head(torch.as_tensor(X, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], ref.decision_function(z), atol=1e-4)
    assert (logits.argmax(1) == ref.predict(z)).all()


def test_probe_head_multiclass_and_a_class_without_labels():
    import torch

    from beitdomain.models.probe import fit_probe_head

    rng = np.random.default_rng(1)
    centers = rng.normal(0, 3, size=(3, 16))
    y = np.repeat([0, 1, 3], 10)  # class 2 of 4 has no training label
    X = centers[np.searchsorted([0, 1, 3], y)] + rng.normal(size=(30, 16))
    model = _probe_model(4)
    info = fit_probe_head(model, X, y, c=1.0)
    assert info["train_accuracy"] == 1.0
    with torch.no_grad():
        pred = model.head(torch.as_tensor(X, dtype=torch.float32)).argmax(1).numpy()
    assert (pred == y).all()  # and class 2 is never predicted
    one = fit_probe_head(_probe_model(2), X[:5], np.zeros(5, dtype=int))
    assert not one["fitted"] and "one class" in one["reason"]


def test_finetune_with_a_probe_head_starts_from_the_probe(data, tmp_path):
    # At lr 0 nothing moves, so the saved head must be exactly the probe fitted on the frozen
    # (here random) backbone's features of the training labels, seen without augmentation.
    import copy

    import torch

    from beitdomain.data.labeled import labeled_data
    from beitdomain.data.transforms import FinetuneTransform
    from beitdomain.engine.build import build_classifier
    from beitdomain.engine.predict import load_weights
    from beitdomain.engine.train import distributed as D
    from beitdomain.models.probe import dataset_features, fit_probe_head

    r = recipe(
        [
            *FINETUNE_SETS,
            "finetune.train.steps=2",
            "finetune.optim.lr=0",
            "finetune.optim.min_lr=0",
            "finetune.head_init=probe",
            "finetune.probe_c=1.0",
            "finetune.class_weighting=loss",
        ],
        **{"data.root": str(data)},
    )
    run = tmp_path / "probe"
    finetune(r, run, device="cpu", quiet=True)
    saved = json.loads((run / "head_probe.json").read_text())
    assert saved["fitted"] and saved["c"] == 1.0

    model = build_classifier(r, 2)
    load_weights(model, run / "best.safetensors")
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    train = copy.copy(labeled_data(r, progress=False).train)
    train.transform = FinetuneTransform(train=False, image_size=r.data.image_size)
    amp = D.resolve_precision(r.finetune.train.precision, torch.device("cpu"))
    X, y = dataset_features(model, train, torch.device("cpu"), amp_dtype=amp)
    assert len(y) == saved["n"] == json.loads((run / "labels.json").read_text())["n_labels"]
    again = fit_probe_head(model, X, y, c=1.0, balanced=True)
    assert again["train_accuracy"] == saved["train_accuracy"]
    for k, v in model.head.state_dict().items():
        torch.testing.assert_close(v, head[k], rtol=1e-4, atol=1e-5)
    assert head["weight"].abs().max() > 0.05  # not the small random init (scale 0.01)


def test_lr_grid_keeps_the_learning_rate_validation_prefers(data, tmp_path):
    # lr 0 cannot learn the stripes, 2e-3 can: validation must pick 2e-3, and the grid's folder
    # must then hold that run's weights and metrics, readable by predict like any run.
    from beitdomain.user import UserError

    r = recipe(
        [
            *FINETUNE_SETS,
            "finetune.train.steps=60",
            "finetune.lr_grid=[0.0, 2.0e-3]",
            "finetune.selection=outside",
        ],
        **{"data.root": str(data)},
    )
    run = tmp_path / "grid"
    res = finetune(r, run, device="cpu", quiet=True)
    assert res["lr"] == 2.0e-3 and [t["lr"] for t in res["lr_grid"]] == [0.0, 2.0e-3]
    scores = [t["val_best"] for t in res["lr_grid"]]
    assert scores[1] > scores[0]
    chosen = run / "lr-0.002"
    assert json.loads((chosen / "results.json").read_text())["test"] == res["test"]
    assert json.loads((run / "results.json").read_text())["lr"] == 2.0e-3
    assert_same_tensors(
        load_tensors(run / "best.safetensors"), load_tensors(chosen / "best.safetensors"), "best"
    )
    out_csv = tmp_path / "pred.csv"
    predict(run, [str(list_images(data)[0])], out_csv, device="cpu")
    assert len(_rows(out_csv)) == 1
    # Without a validation split there is nothing to choose on: a clear error.
    no_val = recipe(
        [
            *FINETUNE_SETS,
            "finetune.train.steps=2",
            "finetune.lr_grid=[1e-3]",
            "data.val_fraction=0",
            "finetune.selection=outside",
        ],
        **{"data.root": str(data)},
    )
    with pytest.raises(UserError, match="validation split"):
        finetune(no_val, tmp_path / "noval", device="cpu", quiet=True)
    assert not list((tmp_path / "noval").glob("lr-*"))  # refused before any training
    # Nor with no selection at all (the default): the message names the ways to select.
    fixed = recipe([*FINETUNE_SETS, "finetune.lr_grid=[1e-3, 2e-3]"], **{"data.root": str(data)})
    with pytest.raises(UserError, match="selection is 'none'.*finetune.selection=carve"):
        finetune(fixed, tmp_path / "fixed", device="cpu", quiet=True)
    assert not list((tmp_path / "fixed").glob("lr-*"))


def test_results_record_the_peak_learning_rate(ft_run, data, tmp_path):
    # "lr" is the schedule's peak: optim.lr when set, else the linear scaling rule (never None).
    from beitdomain.engine.train.optim import peak_lr

    out, res = ft_run
    assert res["lr"] == 2e-3 == json.loads((out / "results.json").read_text())["lr"]
    top = max(m["lr"] for m in read_metrics(out / "metrics.jsonl") if "lr" in m)
    assert top == pytest.approx(res["lr"])
    r = recipe(
        [*FINETUNE_SETS, "finetune.train.steps=2", "finetune.optim.lr=null"],
        **{"data.root": str(data)},
    )
    scaled = finetune(r, tmp_path / "scaled", device="cpu", quiet=True)["lr"]
    assert scaled is not None and scaled == pytest.approx(peak_lr(r.finetune.optim, 8))


def test_each_job_builds_its_backbone_with_its_own_grad_checkpointing():
    # Fine-tuning follows finetune.train.grad_checkpointing, pre-training its own section.
    from beitdomain.engine.build import build_classifier
    from beitdomain.engine.pretrain import build_mim

    on, off = "grad_checkpointing=true", "grad_checkpointing=false"
    ft_only = recipe([*FINETUNE_SETS, f"finetune.train.{on}", f"pretrain.train.{off}"])
    pre_only = recipe([*FINETUNE_SETS, f"finetune.train.{off}", f"pretrain.train.{on}"])
    assert build_classifier(ft_only, 2).backbone.grad_checkpointing is True
    assert build_classifier(pre_only, 2).backbone.grad_checkpointing is False
    flags = {
        name: [
            m.grad_checkpointing
            for m in build_mim(r, 16)[0].modules()
            if hasattr(m, "grad_checkpointing")
        ]
        for name, r in (("ft_only", ft_only), ("pre_only", pre_only))
    }
    assert flags["pre_only"] and all(flags["pre_only"]) and not any(flags["ft_only"])
