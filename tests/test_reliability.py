"""Issue 10: kills, damaged checkpoints, full disks, non-finite losses, bad files, bad label CSVs,
empty folders and untrusted pickles lose nothing and explain themselves.

The kill tests run the real command line in a subprocess, SIGKILL it at random moments after a
checkpoint appears, re-run it with --resume until it finishes, and compare the final weights with
an uninterrupted run bit for bit (CPU, train.deterministic=true).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    FINETUNE_SETS,
    PRETRAIN_SETS,
    TOKENIZER_SETS,
    assert_same_tensors,
    checkpointed_sets,
    cli_command,
    cli_env,
    load_tensors,
    recipe,
    run_cli,
    said,
    sets_to_args,
    write_elpv_subset,
    write_labels_csv,
    write_separable_set,
    write_tiny_tokenizer,
)
from typer.testing import CliRunner

import beitdomain.engine.pretrain as pretrain_engine
from beitdomain.cli.app import app
from beitdomain.data.index import ScanError
from beitdomain.data.labeled import labeled_data
from beitdomain.engine.finetune import finetune
from beitdomain.engine.pretrain import pretrain
from beitdomain.engine.run.checkpoint import CheckpointManager
from beitdomain.engine.run.metrics_log import read_metrics
from beitdomain.engine.train.loop import NonFiniteLossError
from beitdomain.models.convert import WeightsError, load_backbone_weights
from beitdomain.user import UserError

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Real ELPV cells (unlabelled work), stripes (labelled work) and a frozen tiny tokenizer."""
    tmp = tmp_path_factory.mktemp("rel")
    cells = write_elpv_subset(tmp / "cells", per_class=12)
    stripes = write_separable_set(tmp / "stripes", per_class=12)
    return {"cells": cells, "stripes": stripes, "tok": write_tiny_tokenizer(tmp / "tok")}


# --------------------------------------------------------------------------------------------
# kill -9 at random moments, resume, compare bit for bit
# --------------------------------------------------------------------------------------------

KILL_STEPS = 20  # headroom: a fast first run may pass several checkpoints in the kill delay


def _pretrain_argv(data: dict) -> list[str]:
    """`pretrain` on the ELPV cells with the frozen tiny tokenizer."""
    return ["pretrain", "--data", str(data["cells"]), "--tokenizer", str(data["tok"])]


def _command(kind: str, data: dict, out: Path) -> tuple[list[str], str, list[str]]:
    """(argv, checkpoint folder, weight files to compare) for a deterministic tiny run."""
    if kind == "tokenizer":
        sets = [*TOKENIZER_SETS, "tokenizer.dead_code_every=4"]
        sets += checkpointed_sets("tokenizer", KILL_STEPS, 2)
        argv = ["tokenizer", "train", "--data", str(data["cells"])]
        files = ["tokenizer.safetensors"]
    elif kind == "pretrain":
        sets = [*PRETRAIN_SETS, *checkpointed_sets("pretrain", KILL_STEPS, 2)]
        argv = _pretrain_argv(data)
        files = ["mim.safetensors", "backbone.safetensors"]
    else:
        sets = [*FINETUNE_SETS, *checkpointed_sets("finetune", KILL_STEPS, 2)]
        argv = ["finetune", "--data", str(data["stripes"]), "--init", "scratch"]
        files = ["best.safetensors"]
    return [*argv, "--out", str(out), *sets_to_args(sets)], str(out / "checkpoints"), files


def _ckpt_path(ckpt_dir: str, step: int) -> Path:
    return Path(ckpt_dir) / f"step-{step:08d}.pt"


