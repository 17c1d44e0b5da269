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

from beitdomain.engine.train import distributed as D  # noqa: E402

TINY = ["--preset", "tiny", "--img-size", "64", "--batch", "2", "--device", "cpu"]
TINY += ["--steps", "1", "--warmup", "0"]


def test_pretrain_step_main_prints_table_and_compares_same_architecture(capsys):
    res = PT.main([*TINY, "--tokenizer", "tiny", "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert "| model | step ms (median) |" in out
    for label in ("ours (BeitMIM, timm)", "HF BeitFor", "share of matmul peak"):
        assert label in out
    assert "Speed-up ours / HF" in out
    cfg = res["config"]
    assert (cfg["num_patches"], cfg["tokenizer_size"], cfg["vocab_size"]) == (64, 32, 64)
    assert cfg["dtype"] == "fp32" and cfg["batch"] == 2
    peaks = cfg["matmul_peak_gflops"]
    assert peaks["fp32"] > 0 and peaks["bf16"] > 0
    for name in ("ours", "hf"):
        r = res[name]
        assert r["img_per_s"] > 0 and r["step_min_s"] <= r["step_s"] <= r["step_max_s"]
        assert r["mfu"] is None and r["peak_gib"] is None  # no peak / no CUDA on CPU
        # fp32 run: the share is of the fp32 matmul peak, from ours' counted FLOPs.
        want = res["ours"]["gflops_per_img"] * r["img_per_s"] / peaks["fp32"]
        assert r["peak_share"] == pytest.approx(want)
    # Same architecture: identical parameter counts (timm's k_bias is a buffer, HF's k_proj
    # has no bias). HF's head runs on all 64 patches instead of the 26 masked ones.
    assert res["ours"]["params"] == res["hf"]["params"]
    assert res["hf"]["gflops_per_img"] > res["ours"]["gflops_per_img"]
    assert res["speedup"] == pytest.approx(res["ours"]["img_per_s"] / res["hf"]["img_per_s"])


def test_finetune_step_main_prints_table(capsys):
    res = FT.main([*TINY, "--num-classes", "3"])
    out = capsys.readouterr().out
    assert "Fine-tuning step: tiny" in out and "| BeitClassifier (timm Beit) |" in out
    r = res["finetune"]
    assert r["img_per_s"] > 0 and r["gflops_per_img"] > 0 and r["mfu"] is None
    assert "share of matmul peak" in out and r["peak_share"] > 0
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
    # ViT-B/16 at 224, no head: 3 x 35.0 GFLOP = 104.9 ("about 107" in issue 9), by the
    # engine's own forward count; a head adds 3 x 2 x tokens x dim x outputs.
    from beitdomain.models.backbone import get_preset

    vit_b = get_preset("vit-base", img_size=224)
    g = C.backbone_train_gflops(vit_b, head_tokens=0, head_out=0)
    assert g == pytest.approx(105.6, abs=1.0)
    head = C.backbone_train_gflops(vit_b, head_tokens=75, head_out=8192) - g
    assert head == pytest.approx(3 * 2 * 75 * 768 * 8192 / 1e9)


def test_the_table_header_records_the_run_folders_commit():
    from beitdomain.engine.run.folder import git_commit

    label = C.env_info(torch.device("cpu"))["commit"]
    full = git_commit()
    if full is None:
        assert label == "unknown"
    else:  # a git checkout: the short hash begins the full one
        assert full.startswith(label.removesuffix("+dirty")) and len(label) >= 7


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


def test_device_and_precision_mean_what_the_library_means():
    cpu = torch.device("cpu")
    assert C.resolve_device("auto") == D.resolve_device("auto")
    for name in ("auto", "bf16", "fp32"):
        assert C.resolve_dtype(name, cpu) == D.resolve_precision(name, cpu)
    with pytest.raises(SystemExit, match="expected auto, bf16 or fp32"):
        C.resolve_dtype("fp16", cpu)


def test_matmul_peak_is_flops_over_the_best_time(monkeypatch):
    times = iter([0.5, 0.25, 1.0])  # seconds of the timed matmuls; the best one counts
    monkeypatch.setattr(C, "timed", lambda fn, device: (next(times), 0.0))
    got = C.matmul_peak_gflops(torch.float32, torch.device("cpu"), n=64, repeats=3)
    assert got == pytest.approx(2 * 64**3 / 0.25 / 1e9)
    assert C.peak_share(2e9, 10.0, 40.0) == pytest.approx(0.5)
    assert C.peak_share(2e9, 10.0, None) is None


def test_demo_step_ab_pairs_each_round_and_alternates_the_order(monkeypatch, tmp_path):
    """`demo_step.py --ab` runs the two checkouts alternately (new first, then old first) and
    reports, beside the ratio of medians, each round's ratio: on a machine whose speed drifts
    between rounds those pairs are the steadier measure."""
    import subprocess
    from types import SimpleNamespace

    import demo_step as DS

    steps = {"new": iter([0.10, 0.20, 0.12]), "old": iter([0.15, 0.18, 0.24])}
    order = []

    def fake_run(cmd, env, **kwargs):
        name = "new" if env["PYTHONPATH"] == str((tmp_path / "new").resolve()) else "old"
        order.append(name)
        row = dict(median_step_s=next(steps[name]), median_cpu_s=0.1, batch=64)
        row |= dict(gflop_per_step=1.0, peak_share_cpu=0.5, first_steps_s=[1.0])
        row["matmul_peak_gflops"] = {"cpu": {"bf16": 100.0}}
        return SimpleNamespace(stdout="log line\n" + json.dumps(row) + "\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    args = SimpleNamespace(new=tmp_path / "new", job="pretrain", steps=2, warmup=1, threads=None)
    args.set, args.old_set, args.rounds = [], [], 3
    res = DS.ab(tmp_path / "old", args)
    assert order == ["new", "old", "old", "new", "new", "old"]
    assert res["per_round_speedup"] == [1.5, 0.9, 2.0]
    assert res["median_round_speedup"] == pytest.approx(1.5)
    assert res["rounds_new_faster"] == 2
    assert res["speedup"] == pytest.approx(0.18 / 0.12)  # medians: old 0.18, new 0.12


def test_elementwise_times_each_pass_eager_and_compiled(capsys):
    """`elementwise.py` compiles each element-wise pass, checks it computes what eager does,
    and reports both times."""
    import elementwise as EW

    EW.main(["--batch", "2", "--tokens", "5", "--width", "8", "--heads", "2", "--calls", "1"])
    out = capsys.readouterr().out
    assert "| pass | eager ms | compiled ms | compiled / eager | compile s |" in out
    lines = out.splitlines()
    rows = [r for r in lines if r.startswith("| ") and not r.startswith(("| pass", "| ---"))]
    assert len(rows) == 4 and any(r.startswith("| GELU forward + backward |") for r in rows)


def test_demo_step_op_times_lists_ops_and_the_matmul_sum():
    import demo_step as DS

    sets = ["pretrain.train.batch_size=4"]
    text = DS.op_times("pretrain", sets, steps=1, warmup=1, top=50)
    head = text.splitlines()[0]
    ops = float(head.split("ops ")[1].split(" ms")[0])
    mm = float(head.split("matrix multiplies ")[1].split(" ms")[0])
    assert 0 < mm < ops
    assert "| mm |" in text and "| addmm |" in text
