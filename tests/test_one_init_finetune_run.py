"""A finished fine-tuning run as an init: `engine.build.resolve_init` knows it (BEiT's intermediate
fine-tuning: a related labelled set first, then the target), and `load_backbone`, which reads run
folders through `resolve_init` / `load_init`, gives the same backbone the run's classifier holds."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FINETUNE_SETS, recipe
from safetensors.torch import save_file

from beitdomain.config import dump_recipe
from beitdomain.engine.build import build_classifier, load_init, resolve_init
from beitdomain.engine.job import BEST_FILE, RECIPE_FILE, RESULTS_FILE
from beitdomain.engine.represent import load_backbone
from beitdomain.models.probe import pooled_features


@pytest.fixture
def finetune_run(tmp_path):
    """A finished fine-tuning run folder: recipe, results (its classes) and best weights, whose
    input convention (0.5 / 0.25) is not the one its recipe states for its init (0 / 1)."""
    r = recipe([*FINETUNE_SETS, "model.input_mean=[0.0]", "model.input_std=[1.0]"])
    torch.manual_seed(0)
    clf = build_classifier(r, 2)
    with torch.no_grad():
        for p in clf.parameters():
            p.normal_(0, 0.1)
    clf.input_norm.set(0.5, 0.25)
    run = tmp_path / "ft"
    run.mkdir()
    dump_recipe(r, run / RECIPE_FILE)
    (run / RESULTS_FILE).write_text(json.dumps({"classes": ["a", "b"]}))
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(run / BEST_FILE))
    return r, clf.eval(), run


def test_a_finished_fine_tuning_run_resolves_to_its_best_weights(finetune_run):
    r, clf, run = finetune_run
    assert resolve_init(str(run)) == str(run / BEST_FILE)
    # Intermediate fine-tuning: the target has 3 classes; the backbone loads, the head is new.
    target = build_classifier(r, 3)
    report = load_init(target, resolve_init(str(run)), r)
    assert report is not None and report.missing_backbone == []
    assert any(k.startswith("head.") for k in report.reinitialized)
    for name, tensor in clf.backbone.state_dict().items():
        if "relative_position_index" not in name:
            assert torch.equal(target.backbone.state_dict()[name], tensor), name


def test_load_backbone_of_a_fine_tuning_run_keeps_its_own_convention(finetune_run):
    _, clf, run = finetune_run
    bb = load_backbone(run)
    assert bb.source == str(run / BEST_FILE)
    assert (bb.mean, bb.std) == ((0.5,), (0.25,))  # the weights' record, not the recipe's 0 / 1
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        want = pooled_features(clf.backbone, clf.input_norm(x))
        assert torch.allclose(bb.features(x), want, atol=1e-6)