def _kill_after_checkpoint(
    argv: list[str], before: Path, ckpt: Path, fraction: float, log: Path
) -> dict:
    """Starts the command and sends SIGKILL `fraction` (in [0, 1)) of a checkpoint interval after
    `ckpt` appears. The interval is the time this process took from `before` (the checkpoint
    ahead of `ckpt`) to `ckpt`, so on any machine the kill lands within about one interval
    after `ckpt` (possibly mid-way through writing the next checkpoint's checksum); a fixed
    delay let a fast machine run to the end first."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            cli_command(*argv), stdout=subprocess.DEVNULL, stderr=err, env=cli_env()
        )
        deadline = time.monotonic() + 300
        seen_before = None
        try:
            while not ckpt.exists():
                if seen_before is None and before.exists():
                    seen_before = time.monotonic()
                if proc.poll() is not None:
                    pytest.fail(
                        f"ended (rc {proc.returncode}) before {ckpt.name}: {log.read_text()}"
                    )
                if time.monotonic() > deadline:
                    pytest.fail(f"no {ckpt.name} after 300 s")
                time.sleep(0.002)
            interval = time.monotonic() - seen_before if seen_before is not None else 0.05
            delay = fraction * interval
            time.sleep(delay)
            alive = proc.poll() is None
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert alive, f"the run finished before the kill {delay:.3f}s after {ckpt.name}"
    return {"after": ckpt.name, "delay_s": round(delay, 4), "rc": proc.returncode}


def _train_records(run: Path) -> list[tuple]:
    return [
        (m["step"], m["lr"], m["loss"]) for m in read_metrics(run / "metrics.jsonl") if "loss" in m
    ]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tokenizer", "pretrain", "finetune"])
def test_kill9_then_resume_is_bitwise_identical(kind, data, tmp_path):
    ref_argv, _, files = _command(kind, data, tmp_path / "ref")
    ref = run_cli(ref_argv)
    assert ref.returncode == 0, ref.stderr

    run = tmp_path / "killed"
    argv, ckpt_dir, _ = _command(kind, data, run)
    rng = random.Random(f"{kind}-kill")  # fixed kill moments per command, different per command
    kills = []
    # kill 1 in the first run, kill 2 in the resumed run: at a random moment within about a
    # checkpoint interval after a checkpoint appears (possibly mid-way through writing the next
    # one's checksum). Both checkpoints a kill waits for are written by the current process:
    # one already on disk would time the interval from the process's start, or kill the
    # resumed run before it started.
    for i in range(2):
        resume = ["--resume"] if i else []
        done_steps = CheckpointManager(ckpt_dir).steps()
        step = (max(done_steps) if done_steps else 0) + 4
        assert step < KILL_STEPS, f"the first run got to step {step - 4} before its kill"
        before, ckpt = _ckpt_path(ckpt_dir, step - 2), _ckpt_path(ckpt_dir, step)
        kills.append(
            _kill_after_checkpoint([*argv, *resume], before, ckpt, rng.random(), tmp_path / "log")
        )
    assert all(k["rc"] == -signal.SIGKILL for k in kills)
    done = run_cli([*argv, "--resume"])
    assert done.returncode == 0, done.stderr
    for name in files:
        assert_same_tensors(load_tensors(run / name), load_tensors(tmp_path / "ref" / name), name)
    # the same trajectory, each step logged once
    assert _train_records(run) == _train_records(tmp_path / "ref")
    assert [r[0] for r in _train_records(run)] == list(range(1, KILL_STEPS + 1))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and len(manifest["starts"]) == 3
    (tmp_path / "kills.json").write_text(json.dumps(kills))


# --------------------------------------------------------------------------------------------
# damaged checkpoints, full disk, non-finite losses (through real pre-training runs)
# --------------------------------------------------------------------------------------------


def _pre_recipe(data, *extra):
    return recipe(
        [*PRETRAIN_SETS, *checkpointed_sets("pretrain", 6, 2), *extra],
        **{"data.root": str(data["cells"]), "tokenizer.path": str(data["tok"])},
    )


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at 2, 4, 6."""
    out = tmp_path_factory.mktemp("ref") / "run"
    pretrain(_pre_recipe(data), out, device="cpu", quiet=True)
    return out


