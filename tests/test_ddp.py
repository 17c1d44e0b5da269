"""DDP on CPU: `torchrun --nproc_per_node 2` with the gloo backend runs the real command line; both
ranks end with bit-identical weights, and only rank 0 writes files.

A small driver (written by the test) wraps four library functions before calling the CLI, so no
engine change is needed: `Trainer.fit` (each rank saves its final weights to a side folder),
`fileio.atomic_open` and `MetricsLog.log` (each rank records what it wrote), and
`StepProgress.update` (the img/s each progress line would show).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    FINETUNE_SETS,
    PRETRAIN_SETS,
    REPO,
    TOKENIZER_SETS,
    assert_same_tensors,
    cli_env,
    free_port,
    load_tensors,
    sets_to_args,
    write_elpv_subset,
    write_tiny_tokenizer,
)

from beitdomain.engine.run.metrics_log import read_metrics

DRIVER = r"""
import contextlib, json, os, sys
from pathlib import Path

side = Path(sys.argv[1])
rank = int(os.environ["RANK"])
writes = []

import beitdomain.fileio as fio
from beitdomain.engine.train import distributed as D, loop
from beitdomain.engine.run.metrics_log import MetricsLog

_open = fio.atomic_open

@contextlib.contextmanager
def recording_open(path, mode="wb", **kwargs):
    writes.append(str(path))
    with _open(path, mode, **kwargs) as f:
        yield f

fio.atomic_open = recording_open
_log = MetricsLog.log

def recording_log(self, step, **values):
    writes.append(f"metrics.jsonl@{step}")
    return _log(self, step, **values)

MetricsLog.log = recording_log
_fit = loop.Trainer.fit

def fit_and_dump(self, resume=False):
    state = _fit(self, resume)
    from safetensors.torch import save_file
    sd = {k: v.detach().cpu().contiguous() for k, v in D.unwrap(self.model).state_dict().items()}
    save_file(sd, str(side / f"rank{rank}.safetensors"))
    return state

loop.Trainer.fit = fit_and_dump
_update = loop.StepProgress.update
rates = []

def recording_update(self, step, loss, ips):
    rates.append([step, ips])
    return _update(self, step, loss, ips)

loop.StepProgress.update = recording_update
sys.argv = ["beitdomain", *sys.argv[2:]]
from beitdomain.cli.app import main
try:
    main()
finally:
    (side / f"writes{rank}.json").write_text(json.dumps(writes))
    (side / f"rates{rank}.json").write_text(json.dumps(rates))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return write_elpv_subset(tmp / "cells", per_class=12), write_tiny_tokenizer(tmp / "tok")


