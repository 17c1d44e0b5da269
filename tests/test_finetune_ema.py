"""`finetune.ema`: an average of the weights over steps (timm's ModelEmaV3) is what a run
keeps and validates, and a resumed run continues the same average bit for bit."""

from __future__ import annotations

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
from torch import nn

from beitdomain.engine.finetune import finetune
from beitdomain.engine.run.checkpoint import CheckpointManager
from beitdomain.engine.train.ema import WeightEma, weight_ema


def test_the_average_follows_timms_warmed_up_decay():
    model = nn.Linear(3, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = WeightEma(model, decay=0.9)

    class T:  # what the hook reads of a trainer
        def __init__(self, step):
            self.model, self.state = model, type("S", (), {"step": step})()

    want = torch.zeros(1, 3)
    for step in range(1, 40):
        with torch.no_grad():
            model.weight.fill_(float(step))
        ema.on_step_end(T(step))
        t = max(0, step - 1)
        d = 0.0 if t == 0 else min(0.9, 1 - (1 + t) ** (-2 / 3))
        want = d * want + (1 - d) * float(step)
    torch.testing.assert_close(ema.module.weight.detach(), want)
    assert not torch.equal(ema.module.weight.detach(), model.weight.detach())
    ema.copy_to(model)
    assert torch.equal(model.weight.detach(), ema.module.weight.detach())
    assert weight_ema(model, 0.0) is None


def test_an_ema_run_keeps_the_average_and_resumes_bitwise(tmp_path):
    data = write_separable_set(tmp_path / "data", per_class=12)
    sets = [*FINETUNE_SETS, *checkpointed_sets("finetune", 6, 3), "finetune.selection=none"]
    plain = tmp_path / "plain"
    finetune(recipe(sets, **{"data.root": str(data)}), plain, device="cpu", quiet=True)
    r = recipe([*sets, "finetune.ema=0.9"], **{"data.root": str(data)})
    run = tmp_path / "run"
    finetune(r, run, device="cpu", quiet=True)
    mgr = CheckpointManager(run / "checkpoints")
    step, ck = mgr.load_latest()
    assert step == 6
    (average,) = [v["weights"] for k, v in ck["hooks"].items() if k.endswith("WeightEma")]
    kept = load_tensors(run / "best.safetensors")
    # the run keeps the average, which is not the last step's weights (nor a run without it)
    assert_same_tensors(kept, {k: average[k] for k in kept}, "kept weights vs the average")
    live = ck["model"]
    assert any(not torch.equal(kept[k], live[k]) for k in kept if kept[k].is_floating_point())
    assert any(
        not torch.equal(kept[k], v) for k, v in load_tensors(plain / "best.safetensors").items()
    )
    lose_newest_checkpoint(run, "results.json")  # steps 4-6 run again, from step 3's state
    finetune(r, run, device="cpu", quiet=True, resume=True)
    assert_same_tensors(load_tensors(run / "best.safetensors"), kept, "kept weights")


def test_a_segmentation_run_keeps_the_average_too(tmp_path):
    from test_segment_job import _recipe, write_discs

    from beitdomain.engine.segment import finetune_segment

    data = write_discs(tmp_path / "discs", n=12)
    r = _recipe(
        data,
        "finetune.train.steps=6",
        "finetune.train.deterministic=true",
        "finetune.selection=none",
        "finetune.ema=0.9",
    )
    run = tmp_path / "run"
    finetune_segment(r, run, device="cpu", quiet=True)
    ck = CheckpointManager(run / "checkpoints").load_latest()[1]
    (average,) = [v["weights"] for k, v in ck["hooks"].items() if k.endswith("WeightEma")]
    kept = load_tensors(run / "best.safetensors")
    assert_same_tensors(kept, {k: average[k] for k in kept}, "kept weights vs the average")
    live = ck["model"]
    assert any(not torch.equal(kept[k], live[k]) for k in kept if kept[k].is_floating_point())


def test_the_curve_report_says_when_its_cells_keep_the_average():
    from helpers import recipe as make_recipe

    from beitdomain.engine.curve.run import _arm_settings

    on, off = make_recipe(["finetune.ema=0.99"]), make_recipe([])
    got = _arm_settings({"on": on, "off": off}, {"on": None, "off": None})
    assert got["on"]["settings"].endswith(", weight average (EMA) decay 0.99")
    assert "EMA" not in got["off"]["settings"]
