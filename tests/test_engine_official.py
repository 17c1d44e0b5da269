"""`continue-official-beit` from a random checkpoint in each official layout (unilm .pth, timm
safetensors, HF folder): it starts, `init_report.json` says what was loaded, resized and
re-initialized, the first loss sits near ln(vocab), and the run's exports carry the convention."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from helpers import (
    PRETRAIN_SETS,
    TIMM_TOKENS,
    randomize,
    timm_beit,
    tiny_hf_beit_config,
    write_elpv_subset,
    write_tiny_tokenizer,
)
from safetensors.torch import save_file
from typer.testing import CliRunner

from beitdomain.cli.app import app
from beitdomain.config import load_recipe
from beitdomain.engine.pretrain import export_run, pretrain
from beitdomain.engine.run.metrics_log import read_metrics
from beitdomain.models.backbone import get_preset
from beitdomain.models.classifier import BeitClassifier
from beitdomain.models.convert import load_backbone_weights

VOCAB = 64  # the tiny tokenizer's; the official heads below have as many outputs
RGB = get_preset("tiny")  # 64 px, 8 px patches, width 64, 2 blocks, 3 channels


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("official")
    return tmp, write_elpv_subset(tmp / "data", per_class=8), write_tiny_tokenizer(tmp / "tok")


def _confident_head(state: dict, seed: int) -> None:
    # A head that is sure of codes that mean nothing to the domain tokenizer.
    g = torch.Generator().manual_seed(seed)
    state["lm_head.weight"] = torch.randn(VOCAB, 64, generator=g) * 2.0
    state["lm_head.bias"] = torch.zeros(VOCAB)
    state["mask_token"] = torch.randn(1, 1, 64, generator=g) * 0.02


def _unilm(tmp) -> str:
    state = dict(timm_beit(RGB, 1, **TIMM_TOKENS).state_dict())  # one shared table
    _confident_head(state, 1)
    torch.save({"model": state, "epoch": 799}, tmp / "beit_pt.pth")
    return str(tmp / "beit_pt.pth")


def _timm_file(tmp) -> str:
    per_block = timm_beit(RGB.replace(use_shared_rel_pos_bias=False), 2, **TIMM_TOKENS)
    state = {k: v.contiguous() for k, v in per_block.state_dict().items()}
    save_file(state, tmp / "timm.safetensors")
    return str(tmp / "timm.safetensors")


def _hf(tmp) -> str:
    config = tiny_hf_beit_config(
        64, vocab_size=VOCAB, use_mask_token=True, use_shared_relative_position_bias=True
    )
    transformers = pytest.importorskip("transformers")
    model = transformers.BeitForMaskedImageModeling(config)
    randomize(model, 3)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(tmp / "hf")
    transformers.BeitImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp / "hf")
    return str(tmp / "hf")


@pytest.mark.parametrize("layout", ["unilm", "timm", "hf"])
def test_continue_official_beit_from_each_layout(data, layout):
    tmp, root, tok = data
    init = {"unilm": _unilm, "timm": _timm_file, "hf": _hf}[layout](tmp)
    r = load_recipe(
        "continue-official-beit",
        {"data.root": str(root), "tokenizer.path": str(tok), "model.init": init},
        [
            *PRETRAIN_SETS,
            "pretrain.train.steps=3",
            "pretrain.train.batch_size=4",
            "pretrain.optim.lr=1e-4",
        ],
    )
    run = tmp / f"run-{layout}"
    pretrain(r, run, device="cpu", quiet=True)
    report = json.loads((run / "init_report.json").read_text())
    assert report["format"] == layout
    assert report["input"]["mean"] == [0.5] and report["input"]["std"] == [0.5]
    assert any(
        s.startswith("patch_embed.proj.weight: (64, 3, 8, 8) -> (64, 1, 8, 8)")
        for s in report["reshaped"]
    )
    assert "blocks.1.mlp.fc2.weight" in report["loaded"]
    assert report["missing"] == [] or set(report["missing"]) <= {
        "mask_token",
        "lm_head.weight",
        "lm_head.bias",
    }
    if layout == "timm":  # per-block tables that differ: a per-block MIM model
        assert any("one table per block" in n for n in report["notes"])
        assert "blocks.0.attn.relative_position_bias_table" in report["loaded"]
    else:
        assert "lm_head.weight" in report["reinitialized"]
        assert "rel_pos_bias.relative_position_bias_table" in report["loaded"]
    first = read_metrics(run / "metrics.jsonl")[0]["loss"]
    assert abs(first - math.log(VOCAB)) < 0.5, first  # a fresh head, not the confident one
    backbone = json.loads((run / "backbone.json").read_text())
    assert backbone["input"] == {"in_chans": 1, "input_size": 64, "mean": [0.5], "std": [0.5]}
    folder = export_run(run, fmt="timm")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    cfg = model.pretrained_cfg
    assert cfg["mean"] == [0.5] and cfg["std"] == [0.5] and cfg["input_size"] == (1, 64, 64)
    # Fine-tuning reads the run's backbone with its convention.
    clf = BeitClassifier.from_config(RGB.replace(in_chans=1, use_shared_rel_pos_bias=False), 2)
    assert load_backbone_weights(clf, run / "backbone.safetensors").input["mean"] == [0.5]
    if layout == "hf":  # the CLI's Hugging Face export
        transformers = pytest.importorskip("transformers")
        result = CliRunner().invoke(app, ["pretrain", "export", str(run), "--format", "hf"])
        assert result.exit_code == 0, result.output
        proc = transformers.AutoImageProcessor.from_pretrained(run / "export-hf")
        hf = transformers.BeitModel.from_pretrained(run / "export-hf")
        assert list(proc.image_mean) == [0.5] and hf.config.num_channels == 1


def test_reusing_the_confident_head_starts_far_above_ln_vocab(data):
    # The control for the test above: the same unilm file with its head kept.
    tmp, root, tok = data
    r = load_recipe(
        "continue-official-beit",
        {"data.root": str(root), "tokenizer.path": str(tok), "model.init": _unilm(tmp)},
        [
            *PRETRAIN_SETS,
            "pretrain.train.steps=1",
            "pretrain.train.batch_size=4",
            "model.lm_head=reuse",
        ],
    )
    pretrain(r, tmp / "run-reuse", device="cpu", quiet=True)
    report = json.loads((tmp / "run-reuse" / "init_report.json").read_text())
    assert "lm_head.weight" in report["loaded"] and report["reinitialized"] == []
    assert read_metrics(tmp / "run-reuse" / "metrics.jsonl")[0]["loss"] > math.log(VOCAB) + 2