@pytest.mark.parametrize("damage", ["truncated", "bit-flip", "no-checksum"])
def test_damaged_latest_checkpoint_falls_back_with_a_warning(
    damage, data, reference, tmp_path, caplog
):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    mgr = CheckpointManager(run / "checkpoints")
    assert mgr.steps() == [2, 4, 6]
    latest = mgr.path_for(6)
    raw = latest.read_bytes()
    if damage == "truncated":
        latest.write_bytes(raw[: len(raw) // 2])
    elif damage == "bit-flip":
        i = len(raw) // 2
        latest.write_bytes(raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1 :])
    else:
        latest.with_name(latest.name + ".json").unlink()
    for name in ("mim.safetensors", "backbone.safetensors"):
        (run / name).unlink()
    with caplog.at_level("INFO"):
        pretrain(_pre_recipe(data), run, device="cpu", quiet=True, resume=True)
    reason = {
        "truncated": "truncated",
        "bit-flip": "checksum mismatch",
        "no-checksum": "no checksum",
    }
    assert "step-00000006.pt" in caplog.text and reason[damage] in caplog.text
    assert "resumed from step 4" in caplog.text
    assert_same_tensors(
        load_tensors(run / "mim.safetensors"), load_tensors(reference / "mim.safetensors"), damage
    )


def test_all_checkpoints_damaged_is_a_clear_error(data, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    mgr = CheckpointManager(run / "checkpoints")
    for step in mgr.steps():
        mgr.path_for(step).write_bytes(b"garbage")
    argv = [*_pretrain_argv(data), "--out", str(run), "--resume", *sets_to_args(PRETRAIN_SETS)]
    res = runner.invoke(app, ["--device", "cpu", *argv])
    assert res.exit_code == 2, res.output
    assert said(res.output, "no usable checkpoint", "step-00000002.pt", "step-00000006.pt")


class _DiskFillsAfter:
    """A writable file that fails with ENOSPC once `limit` bytes are written, as a full disk."""

    def __init__(self, f, limit):
        self.f, self.left = f, limit

    def write(self, b):
        if len(b) > self.left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


@pytest.mark.parametrize("free_mib", [8, 10_000])
def test_torch_save_on_a_full_disk_is_a_write_error(tmp_path, monkeypatch, free_mib):
    # torch.save turns the file's ENOSPC into RuntimeError("... unexpected pos ..."); with the
    # file system nearly full that is reported as a full disk naming the file, and otherwise
    # left alone. Either way the previous file is intact and no temporary file is left.
    from beitdomain import fileio

    path = tmp_path / "step-00000004.pt"
    path.write_bytes(b"previous")
    monkeypatch.setattr(fileio, "free_bytes", lambda folder: free_mib << 20)
    obj = {"w": torch.randn(10_000)}
    expected = fileio.WriteError if free_mib < 64 else RuntimeError
    with pytest.raises(expected) as info:
        fileio.atomic_save(path, lambda f: torch.save(obj, _DiskFillsAfter(f, 5000)))
    if expected is fileio.WriteError:
        assert info.value.errno == errno.ENOSPC
        assert said(str(info.value), str(path), "No space left on device", "8 MiB free")
        assert said(str(info.value), "previous version is intact")
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(
    data, reference, tmp_path, monkeypatch
):
    real_save = torch.save
    calls = {"n": 0}

    def save_until_disk_full(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 checkpoint: half written, then the disk is full
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_disk_full)
    run = tmp_path / "run"
    sets = [*PRETRAIN_SETS, *checkpointed_sets("pretrain", 6, 2)]
    argv = [*_pretrain_argv(data), "--out", str(run), *sets_to_args(sets)]
    res = runner.invoke(app, ["--device", "cpu", *argv])
    assert res.exit_code == 2, res.output
    assert said(res.output, "No space left on device", "step-00000004.pt")
    assert said(res.output, "previous version is intact") and "Traceback" not in res.output
    mgr = CheckpointManager(run / "checkpoints")
    assert mgr.steps() == [2]
    assert mgr.verify(mgr.path_for(2)) is None
    leftovers = [p.name for p in (run / "checkpoints").iterdir()]
    assert sorted(leftovers) == ["step-00000002.pt", "step-00000002.pt.json"]  # no temp files
    # space freed: --resume continues from step 2 and ends where the uninterrupted run ended
    monkeypatch.setattr(torch, "save", real_save)
    pretrain(_pre_recipe(data), run, device="cpu", quiet=True, resume=True)
    assert_same_tensors(
        load_tensors(run / "mim.safetensors"), load_tensors(reference / "mim.safetensors"), "disk"
    )


def _nan_from_call(monkeypatch, first_bad: int, last_bad: int | None = None) -> None:
    real = pretrain_engine.MIMObjective.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        loss, metrics = real(self, *args, **kwargs)
        if calls["n"] >= first_bad and (last_bad is None or calls["n"] <= last_bad):
            loss = loss * float("nan")
        return loss, metrics

    monkeypatch.setattr(pretrain_engine.MIMObjective, "forward", forward)


def test_nonfinite_losses_stop_with_a_clear_message_and_a_good_checkpoint(
    data, reference, tmp_path, monkeypatch
):
    _nan_from_call(monkeypatch, first_bad=4)  # steps 1-3 fine, then NaN for ever
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        pretrain(_pre_recipe(data, "pretrain.train.max_nonfinite=3"), run, device="cpu", quiet=True)
    msg = str(err.value)
    assert "3 non-finite losses in a row at step 3" in msg
    assert str(run / "checkpoints") in msg and "pretrain.optim.lr" in msg
    mgr = CheckpointManager(run / "checkpoints")
    assert mgr.steps() == [2]
    _, state = mgr.load_latest()
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    ref = CheckpointManager(reference / "checkpoints").load_latest()
    assert ref is not None
    good = torch.load(reference / "checkpoints" / "step-00000002.pt", weights_only=True)
    assert_same_tensors(state["model"], good["model"], "last good checkpoint")
    assert not (run / "mim.safetensors").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "NonFiniteLossError" in manifest["error"]


def test_isolated_nonfinite_losses_are_skipped_and_counted(data, tmp_path, monkeypatch):
    _nan_from_call(monkeypatch, first_bad=3, last_bad=4)  # two bad micro-batches in a row
    run = tmp_path / "run"
    result = pretrain(
        _pre_recipe(data, "pretrain.train.max_nonfinite=3"), run, device="cpu", quiet=True
    )
    rec = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in rec] == list(range(1, 7)) and result["steps"] == 6
    assert all(np.isfinite(m["loss"]) for m in rec)
    assert rec[-1]["nonfinite_skipped"] == 2 and rec[0]["nonfinite_skipped"] == 0


# --------------------------------------------------------------------------------------------
# bad input files, label CSVs, empty folders
# --------------------------------------------------------------------------------------------


def _bad_files(folder: Path) -> dict[str, str]:
    """Writes one file of each kind of trouble into `folder`; returns name -> kind."""
    import pydicom
    from helpers import bundled_dicom
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    good_png = next(iter(sorted(folder.parent.rglob("*.png")))).read_bytes()
    (folder / "empty.png").write_bytes(b"")
    (folder / "cut.png").write_bytes(good_png[: len(good_png) // 3])
    (folder / "notes.png").write_bytes(b"this is not an image, just text\n" * 4)
    (folder / "noise.dcm").write_bytes(np.random.default_rng(0).bytes(2000))
    ds = pydicom.dcmread(bundled_dicom())
    del ds.PixelData
    ds.save_as(folder / "nopixels.dcm")
    # a decompression bomb: 20000 x 20000 one-bit pixels, ~50 kB on disk
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")
    return {
        "empty.png": "zero-byte",
        "cut.png": "truncated",
        "notes.png": "not an image",
        "noise.dcm": "random bytes",
        "nopixels.dcm": "DICOM without pixel data",
        "bomb.png": "400 Mpixel image",
    }


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    root = write_separable_set(tmp_path_factory.mktemp("dirty") / "data", per_class=8)
    bad = _bad_files(root / "horizontal")
    return root, bad


def _pixels_recipe(root, *extra):
    return recipe(
        [*PRETRAIN_SETS, "model.target=pixels", "pretrain.train.steps=2", *extra],
        **{"data.root": str(root)},
    )


def test_bad_files_fail_before_training_naming_every_one(dirty, tmp_path):
    root, bad = dirty
    with pytest.raises(ScanError) as err:
        pretrain(_pixels_recipe(root), tmp_path / "run", device="cpu", quiet=True)
    msg = str(err.value)
    assert f"{len(bad)} of {len(bad) + 16} files could not be used" in msg
    for name in bad:
        assert f"horizontal/{name}" in msg, (name, msg)
    assert {Path(p).name for p, _ in err.value.errors} == set(bad)
    assert "--on-error skip" in msg
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_bad_files_are_quarantined_with_on_error_skip(dirty, tmp_path):
    import csv

    root, bad = dirty
    result = pretrain(
        _pixels_recipe(root, "data.on_error=skip"), tmp_path / "run", device="cpu", quiet=True
    )
    assert result["steps"] == 2
    report = tmp_path / "run" / "quarantine.csv"  # in the run folder, not the data mount
    with open(report, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {Path(r["path"]).name for r in rows} == set(bad)
    assert all(r["reason"] for r in rows)
    reasons = {Path(r["path"]).name: r["reason"] for r in rows}
    assert "no pixel data" in reasons["nopixels.dcm"]
    assert "empty" in reasons["empty.png"] and "truncated" in reasons["cut.png"]
    assert "exceeds limit" in reasons["bomb.png"] or "pixels" in reasons["bomb.png"]


def _with_nan_tiff(root: Path) -> Path:
    import tifffile

    arr = np.ones((32, 32), np.float32)
    arr[3, 5] = np.nan
    tifffile.imwrite(root / "horizontal" / "nan.tif", arr)
    return root


def test_nan_tiff_is_reported_before_training(tmp_path):
    root = _with_nan_tiff(write_separable_set(tmp_path / "data", per_class=8))
    with pytest.raises(ScanError, match="horizontal/nan.tif.*NaN or Inf"):
        pretrain(
            _pixels_recipe(root, "pretrain.train.steps=4"),
            tmp_path / "run",
            device="cpu",
            quiet=True,
        )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_nan_tiff_is_quarantined_with_on_error_skip(tmp_path):
    root = _with_nan_tiff(write_separable_set(tmp_path / "data", per_class=8))
    r = _pixels_recipe(root, "pretrain.train.steps=4", "data.on_error=skip")
    assert pretrain(r, tmp_path / "run", device="cpu", quiet=True)["steps"] == 4
    assert "nan.tif" in (tmp_path / "run" / "quarantine.csv").read_text()


def test_label_csv_problems_are_all_reported_before_training(tmp_path):
    root = write_separable_set(tmp_path / "data", per_class=6)
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes((root / "vertical" / "vertical_000.png").read_bytes())
    rows = [
        ["horizontal/horizontal_000.png", "h"],
        ["horizontal/horizontal_000.png", "h"],  # duplicate
        ["vertical/missing.png", "v"],  # missing file
        ["../elsewhere.png", "v"],  # outside the data root
        ["vertical/vertical_001.png", ""],  # no label
        ["vertical/vertical_002.png", "v", "holdout"],  # unknown split
    ]
    csv_path = write_labels_csv(tmp_path / "labels.csv", rows)
    r = recipe(
        [*FINETUNE_SETS, "finetune.train.steps=2"],
        **{"data.root": str(root), "data.labels": str(csv_path)},
    )
    with pytest.raises(ScanError) as err:
        finetune(r, tmp_path / "run", device="cpu", quiet=True)
    msg = str(err.value)
    assert "4 problem(s)" in msg
    assert "line 3" in msg and "duplicates line 2" in msg
    assert "outside the data root" in msg and "--allow-outside-root" in msg
    assert "expected 'path,label[,split]'" in msg and "'holdout'" in msg
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_label_csv_missing_files_and_outside_root_opt_in(tmp_path):
    root = write_separable_set(tmp_path / "data", per_class=6)
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes((root / "vertical" / "vertical_000.png").read_bytes())
    rows = [[f"horizontal/horizontal_{i:03d}.png", "h"] for i in range(6)]
    rows += [[f"vertical/vertical_{i:03d}.png", "v"] for i in range(1, 6)]
    missing = write_labels_csv(tmp_path / "missing.csv", [*rows, ["vertical/gone.png", "v"]])
    with pytest.raises(ScanError, match=r"vertical/gone\.png: listed in missing\.csv line \d+ but"):
        labeled_data(recipe(FINETUNE_SETS, **{"data.root": str(root), "data.labels": str(missing)}))
    out_csv = write_labels_csv(tmp_path / "outside.csv", [*rows, ["../elsewhere.png", "v"]])
    opts = {"data.root": str(root), "data.labels": str(out_csv)}
    with pytest.raises(ScanError, match="outside the data root"):
        labeled_data(recipe(FINETUNE_SETS, **opts))
    # selection 'outside': the validation files are listed too (within the budget they are not)
    sets = [*FINETUNE_SETS, "data.allow_outside_root=true", "finetune.selection=outside"]
    d = labeled_data(recipe(sets, **opts))
    used = {f for files in d.files.values() for f in files}
    assert str(outside.resolve()) in used and len(used) == 12


def test_empty_folders_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "sidecars").mkdir()
    (tmp_path / "sidecars" / "README.txt").write_text("no images here")
    for folder in (empty, tmp_path / "sidecars"):
        with pytest.raises(ScanError, match="no image files found"):
            pretrain(
                _pixels_recipe(folder), tmp_path / f"run-{folder.name}", device="cpu", quiet=True
            )
    one_class = write_separable_set(tmp_path / "one", per_class=6)
    for p in (one_class / "vertical").iterdir():
        p.unlink()
    r = recipe([*FINETUNE_SETS, "finetune.train.steps=2"], **{"data.root": str(one_class)})
    with pytest.raises(UserError, match=r"at least 2 classes, found \['horizontal'\]"):
        finetune(r, tmp_path / "run", device="cpu", quiet=True)


# --------------------------------------------------------------------------------------------
# untrusted pickles
# --------------------------------------------------------------------------------------------


class TrainingArgs:
    """Stands for the non-tensor objects real checkpoints carry (needs full pickle)."""

    def __init__(self, lr: float) -> None:
        self.lr = lr


class RunsCode:
    """Unpickling this runs os.makedirs(marker): proof of code execution."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _tiny_classifier():
    from beitdomain.engine.build import build_classifier

    return build_classifier(recipe(FINETUNE_SETS), 2)


def _weights(tmp_path: Path, extra: object, name: str) -> Path:
    """A checkpoint shaped like the official ones: {'model': state dict, 'args': ...}."""
    path = tmp_path / name
    torch.save({"model": _tiny_classifier().state_dict(), "args": extra}, path)
    return path


def test_code_running_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = _weights(tmp_path, RunsCode(str(marker)), "evil.pth")
    root = write_separable_set(tmp_path / "data", per_class=6)
    with pytest.raises(WeightsError, match="--trust-pickle"):
        load_backbone_weights(_tiny_classifier(), evil)
    assert not marker.exists()
    # the same through the command line
    argv = ["finetune", "--data", str(root), "--init", str(evil), "--out", str(tmp_path / "run")]
    res = runner.invoke(app, ["--device", "cpu", *argv])
    assert res.exit_code == 2 and said(res.output, "--trust-pickle"), res.output
    assert not marker.exists()


def test_trusted_pickle_loads_only_with_the_flag(tmp_path):
    path = _weights(tmp_path, TrainingArgs(lr=0.1), "official.pth")
    with pytest.raises(WeightsError, match=r"weights_only=True.*--trust-pickle"):
        load_backbone_weights(_tiny_classifier(), path)
    model = _tiny_classifier()
    report = load_backbone_weights(model, path, trust_pickle=True)
    assert report.loaded and not report.missing_backbone
    # argparse.Namespace (unilm checkpoints) needs no flag: it is plain values
    plain = _weights(tmp_path, argparse.Namespace(lr=0.1), "unilm.pth")
    assert load_backbone_weights(_tiny_classifier(), plain).loaded


def test_cli_trust_pickle_flag(tmp_path):
    root = write_separable_set(tmp_path / "data", per_class=6)
    path = _weights(tmp_path, TrainingArgs(lr=0.1), "official.pth")
    base = [
        "--device",
        "cpu",
        "finetune",
        "--data",
        str(root),
        "--init",
        str(path),
        *sets_to_args([*FINETUNE_SETS, "finetune.train.steps=1"]),
    ]
    refused = runner.invoke(app, [*base, "--out", str(tmp_path / "a")])
    assert refused.exit_code == 2 and said(refused.output, "--trust-pickle")
    assert not (tmp_path / "a" / "checkpoints").exists()
    ok = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--trust-pickle"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "b" / "results.json").is_file()


def test_tampered_checkpoint_is_never_unpickled(data, reference, tmp_path):
    """A checkpoint replaced by a code-running pickle (with a matching checksum) is refused by
    weights_only loading; resume falls back to the previous checkpoint and nothing runs."""
    from beitdomain.fileio import atomic_write_json, sha256_file

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    mgr = CheckpointManager(run / "checkpoints")
    marker = tmp_path / "pwned"
    latest = mgr.path_for(6)
    torch.save({"step": 6, "payload": RunsCode(str(marker))}, latest)
    atomic_write_json(
        latest.with_name(latest.name + ".json"),
        {"step": 6, "sha256": sha256_file(latest), "bytes": latest.stat().st_size},
    )
    step, _ = mgr.load_latest()
    assert step == 4 and not marker.exists()


def test_atomic_writes_get_an_ordinary_files_permissions(tmp_path):
    """Weights in a shared run folder must be readable like any file the user writes (mkstemp
    alone would leave them 0600, private to the writer)."""
    from beitdomain.fileio import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.json", "{}")
        assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
