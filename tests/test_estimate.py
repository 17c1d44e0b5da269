"""The CPU time estimate said before a long run: FLOP counts, arithmetic and the warning."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from beitdomain.engine.train import estimate as E
from beitdomain.models.backbone import create_backbone, get_preset


@pytest.mark.parametrize("preset,size", [("tiny", 64), ("vit-small", 224)])
def test_vit_flops_formula_matches_torch_counter(preset, size):
    cfg = get_preset(preset, img_size=size, in_chans=1)
    with torch.device("meta"):
        model = create_backbone(cfg)
    x = torch.empty(1, 1, size, size, device="meta")
    with FlopCounterMode(display=False) as counter:
        model.forward_features(x)
    counted = counter.get_total_flops() / 1e9
    formula = E.vit_forward_gflops(size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.mlp_ratio)
    assert formula == pytest.approx(counted, rel=0.1)


def test_estimate_is_steps_times_images_times_flops_over_rate(monkeypatch):
    monkeypatch.setattr(E, "matmul_gflops", lambda dtype=torch.float32: 100.0)
    est = E.estimate_cpu_time("pretrain", 1000, 64, forward_gflops=1.0, frozen_gflops=0.5)
    assert est.train_gflops_per_image == 3.5
    assert est.seconds == pytest.approx(1000 * 64 * 3.5 / (100.0 * E.EFFICIENCY))
    assert "1,000 steps x 64 images" in est.describe()


def test_matmul_rate_is_measured_and_positive():
    assert E.matmul_gflops(torch.float32, 0.05) > 0.1


def test_a_gpu_sized_run_on_a_cpu_warns_with_the_laptop_recipe(monkeypatch, caplog):
    monkeypatch.setattr(E, "matmul_gflops", lambda dtype=torch.float32: 20.0)
    # ct-dicom's tokenizer: 89 GFLOP per 112 px image, batch 128
    slow = E.estimate_cpu_time("tokenizer", 2000, 128, forward_gflops=29.7)
    with caplog.at_level(logging.WARNING):
        assert E.warn_if_slow_on_cpu(slow, torch.device("cpu"), "ct-dicom", "dicom")
    text = caplog.text
    assert "tokenizer with recipe 'ct-dicom' on a CPU" in text and "--recipe cpu-dicom" in text
    assert "on this CPU: about 16d12h" in text  # 2000 x 128 x 89.1 GFLOP / (20 x 0.8) GFLOP/s
    caplog.clear()
    assert not E.warn_if_slow_on_cpu(slow, torch.device("cuda"), "ct-dicom")
    quick = E.estimate_cpu_time("finetune", 10, 8, forward_gflops=0.1)
    with caplog.at_level(logging.INFO):
        assert not E.warn_if_slow_on_cpu(quick, torch.device("cpu"), "cpu-dicom")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # a short run is no warning, but its estimate is still said
    assert "finetune on this CPU: 10 steps x 8 images" in caplog.text


def test_a_gpu_recipe_on_the_cpu_warns_before_its_first_step(tmp_path, monkeypatch, caplog):
    """The issue's case: `tokenizer train --recipe ct-dicom --steps 2` (minutes a step) warned
    nothing. Now the estimate is said before training starts."""
    from helpers import write_separable_set

    from beitdomain.config import load_recipe
    from beitdomain.engine import job as job_mod
    from beitdomain.engine.tokenizer import train_tokenizer

    data = write_separable_set(tmp_path / "d", per_class=2, size=16)
    r = load_recipe(
        "ct-dicom",
        {
            "data.root": str(data),
            "data.normalize": "percentile",
            "data.window": None,
            # two images a class are too few to split off a test set: use them all
            "data.transductive": True,
        },
        ["tokenizer.train.steps=1000", "data.num_workers=0"],
    )
    monkeypatch.setattr(E, "matmul_gflops", lambda dtype=torch.float32: 20.0)

    def stop(*args, **kwargs):  # the estimate is made; no need to train
        raise KeyboardInterrupt

    monkeypatch.setattr(job_mod.Job, "trainer", stop)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        train_tokenizer(r, tmp_path / "tok", device="cpu", quiet=True)
    # 3 training images (batch capped by the data; one held out) x 89 GFLOP (the base dVAE at
    # 112 px, x3 for training) x 1000 steps at 16 GFLOP/s: about 4.6 hours
    assert "tokenizer with recipe 'ct-dicom' on a CPU: 1,000 steps x 3 images x 89" in caplog.text
    assert "--recipe cpu-dicom" in caplog.text
