"""benchmarks/device_check.sh, the one-GPU check of issue 37, in its tiny mode: the same script
on the CPU at tiny sizes (about a minute), ending with a summary that has every section."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, cli_env

SECTIONS = (
    "# Device check",
    "## Install",
    "## Environment",
    "## GPU suite",
    "## Attention kernel",
    "## Host syncs and the real-size chain",
    "## Compiled step",
)


@pytest.mark.slow
def test_the_tiny_device_check_writes_a_summary_with_every_section(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "device_check.sh"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # the script finds the repository itself
        env=cli_env(OUT=str(out), PYTHON=sys.executable, TMPDIR=str(tmp_path)),
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    at = [summary.find(s) for s in SECTIONS]
    assert -1 not in at and at == sorted(at), summary  # each section, in order
    assert "mode tiny (CPU)" in summary
    # the suite ran, with the pre-training step synced and unsynced
    assert "`gpu_suite`: exit 0" in summary
    assert "| pretrain step, ours |" in summary
    assert "| pretrain step, ours, no per-step sync |" in summary
    assert "scaled_dot_product_attention" in summary  # which kernel ran
    # the chain: three jobs through the CLI, each trained and logged its steps
    report = json.loads((out / "syncs.json").read_text())
    assert list(report) == ["tokenizer", "pretrain", "finetune"]
    for name, r in report.items():
        assert r["status"] == "ok" and r["steps"] == 2, (name, r)
        assert f"- {name}: ok" in summary
    assert "syncs not counted (no CUDA)" in summary
    assert (out / "gpu_suite.json").is_file() and (out / "logs.tar.gz").is_file()
    assert not list(tmp_path.glob("device_check.*")), "the work folder is removed"
