"""`pretrain` end to end on real images: it learns, exports for timm, resumes, fails clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from helpers import (
    PRETRAIN_SETS,
    assert_same_tensors,
    checkpointed_sets,
    flat,
    load_tensors,
    lose_newest_checkpoint,
    recipe,
    sets_to_args,
    write_elpv_subset,
    write_tiny_tokenizer,
)
from typer.testing import CliRunner

from beitdomain.cli.app import app
from beitdomain.engine.pretrain import pretrain
from beitdomain.engine.run.checkpoint import CheckpointManager
from beitdomain.engine.run.metrics_log import read_metrics
from beitdomain.user import UserError

STEPS = 24
runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """32 real ELPV cells at 64 px and a frozen tiny tokenizer (32 px -> 8x8 tokens)."""
    tmp = tmp_path_factory.mktemp("pre")
    return tmp, write_elpv_subset(tmp / "data", per_class=16), write_tiny_tokenizer(tmp / "tok")


def _recipe(data, *extra, **options):
    _, root, tok = data
    opts = {"data.root": str(root), "tokenizer.path": str(tok), **options}
    return recipe([*PRETRAIN_SETS, *extra], **opts)


@pytest.fixture(scope="module")
def pre_run(data):
    tmp = data[0]
    result = pretrain(
        _recipe(data, f"pretrain.train.steps={STEPS}"), tmp / "run", device="cpu", quiet=True
    )
    return tmp / "run", result


def test_loss_falls_and_masked_accuracy_is_logged(pre_run):
    run, result = pre_run
    rec = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in rec] == list(range(1, STEPS + 1))
    loss = np.array([m["loss"] for m in rec])
    acc = np.array([m["acc"] for m in rec])
    assert np.all(np.isfinite(loss))
    assert loss[-5:].mean() < loss[:5].mean() - 0.3, loss  # starts near ln(64) = 4.16
    assert np.all((acc >= 0) & (acc <= 1))
    assert acc[-5:].mean() > acc[:5].mean()
    assert result["steps"] == STEPS and 0 <= result["acc"] <= 1
    for name in ("mim.safetensors", "backbone.safetensors", "backbone.json", "recipe.yaml"):
        assert (run / name).is_file(), name


def test_backbone_loads_into_timm(pre_run):
    run, _ = pre_run
    meta = json.loads((run / "backbone.json").read_text())
    file = run / "backbone.safetensors"
    state = load_tensors(file)
    assert not any(k.startswith(("lm_head", "mask_token", "mim.")) for k in state)
    kwargs = meta["model_kwargs"]
    plain = timm.create_model(meta["model_name"], pretrained=False, num_classes=3, **kwargs)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert unexpected == []
    assert missing and all(k.startswith("head.") for k in missing), missing
    # timm's own pretrained path, as the README tells users to call it
    model = timm.create_model(
        meta["model_name"],
        pretrained=True,
        pretrained_cfg_overlay={"file": str(file)},
        num_classes=3,
        **kwargs,
    )
    own = model.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k
    out = model.eval()(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_export_command_rebuilds_the_backbone(pre_run, tmp_path):
    run, _ = pre_run
    result = runner.invoke(app, ["pretrain", "export", str(run), "--out", str(tmp_path / "exp")])
    assert result.exit_code == 0, result.output
    # the newest checkpoint is the final step, so the export equals the run's own backbone
    assert_same_tensors(
        load_tensors(tmp_path / "exp" / "backbone.safetensors"),
        load_tensors(run / "backbone.safetensors"),
        "export",
    )
    assert json.loads((tmp_path / "exp" / "backbone.json").read_text()) == json.loads(
        (run / "backbone.json").read_text()
    )
    bad = runner.invoke(app, ["pretrain", "export", str(tmp_path)])
    assert bad.exit_code == 2 and "not a pre-training run folder" in flat(bad.output)


def test_missing_tokenizer_is_a_clear_error(data, tmp_path):
    r = _recipe(data, "pretrain.train.steps=2", **{"tokenizer.path": None})
    with pytest.raises(UserError, match=r"tokenizer\.path.*model\.target=pixels"):
        pretrain(r, tmp_path / "a", device="cpu", quiet=True)
    assert not (tmp_path / "a" / "checkpoints").exists()
    _, root, _ = data
    res = runner.invoke(
        app,
        [
            "--device",
            "cpu",
            "pretrain",
            "--data",
            str(root),
            "--out",
            str(tmp_path / "b"),
            *sets_to_args([*PRETRAIN_SETS, "pretrain.train.steps=2"]),
        ],
    )
    assert res.exit_code == 2, res.output
    assert "tokenizer.path" in flat(res.output) and "Traceback" not in res.output


def test_tokenizer_grid_mismatch_is_a_clear_error(data, tmp_path):
    r = _recipe(data, "pretrain.train.steps=2", "data.tokenizer_size=48")  # 48 / 4 = 12x12 tokens
    with pytest.raises(UserError, match=r"12x12 token grid.*8x8 patch grid.*tokenizer_size=32"):
        pretrain(r, tmp_path / "a", device="cpu", quiet=True)
    assert not (tmp_path / "a" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("sets", "metric"),
    [(["mask.kind=random"], "acc"), (["model.target=pixels"], "mse")],
    ids=["random-mask", "pixel-target"],
)
def test_ablations_run(data, tmp_path, sets, metric):
    r = _recipe(data, "pretrain.train.steps=4", *sets)
    result = pretrain(r, tmp_path / "run", device="cpu", quiet=True)
    rec = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rec) == 4 and all(metric in m and np.isfinite(m["loss"]) for m in rec)
    assert result["steps"] == 4 and (tmp_path / "run" / "backbone.safetensors").is_file()


def test_resume_continues_with_the_same_step_and_lr(data, tmp_path):
    """Lose the newest checkpoint, resume: steps 7-8 are re-run with the same lr and loss, and
    the final weights equal the uninterrupted run's bit for bit."""
    r = _recipe(data, *checkpointed_sets("pretrain", 8, 3))
    run = tmp_path / "run"
    pretrain(r, run, device="cpu", quiet=True)
    first = read_metrics(run / "metrics.jsonl")
    final = load_tensors(run / "mim.safetensors")
    mgr = CheckpointManager(run / "checkpoints")
    assert mgr.steps() == [3, 6, 8]
    lose_newest_checkpoint(run, "mim.safetensors", "backbone.safetensors")
    result = pretrain(r, run, device="cpu", quiet=True, resume=True)
    again = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in again] == list(range(1, 9))  # each step logged once
    for a, b in zip(first, again):
        assert a["lr"] == b["lr"] and a["loss"] == b["loss"], (a, b)
    assert result["steps"] == 8
    assert_same_tensors(load_tensors(run / "mim.safetensors"), final, "resumed run")
    manifest = json.loads((run / "manifest.json").read_text())
    assert len(manifest["starts"]) == 2 and manifest["status"] == "completed"