def _descendants(pid: int) -> list[int]:
    """The processes below `pid` (Linux's /proc/PID/task/TID/children)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            kids += [int(k) for k in (task / "children").read_text().split()]
    return kids + [d for k in kids for d in _descendants(k)]


def _kill_tree(pid: int) -> None:
    """SIGKILLs `pid` and every process below it: torchrun starts each rank in a session of
    its own, out of reach of a process-group kill, and a hung rank ignores SIGTERM."""
    for p in [pid, *_descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _torchrun(
    tmp_path, args: list[str], *, patches: str = "", timeout: float = 420
) -> subprocess.CompletedProcess:
    """The CLI under two gloo ranks through DRIVER; `patches` is code run before the CLI."""
    driver = tmp_path / "driver.py"
    cli = 'sys.argv = ["beitdomain"'
    driver.write_text(DRIVER.replace(cli, patches + "\n" + cli))
    side = tmp_path / "side"
    side.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(driver),
        str(side),
        "--device",
        "cpu",
        "--quiet",
        *args,
    ]
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.communicate(timeout=30)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pretrain", "tokenizer"])
def test_two_gloo_ranks_hold_identical_weights(kind, data, tmp_path):
    cells, tok = data
    out = tmp_path / "run"
    if kind == "pretrain":
        sets = [*PRETRAIN_SETS, "pretrain.train.steps=4", "pretrain.train.ckpt_every=2"]
        args = ["pretrain", "--data", str(cells), "--tokenizer", str(tok)]
    else:
        # dead-code re-seeding every 2 steps: rank 0's decision must reach rank 1
        sets = [*TOKENIZER_SETS, "tokenizer.train.steps=4", "tokenizer.train.ckpt_every=2"]
        sets += ["tokenizer.dead_code_every=2"]
        args = ["tokenizer", "train", "--data", str(cells)]
    res = _torchrun(tmp_path, [*args, "--out", str(out), *sets_to_args(sets)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    side = tmp_path / "side"
    r0, r1 = load_tensors(side / "rank0.safetensors"), load_tensors(side / "rank1.safetensors")
    assert_same_tensors(r0, r1, "rank 0 vs rank 1")
    # the weights trained: rank 0's final weights are what the run saved
    saved = load_tensors(
        out / ("mim.safetensors" if kind == "pretrain" else "tokenizer.safetensors")
    )
    for k, v in saved.items():
        key = f"mim.{k}" if kind == "pretrain" else k
        assert torch.equal(r0[key], v), k
    # one process wrote files; every step logged once; the global batch spans both ranks
    w0 = json.loads((side / "writes0.json").read_text())
    w1 = json.loads((side / "writes1.json").read_text())
    assert w1 == [], w1
    assert any("checkpoints/step-00000004.pt" in w for w in w0)
    logged = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    # the progress line's img/s is the global rate too, as logged (the same window, measured
    # microseconds apart): not one rank's half of it
    shown = dict(json.loads((side / "rates0.json").read_text()))
    assert shown[4] == pytest.approx(logged[-1]["img_per_s"], rel=0.2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    if kind == "pretrain":
        assert manifest["result"]["global_batch"] == 16  # 8 per rank x 2 ranks
    else:  # the re-seeding really happened (and still left the ranks equal)
        revived = [m for m in read_metrics(out / "metrics.jsonl") if m.get("codes_revived")]
        assert revived and revived[0]["step"] == 2


# Each rank's validation loss, made to disagree: rank 0's grows from the first evaluation on (it
# would stop after 2 worse ones), rank 1's falls (it would never stop).
DIVERGING_VAL = r"""
from beitdomain.engine import finetune as ft
calls = []

def diverging_evaluate(self, trainer):
    calls.append(trainer.state.step)
    n = len(calls)
    loss = 1.0 + n if rank == 0 else 1.0 / n
    return {"loss": loss, "accuracy": 0.5, "balanced_accuracy": 0.5}

ft.EvalHook.evaluate = diverging_evaluate
"""


@pytest.mark.slow
def test_early_stopping_is_rank_0s_decision_on_every_rank(data, tmp_path):
    # Ranks whose validation scores differ (nondeterministic kernels, a sharded evaluation) must
    # still stop on the same step: a rank stopping alone leaves the others in an all-reduce.
    cells, _ = data
    out = tmp_path / "run"
    sets = [
        *FINETUNE_SETS,
        "finetune.train.steps=8",
        "finetune.train.eval_every=1",
        "finetune.early_stopping=2",
        "finetune.select_metric=loss",
        "finetune.selection=outside",
    ]
    args = ["finetune", "--data", str(cells), "--init", "scratch", "--out", str(out)]
    try:
        res = _torchrun(tmp_path, [*args, *sets_to_args(sets)], patches=DIVERGING_VAL, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks hung: one stopped early and the other did not")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    side = tmp_path / "side"
    r0, r1 = load_tensors(side / "rank0.safetensors"), load_tensors(side / "rank1.safetensors")
    assert_same_tensors(r0, r1, "rank 0 vs rank 1")
    results = json.loads((out / "results.json").read_text())
    # rank 0's scores decided: best at step 1, two worse evaluations, stopped after step 3
    assert results["steps"] == 3 and results["best_step"] == 1, results
    assert "early stopping" in results["stopped_early"]
    logged = [m["step"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert logged == [1, 2, 3]
