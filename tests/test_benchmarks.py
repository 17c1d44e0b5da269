"""Smoke tests of the speed benchmarks on CPU with tiny models: they run, print the table and
return the fields the README and BENCHMARKS.md rely on. No timing assertions (shared CPUs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common as C  # noqa: E402
import finetune_step as FT  # noqa: E402
import gpu_suite as GS  # noqa: E402
import pretrain_step as PT  # noqa: E402

from beitdomain.engine.pretrain import MIMObjective  # noqa: E402
from beitdomain.models.mim import BeitMIM  # noqa: E402

TINY = ["--preset", "tiny", "--img-size", "64", "--batch", "2", "--device", "cpu"]
TINY += ["--steps", "1", "--warmup", "0"]


def test_pretrain_step_main_prints_table_and_compares_same_architecture(capsys):
    res = PT.main([*TINY, "--tokenizer", "tiny", "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert "| model | step ms (median) |" in out
    for label in ("ours (BeitMIM, timm)", "last block on masked tokens", "HF BeitFor"):
        assert label in out
    assert "Speed-up ours / HF" in out
    cfg = res["config"]
    assert (cfg["num_patches"], cfg["tokenizer_size"], cfg["vocab_size"]) == (64, 32, 64)
    assert cfg["dtype"] == "fp32" and cfg["batch"] == 2
    for name in ("ours", "ours_masked_last", "hf"):
        r = res[name]
        assert r["img_per_s"] > 0 and r["step_min_s"] <= r["step_s"] <= r["step_max_s"]
        assert r["mfu"] is None and r["peak_gib"] is None  # no peak / no CUDA on CPU
    # Same architecture: identical parameter counts (timm's k_bias is a buffer, HF's k_proj
    # has no bias). HF's head runs on all 64 patches instead of the 26 masked ones.
    assert res["ours"]["params"] == res["hf"]["params"]
    assert res["hf"]["gflops_per_img"] > res["ours"]["gflops_per_img"]
    assert res["ours_masked_last"]["gflops_per_img"] < res["ours"]["gflops_per_img"]
    assert res["speedup"] == pytest.approx(res["ours"]["img_per_s"] / res["hf"]["img_per_s"])


def test_masked_last_block_objective_equals_mim_loss_and_grads():
    torch.manual_seed(0)
    cfg = PT.backbone_config("tiny", img_size=64).replace(use_shared_rel_pos_bias=False)
    mim = BeitMIM.from_config(cfg, vocab_size=64)
    with torch.no_grad():  # move LayerScale and biases off their init so every term matters
        for p in mim.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = PT.make_batches(1, 3, cfg, 32, torch.device("cpu"))[0]
    targets = torch.randint(0, 64, (3, 64))
    ref, _ = MIMObjective(mim)(b["image"], b["mask"], targets)
    new, _ = PT.MaskedLastBlockObjective(mim)(b["image"], b["mask"], targets)
    params = [p for p in mim.parameters()]
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    g_new = torch.autograd.grad(new, params, allow_unused=True)
    assert new.item() == pytest.approx(ref.item(), abs=1e-5)
    for a, c in zip(g_ref, g_new):
        assert (a is None) == (c is None)
        if a is not None:
            torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-4)


def test_finetune_step_main_prints_table(capsys):
    res = FT.main([*TINY, "--num-classes", "3"])
    out = capsys.readouterr().out
    assert "Fine-tuning step: tiny" in out and "| BeitClassifier (timm Beit) |" in out
    r = res["finetune"]
    assert r["img_per_s"] > 0 and r["gflops_per_img"] > 0 and r["mfu"] is None
    # Counted FLOPs of the tiny model agree with the analytic 3 x forward within 25%
    # (the counter skips the patch embedding's input gradient, the analytic count has it).
    assert r["gflops_per_img"] == pytest.approx(res["analytic_gflops_per_img"], rel=0.25)


def test_gpu_suite_quick_on_cpu(tmp_path, capsys):
    out_json = tmp_path / "suite.json"
    res = GS.main(["--device", "cpu", "--quick", "--out", str(out_json)])
    out = capsys.readouterr().out
    assert "GPU suite" in out and "issue" not in out and "torch " in out and "commit " in out
    assert "skipped (no CUDA)" in out
    assert "data loader, cache + pretrain transform + mask" in out
    for key in ("pretrain", "finetune", "loader", "attention"):
        assert "error" not in res[key], res[key]
    assert res["loader"]["img_per_s"] > 0 and res["loader"]["images_timed"] > 0
    assert res["max_batch_pretrain"]["max_batch"] is None
    att = res["attention"]["fwd_bwd_ms"]
    assert isinstance(att["MATH"], float) and att["EFFICIENT"] == "skipped (no CUDA)"
    saved = json.loads(out_json.read_text())
    assert saved["pretrain"]["ours"]["params"] == res["pretrain"]["ours"]["params"]


def test_largest_batch_bisects_to_the_limit():
    assert C.largest_batch(lambda b: b <= 300, start=16, cap=2048) in range(291, 301)
    assert C.largest_batch(lambda b: True, start=16, cap=100) == 100
    assert C.largest_batch(lambda b: False, start=16, cap=100) == 0


def test_analytic_vit_b_training_flops_match_issue_figure():
    # ViT-B/16 at 224, no head: 3 x 35.2 GFLOP = 105.6 ("about 107" in issue 9).
    g = C.vit_train_gflops(
        tokens=197, dim=768, depth=12, mlp_ratio=4.0, patch_pixels=768, head_tokens=0, head_out=0
    )
    assert g == pytest.approx(105.6, abs=1.0)


def test_count_flops_counts_forward_and_backward_matmuls():
    lin = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(5, 8)
    fwd = C.count_flops(lambda: lin(x))
    assert fwd == 2 * 5 * 8 * 4
    # backward: weight grad only (x needs no grad) = one more matmul of the same size
    assert C.count_flops(lambda: lin(x).sum().backward()) == 2 * fwd


def test_peak_tflops_only_for_known_bf16_gpus():
    cpu = torch.device("cpu")
    assert C.default_peak_tflops(cpu, torch.bfloat16) is None
    assert C.mfu(1e9, 100.0, None) is None
    assert C.mfu(1e9, 100.0, 1.0) == pytest.approx(0.1)
