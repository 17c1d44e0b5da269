"""One init resolver and one init loader: every job that takes an `--init` reads it the same way
(engine.build.resolve_init, load_init), for each kind of init."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import FINETUNE_SETS, recipe

from beitdomain.engine.build import build_classifier, load_init, resolve_init
from beitdomain.engine.job import BACKBONE_FILE, RECIPE_FILE
from beitdomain.engine.pretrain import build_mim
from beitdomain.models.export import export_timm_backbone
from beitdomain.user import UserError


@pytest.fixture
def pretrain_run(tmp_path):
    """A finished pre-training run folder: its recipe and exported backbone."""
    r = recipe(FINETUNE_SETS)
    torch.manual_seed(0)
    mim, _ = build_mim(r, 16)
    with torch.no_grad():
        for p in mim.backbone.parameters():
            p.normal_(0, 0.1)
    run = tmp_path / "pre"
    run.mkdir()
    (run / RECIPE_FILE).write_text("{}\n")
    export_timm_backbone(mim, run / BACKBONE_FILE)
    return r, mim, run


def test_resolve_init_for_each_kind(pretrain_run, tmp_path):
    _, _, run = pretrain_run
    for scratch in (None, "scratch", "none", "Random"):
        assert resolve_init(scratch) is None
    assert resolve_init(str(run)) == str(run / BACKBONE_FILE)  # a run folder: its export
    assert resolve_init(str(run / BACKBONE_FILE)) == str(run / BACKBONE_FILE)  # a weights file
    assert resolve_init("timm:resnet18") == "timm:resnet18"  # a timm network, from random
    with pytest.raises(UserError, match="resnet18"):
        resolve_init("timm:resnet_18")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / RECIPE_FILE).write_text("{}\n")
    with pytest.raises(UserError, match="has not finished pre-training"):
        resolve_init(str(unfinished))
    with pytest.raises(UserError, match="no such file or folder"):
        resolve_init(str(tmp_path / "absent.safetensors"))


def test_pretraining_and_fine_tuning_load_a_run_folder_alike(pretrain_run):
    # Continued pre-training from a finished run (model.init) and fine-tuning from it
    # (finetune.init) load the same backbone: before, pre-training took the folder for a
    # checkpoint folder and refused it.
    r, mim, run = pretrain_run
    cont, report = build_mim(replace(r, model=replace(r.model, init=str(run))), 16)
    assert report is not None and report.missing_backbone == []
    ft = replace(r.finetune, init=resolve_init(str(run)))
    clf = build_classifier(replace(r, finetune=ft), 2)
    assert load_init(clf, ft.init, r) is not None
    x = torch.rand(2, r.data.in_chans, r.data.image_size, r.data.image_size)
    last = dict(indices=1, output_fmt="NLC", intermediates_only=True)  # the last block's tokens

    def tokens(m):
        with torch.no_grad():
            return m.eval().backbone.forward_intermediates(m.input_norm(x), **last)[0]

    torch.testing.assert_close(tokens(cont), tokens(mim), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens(clf), tokens(mim), atol=1e-5, rtol=1e-5)


def test_scratch_and_timm_networks_load_nothing():
    r = recipe(FINETUNE_SETS)
    clf = build_classifier(r, 2)
    assert load_init(clf, None, r) is None
    with pytest.raises(UserError, match="timm network"):
        build_mim(replace(r, model=replace(r.model, init="timm:resnet18")), 16)
