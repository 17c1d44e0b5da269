"""The CNN arm (`--init timm:<arch>`): a timm network from random weights, fine-tuned with the
same data, augmentations and schedule as the BEiT arms, predicted with like any run, counted as
an arm without pre-training, and never given layer decay (issue 35 items 3 and 4)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from helpers import FINETUNE_SETS, recipe, write_separable_set

from beitdomain.engine.build import build_classifier
from beitdomain.engine.curve.baselines import without_pretraining
from beitdomain.engine.finetune import finetune, is_pretrained, resolve_init
from beitdomain.engine.predict import predict_files
from beitdomain.models.cnn import TimmClassifier
from beitdomain.user import UserError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_separable_set(tmp_path_factory.mktemp("cnn") / "data", per_class=16)


def _sets(*extra: str) -> list[str]:
    return [*FINETUNE_SETS, "finetune.train.steps=20", "finetune.selection=outside", *extra]


@pytest.fixture(scope="module")
def cnn_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cnnrun") / "run"
    # 40 steps: BatchNorm's running statistics need more steps than a ViT's LayerNorm to settle
    sets = _sets("finetune.init=timm:resnet10t", "finetune.train.steps=40")
    r = recipe(sets, **{"data.root": str(data)})
    return out, finetune(r, out, device="cpu", quiet=True)


def test_a_timm_init_builds_that_network_from_random_weights(data):
    r = recipe(_sets("finetune.init=timm:resnet10t"), **{"data.root": str(data)})
    a, b = build_classifier(r, 3), build_classifier(r, 3)
    assert isinstance(a, TimmClassifier) and a.arch == "resnet10t" and a.num_classes == 3
    assert a.backbone.conv1[0].in_channels == r.data.in_chans
    assert a(torch.rand(2, r.data.in_chans, 64, 64)).shape == (2, 3)
    torch.manual_seed(0)
    c = build_classifier(r, 3)
    torch.manual_seed(0)
    d = build_classifier(r, 3)
    assert torch.equal(c.head.weight, d.head.weight)  # seeded like every other arm
    assert not torch.equal(a.backbone.conv1[0].weight, b.backbone.conv1[0].weight)


def test_the_cnn_arm_learns_and_trains_without_layer_decay(cnn_run):
    out, res = cnn_run
    assert res["init"] == "timm:resnet10t"
    assert res["layer_decay"] is None  # FINETUNE_SETS ask for 0.9: a random net gets none
    assert res["test"]["accuracy"] >= 0.8, res["test"]  # stripes: chance is 0.5
    saved = json.loads((out / "results.json").read_text())
    assert saved["test"] == res["test"]


def test_predict_rebuilds_the_cnn_and_reproduces_its_test_predictions(cnn_run, data, tmp_path):
    out, _ = cnn_run
    with open(out / "test_predictions.csv", newline="") as f:
        test_rows = list(csv.DictReader(f))
    files = [str(data / r["path"]) for r in test_rows[:6]]
    csv_out, skipped = predict_files(out, files, tmp_path / "p.csv", device="cpu")
    assert not skipped
    with open(csv_out, newline="") as f:
        got = list(csv.DictReader(f))
    assert [g["predicted"] for g in got] == [r["predicted"] for r in test_rows[:6]]


def test_scratch_beit_fine_tuning_gets_no_layer_decay_either(data, tmp_path):
    # unilm and DeiT train a random ViT with every layer at the full lr: at depth 12 and 0.65
    # the patch embedding would get 0.4% of the head's lr.
    r = recipe(_sets("finetune.train.steps=2"), **{"data.root": str(data)})
    assert r.finetune.optim.layer_decay == 0.9
    res = finetune(r, tmp_path / "ft", device="cpu", quiet=True)
    assert res["layer_decay"] is None


def test_timm_inits_are_arms_without_pretraining():
    assert resolve_init("timm:resnet18") == "timm:resnet18"
    assert not is_pretrained("timm:resnet18") and not is_pretrained(None)
    assert is_pretrained("runs/pre/backbone.safetensors")
    arms = without_pretraining({"cnn": "timm:resnet18", "scratch": None, "domain": "x.pt"})
    assert "cnn" in arms and "scratch" in arms and "domain" not in arms


def test_an_unknown_architecture_is_refused_with_close_names():
    with pytest.raises(UserError, match="resnet18"):
        resolve_init("timm:resnet_18")


def test_a_bare_timm_init_on_the_curve_is_named_by_its_architecture():
    from beitdomain.cli.curve import parse_inits

    assert parse_inits(["timm:resnet18", "scratch", "cnn=timm:resnet10t"]) == {
        "resnet18": "timm:resnet18",
        "scratch": None,
        "cnn": "timm:resnet10t",
    }


def test_a_random_cnn_s_batchnorm_is_set_from_the_images_before_its_probe_head(data, tmp_path):
    """With the random net's running statistics (0, 1), eval-mode features (what the probe head
    is fitted on) differ from the train-mode features of the first steps by orders of magnitude,
    and the LP-FT head then starts at a huge loss (16,500 on ELPV with resnet18)."""
    import copy

    from beitdomain.data.labeled import labeled_data
    from beitdomain.data.transforms import FinetuneTransform
    from beitdomain.engine.build import build_classifier
    from beitdomain.models.cnn import recalibrate_batchnorm

    r = recipe(_sets("finetune.init=timm:resnet10t"), **{"data.root": str(data)})
    torch.manual_seed(0)
    model = build_classifier(r, 2)
    train = copy.copy(labeled_data(r).train)
    train.transform = FinetuneTransform(train=False, image_size=r.data.image_size)
    images = torch.stack([train[i]["image"] for i in range(len(train))])

    def gap() -> float:  # eval-mode vs train-mode (batch statistics) features, relative
        model.eval()
        with torch.no_grad():
            ev = model.forward_features(images)
            model.train()
            tr = model.forward_features(images)
        return float((ev - tr).norm() / tr.norm())

    before = gap()
    assert recalibrate_batchnorm(model, train, torch.device("cpu"), batch_size=len(train)) > 0
    after = gap()
    assert before > 0.5 and after < 0.05, (before, after)
    assert model.training  # as it was (gap() left it in train mode)

    # Through the job: the first logged loss of the LP-FT CNN run is of the order of ln 2.
    out = tmp_path / "run"
    sets = _sets(
        "finetune.init=timm:resnet10t", "finetune.head_init=probe", "finetune.train.log_every=1"
    )
    finetune(recipe(sets, **{"data.root": str(data)}), out, device="cpu", quiet=True)
    first = next(json.loads(line) for line in (out / "metrics.jsonl").open() if '"loss"' in line)
    assert first["loss"] < 5.0, first
