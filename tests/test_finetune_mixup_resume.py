"""Fine-tuning with mixup and cutmix resumes bit for bit: timm's `Mixup` draws from NumPy's
global RNG, which no checkpoint holds; `SeededMixup` gives it a stream the checkpoint restores
(issue 40 item 9)."""

from __future__ import annotations

import numpy as np
import torch
from helpers import (
    FINETUNE_SETS,
    assert_same_tensors,
    checkpointed_sets,
    load_tensors,
    lose_newest_checkpoint,
    recipe,
    write_separable_set,
)

from beitdomain.engine.finetune import SeededMixup, finetune
from beitdomain.engine.run.checkpoint import CheckpointManager
from beitdomain.engine.run.metrics_log import read_metrics


def test_a_mixup_run_resumed_from_a_checkpoint_ends_with_the_same_weights(tmp_path):
    data = write_separable_set(tmp_path / "data", per_class=12)
    sets = [
        *FINETUNE_SETS,
        *checkpointed_sets("finetune", 6, 3),
        "finetune.mixup=0.8",
        "finetune.cutmix=1.0",
        "finetune.selection=outside",
    ]
    r = recipe(sets, **{"data.root": str(data)})
    run = tmp_path / "run"
    finetune(r, run, device="cpu", quiet=True)
    first = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    mgr = CheckpointManager(run / "checkpoints")
    final = mgr.load_latest()[1]["model"]
    best = load_tensors(run / "best.safetensors")
    assert mgr.steps() == [3, 6]
    lose_newest_checkpoint(run, "results.json")  # steps 4-6 run again, from step 3's state
    finetune(r, run, device="cpu", quiet=True, resume=True)
    again = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert [(m["step"], m["loss"]) for m in again] == [(m["step"], m["loss"]) for m in first]
    assert_same_tensors(mgr.load_latest()[1]["model"], final, "final weights")
    assert_same_tensors(load_tensors(run / "best.safetensors"), best, "best weights")


def test_seeded_mixup_draws_per_call_and_leaves_numpys_global_rng_alone():
    from timm.data import Mixup

    x = torch.arange(4 * 1 * 8 * 8, dtype=torch.float32).reshape(4, 1, 8, 8)
    y = torch.tensor([0, 1, 0, 1])

    def mixed(calls: int, rank: int = 0) -> torch.Tensor:
        m = SeededMixup(Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=2), 0, rank)
        m.load_state_dict({"calls": calls})
        return m(x.clone(), y)[1]

    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    assert torch.equal(mixed(5), mixed(5))  # call n's draws are a function of n
    assert not torch.equal(mixed(5), mixed(6))
    assert not torch.equal(mixed(5), mixed(5, rank=1))  # each rank its own draws
    assert np.array_equal(np.random.get_state()[1], before)
