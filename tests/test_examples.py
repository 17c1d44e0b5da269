"""The runnable examples run (the quick ones, on the CPU)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run_example(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python examples/<name> ARGS` in a subprocess, its output captured as text."""
    cmd = [sys.executable, str(EXAMPLES / name), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_pretrain_on_a_folder_of_real_dicoms(tmp_path):
    out = _run_example("pretrain_dicom_folder.py", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pre-training: 10 steps" in out.stdout
    assert (tmp_path / "pretrain" / "backbone.safetensors").is_file()
    # the deliberately broken bundled files are quarantined with reasons, not silently dropped
    rows = (tmp_path / "tokenizer" / "quarantine.csv").read_text().splitlines()[1:]
    assert rows and all(r.count(",") >= 1 and r.split(",", 1)[1].strip() for r in rows)


def test_elpv_chain_example_is_valid_python():
    pytest.importorskip("elpv_dataset")
    source = (EXAMPLES / "elpv_chain.py").read_text()
    compile(source, "elpv_chain.py", "exec")
    out = _run_example("elpv_chain.py", "--help", timeout=120)
    assert out.returncode == 0 and "--quick" in out.stdout


def test_notebook_api_example_runs_as_a_script(tmp_path):
    out = _run_example("notebook_api.py", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pre-training: 20 steps" in out.stdout
    assert "Beit (1, 64, 64) auto" in out.stdout
    assert "features of 3 MR files: (3, 128)" in out.stdout
    for method in ("knn", "probe"):
        assert f"{method}: balanced accuracy backbone" in out.stdout
