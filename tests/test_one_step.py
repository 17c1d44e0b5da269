"""The training steps live at module level in the engine, and the step benchmarks time them."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import finetune_step as FT
import pretrain_step as PT

from beitdomain.engine.finetune import ClassifierStep
from beitdomain.engine.pretrain import MIMStep


def test_the_benchmarks_run_the_jobs_own_steps():
    assert PT.MIMStep is MIMStep and FT.ClassifierStep is ClassifierStep


def test_pretraining_step_feeds_the_tokens_to_the_objective():
    class Tok:
        def encode(self, x):  # [B, C, H, W] -> [B, 2, 2] code ids
            return x[:, 0, ::2, ::2].mul(10).long()

    seen = {}

    def objective(images, mask, targets):
        seen["targets"] = targets
        return targets.float().mean(), {"acc": torch.tensor(0.5), "other": 1}

    b = {"image": torch.rand(2, 1, 4, 4), "mask": torch.zeros(2, 4, dtype=torch.bool)}
    b["tok_image"] = torch.rand(2, 1, 4, 4)
    loss, metrics = MIMStep(Tok())(objective, b)
    expected = b["tok_image"][:, 0, ::2, ::2].mul(10).long().flatten(1)
    assert torch.equal(seen["targets"], expected) and not seen["targets"].is_inference()
    assert metrics == {"acc": 0.5} and loss == expected.float().mean()
    assert MIMStep(None).targets(b) is None  # pixel targets: no tokenizer


def test_fine_tuning_step_is_weighted_smoothed_cross_entropy():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    b = {"image": torch.randn(5, 3), "label": torch.tensor([0, 1, 1, 0, 1])}
    w = torch.tensor([0.7, 1.6])
    loss, metrics = ClassifierStep(w, 0.1)(model, b)
    logits = model(b["image"])
    assert torch.allclose(loss, F.cross_entropy(logits, b["label"], weight=w, label_smoothing=0.1))
    assert metrics["train_acc"] == (logits.argmax(-1) == b["label"]).float().mean()
