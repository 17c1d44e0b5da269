"""Run folders: never delete or rewrite what a run did not write; one writer per folder.

Every route that used to lose data runs here against a folder of user files (a website's
index.html, a web app's manifest.json, images) that must survive byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    FINETUNE_SETS,
    PRETRAIN_SETS,
    TOKENIZER_SETS,
    cli,
    cli_env,
    recipe,
    scratch_curve_args,
    sets_to_args,
    write_separable_set,
)

from beitdomain.engine.run.folder import RunDir
from beitdomain.engine.run.guard import RunDirError, RunLockedError, foreign_files, run_kind
from beitdomain.engine.run.metrics_log import read_metrics
from beitdomain.engine.tokenizer import train_tokenizer
from beitdomain.fileio import LOCK_FILE, RUN_MARKER, FolderLock, FolderLockedError


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def user_folder(path: Path) -> Path:
    """A folder of someone else's files: a website, a web app's manifest, images."""
    path.mkdir(parents=True)
    (path / "index.html").write_text("<html><body>clinic intranet</body></html>\n")
    (path / "manifest.json").write_text(json.dumps({"name": "webapp", "start_url": "/"}))
    write_separable_set(path / "images", per_class=3, size=32)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    stripes = write_separable_set(tmp / "stripes", per_class=8, size=64)
    r = recipe([*TOKENIZER_SETS, "tokenizer.train.steps=2"], **{"data.root": str(stripes)})
    torch.manual_seed(0)
    train_tokenizer(r, tmp / "tok", device="cpu", quiet=True)
    return {"stripes": stripes, "tok": tmp / "tok"}


def tok_args(data, out) -> list[str]:
    sets = [*TOKENIZER_SETS, "tokenizer.train.steps=2"]
    return [
        *("tokenizer", "train", "--data", str(data["stripes"]), "--out", str(out)),
        *sets_to_args(sets),
    ]


def pre_args(data, out) -> list[str]:
    sets = [*PRETRAIN_SETS, "pretrain.train.steps=2"]
    return [
        *("pretrain", "--data", str(data["stripes"]), "--tokenizer", str(data["tok"])),
        *("--out", str(out)),
        *sets_to_args(sets),
    ]


def ft_args(data, out) -> list[str]:
    sets = [*FINETUNE_SETS, "finetune.train.steps=2"]
    return [
        *("finetune", "--data", str(data["stripes"]), "--init", "scratch", "--out", str(out)),
        *sets_to_args(sets),
    ]


def curve_args(data, out) -> list[str]:
    return scratch_curve_args(data["stripes"], out, [*FINETUNE_SETS, "finetune.train.steps=2"])


ROUTES = {"tokenizer": tok_args, "pretrain": pre_args, "finetune": ft_args}


# --------------------------------------------------------------------------------------------
# folders that are not runs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["tokenizer", "pretrain", "finetune"])
@pytest.mark.parametrize("flag", [[], ["--resume"], ["--overwrite"]])
def test_a_user_folder_is_never_written_or_deleted(data, tmp_path, route, flag):
    site = user_folder(tmp_path / "site")
    before = snapshot(site)
    res = cli(*ROUTES[route](data, site), *flag)
    assert res.exit_code == 2, res.output
    assert "not a beitdomain run" in res.text and "nothing was" in res.text
    assert "--resume" not in res.text  # no advice to write a run into someone's folder
    assert snapshot(site) == before
    assert sorted(p.name for p in site.iterdir()) == ["images", "index.html", "manifest.json"]


def test_curve_refuses_a_non_empty_folder_that_is_not_a_run(data, tmp_path):
    site = user_folder(tmp_path / "site")
    before = snapshot(site)
    for flag in ([], ["--overwrite"]):
        res = cli(*curve_args(data, site), *flag)
        assert res.exit_code == 2, res.output
        assert "not a beitdomain run" in res.text
        assert snapshot(site) == before


def test_overwrite_of_the_current_folder_holding_the_images_is_refused(data, tmp_path, monkeypatch):
    images = write_separable_set(tmp_path / "imgs", per_class=4, size=64)
    before = snapshot(images)
    monkeypatch.chdir(images)
    args = pre_args(data, Path("."))
    args[args.index("--data") + 1] = "."
    res = cli(*args, "--overwrite")
    assert res.exit_code == 2, res.output
    assert "nothing was" in res.text
    assert snapshot(images) == before


@pytest.mark.parametrize("which", ["cwd", "home", "data root", "root"])
def test_overwrite_refuses_home_cwd_data_root_and_filesystem_root(
    data, tmp_path, monkeypatch, which
):
    # Each of them made to look like a run, so only the path rule stands between it and rmtree.
    folder = tmp_path / "place"
    run = RunDir.open(folder, kind="pretrain")
    run.start("pretrain", None, "cpu")
    run.finish()
    (folder / "x.png").write_bytes(b"not ours")
    before = snapshot(folder)
    r = recipe(PRETRAIN_SETS, **{"data.root": str(data["stripes"])})
    if which == "cwd":
        monkeypatch.chdir(folder)
    elif which == "home":
        monkeypatch.setenv("HOME", str(folder))
    elif which == "data root":
        r = recipe(PRETRAIN_SETS, **{"data.root": str(folder)})
    if which == "root":
        with pytest.raises(RunDirError, match="filesystem root"):
            from beitdomain.engine.run.guard import _refuse_dangerous

            _refuse_dangerous(Path("/"), {})
        return
    with pytest.raises(RunDirError, match="--overwrite refused") as e:
        RunDir.open(folder, kind="pretrain", overwrite=True, recipe=r)
    assert {"cwd": "current folder", "home": "home folder", "data root": "data.root"}[which] in (
        str(e.value)
    )
    assert snapshot(folder) == before


# --------------------------------------------------------------------------------------------
# runs: overwrite deletes only their own files; resume only the same kind
# --------------------------------------------------------------------------------------------


def test_overwrite_deletes_only_what_the_run_wrote(data, tmp_path):
    out = tmp_path / "tok"
    assert cli(*tok_args(data, out)).exit_code == 0
    assert run_kind(out) == "tokenizer" and foreign_files(out) == []
    (out / "notes.txt").write_text("my notes on this run")
    res = cli(*tok_args(data, out), "--overwrite")
    assert res.exit_code == 2, res.output
    assert "notes.txt" in res.text and "nothing was deleted" in res.text
    assert (out / "notes.txt").read_text() == "my notes on this run"
    assert (out / "tokenizer.safetensors").is_file()
    (out / "notes.txt").unlink()
    old = (out / "tokenizer.safetensors").stat().st_mtime_ns
    res = cli(*tok_args(data, out), "--overwrite")
    assert res.exit_code == 0, res.output
    assert (out / "tokenizer.safetensors").stat().st_mtime_ns != old
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and len(manifest["starts"]) == 1


def test_a_file_named_like_a_run_file_does_not_make_a_run(tmp_path):
    site = user_folder(tmp_path / "site")
    (site / "recipe.yaml").write_text("name: my-app\n")
    assert run_kind(site) is None
    before = snapshot(site)
    with pytest.raises(RunDirError, match="not a beitdomain run"):
        RunDir.open(site, kind="pretrain", overwrite=True)
    assert snapshot(site) == before


@pytest.mark.parametrize(("holder", "route"), [("pretrain", "finetune"), ("tokenizer", "pretrain")])
def test_resume_of_another_kind_of_run_changes_nothing(data, tmp_path, holder, route):
    out = tmp_path / "run"
    assert cli(*ROUTES[holder](data, out)).exit_code == 0
    before = snapshot(out)
    for flag in (["--resume"], ["--overwrite"], []):
        res = cli(*ROUTES[route](data, out), *flag)
        assert res.exit_code == 2, res.output
        assert f"holds a {holder} run, not a {route} run" in res.text
        assert snapshot(out) == before  # recipe.yaml and manifest untouched


def test_resume_into_an_empty_or_missing_folder_starts_fresh(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        run = RunDir.open(folder, kind="finetune", resume=True)
        assert not run.resumed and run_kind(folder) == "finetune"
        run.close()


def test_legacy_runs_without_a_marker_are_still_recognised(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "recipe.yaml").write_text("seed: 0\n")
    (out / "manifest.json").write_text(
        json.dumps({"command": "pretrain", "argv": ["beitdomain"], "versions": {"python": "3"}})
    )
    assert run_kind(out) == "pretrain"
    run = RunDir.open(out, kind="pretrain", resume=True)
    assert run.resumed
    run.close()
    with pytest.raises(RunDirError, match="holds a pretrain run, not a finetune run"):
        RunDir.open(out, kind="finetune", resume=True)


def test_nested_runs_are_judged_by_their_own_marker(tmp_path):
    outer = RunDir.open(tmp_path / "curve", kind="curve")
    cell = RunDir.open(tmp_path / "curve" / "cells" / "a", kind="finetune")
    (cell.path / "results.json").write_text("{}")
    cell.close()
    outer.close()
    assert foreign_files(tmp_path / "curve") == []
    (cell.path / "mine.txt").write_text("x")
    assert foreign_files(tmp_path / "curve") == ["cells/a/mine.txt"]
    with pytest.raises(RunDirError, match="cells/a/mine.txt"):
        RunDir.open(tmp_path / "curve", kind="curve", overwrite=True)
    (cell.path / "mine.txt").unlink()
    RunDir.open(tmp_path / "curve", kind="curve", overwrite=True).close()
    assert sorted(p.name for p in (tmp_path / "curve").iterdir()) == sorted([LOCK_FILE, RUN_MARKER])


def test_files_a_user_adds_before_a_resume_are_not_recorded_as_the_runs(tmp_path):
    run = RunDir.open(tmp_path / "r", kind="finetune")
    (run.path / "results.json").write_text("{}")  # written by the run
    run.close()
    time.sleep(0.01)
    user = run.path / "later.txt"
    user.write_text("the user's")
    old = time.time_ns() - 10_000_000_000
    os.utime(user, ns=(old, old))  # written well before the resumed run started
    run = RunDir.open(tmp_path / "r", kind="finetune", resume=True)
    run.close()
    assert foreign_files(tmp_path / "r") == ["later.txt"]


def test_a_file_a_user_writes_during_the_run_is_not_the_runs(tmp_path):
    # B3: the run's own files were every file modified after it started.
    out = tmp_path / "r3"
    run = RunDir.open(out, kind="tokenizer")
    run.start("tokenizer train", None, "cpu")
    (out / "tokenizer.json").write_text("{}")  # written by the run
    (out / "NOTES.md").write_text("notes\n")  # by the user, while the run is going
    (out / "samples").mkdir()
    (out / "samples" / "mine.png").write_bytes(b"the user's")
    run.finish()
    files = json.loads((out / RUN_MARKER).read_text())["files"]
    assert "tokenizer.json" in files and "manifest.json" in files
    assert "NOTES.md" not in files and "samples/mine.png" not in files
    assert foreign_files(out) == ["NOTES.md", "samples/mine.png"]
    before = snapshot(out)
    with pytest.raises(RunDirError, match="--overwrite refused.*NOTES.md") as e:
        RunDir.open(out, kind="tokenizer", overwrite=True)
    assert "nothing was deleted" in str(e.value)
    assert snapshot(out) == before
    # A marker that recorded the user's file (written before the rule) does not make it the run's
    marker = json.loads((out / RUN_MARKER).read_text())
    marker["files"] += ["NOTES.md", "samples/mine.png"]
    (out / RUN_MARKER).write_text(json.dumps(marker))
    with pytest.raises(RunDirError, match="NOTES.md"):
        RunDir.open(out, kind="tokenizer", overwrite=True)
    assert (out / "NOTES.md").read_text() == "notes\n"
    RunDir.open(out, kind="tokenizer", resume=True).close()  # the next run drops them
    assert "NOTES.md" not in json.loads((out / RUN_MARKER).read_text())["files"]


# --------------------------------------------------------------------------------------------
# damaged files and states
# --------------------------------------------------------------------------------------------


def test_torn_last_metrics_line_is_dropped_with_a_warning_on_resume(data, tmp_path, capsys):
    out = tmp_path / "pre"
    args = pre_args(data, out)
    assert (
        cli(
            *args[:-2], "--set", "pretrain.train.steps=4", "--set", "pretrain.train.ckpt_every=2"
        ).exit_code
        == 0
    )
    metrics = out / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 1.2, "l')  # a kill in the middle of a write
    capsys.readouterr()
    assert len(read_metrics(metrics)) == 4
    assert "line 5 is damaged" in " ".join(capsys.readouterr().err.split())
    res = cli(
        *args[:-2],
        "--set",
        "pretrain.train.steps=6",
        "--set",
        "pretrain.train.ckpt_every=2",
        "--resume",
    )
    assert res.exit_code == 0, res.output
    steps = [r["step"] for r in read_metrics(metrics)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_of_a_completed_run_without_checkpoints_is_an_error(data, tmp_path):
    out = tmp_path / "pre"
    assert cli(*pre_args(data, out)).exit_code == 0
    before = (out / "mim.safetensors").read_bytes()
    for p in (out / "checkpoints").iterdir():
        p.unlink()
    res = cli(*pre_args(data, out), "--resume")
    assert res.exit_code == 2, res.output
    assert "completed run whose checkpoints are gone" in res.text
    assert (out / "mim.safetensors").read_bytes() == before


# --------------------------------------------------------------------------------------------
# one writer per folder
# --------------------------------------------------------------------------------------------

_HOLD = textwrap.dedent(
    """
    import sys, time
    from beitdomain.engine.run.folder import RunDir
    run = RunDir.open(sys.argv[1], kind="pretrain", resume=True)
    print("locked", flush=True)
    time.sleep(120)
    """
)


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_naming_the_pid_and_kill9_frees_the_folder(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        with pytest.raises(RunLockedError, match=rf"PID {proc.pid}\b"):
            RunDir.open(out, kind="pretrain", resume=True)
        before = snapshot(out)
        with pytest.raises(RunLockedError):
            RunDir.open(out, kind="pretrain", overwrite=True)
        assert snapshot(out) == before
    finally:
        proc.kill()  # SIGKILL: no chance to clean up
        proc.wait()
    run = RunDir.open(out, kind="pretrain", resume=True)  # the kernel dropped the lock
    assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
    run.close()


def test_two_pretrain_commands_into_one_folder_one_is_refused(data, tmp_path):
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        res = cli(*pre_args(data, out), "--resume")
        assert res.exit_code == 2, res.output
        assert f"PID {proc.pid}" in res.text
        assert not (out / "metrics.jsonl").exists()
    finally:
        proc.kill()
        proc.wait()


def test_lock_is_released_at_finish_and_taken_over_within_a_process(tmp_path):
    a = RunDir.open(tmp_path / "r", kind="finetune")
    b = RunDir.open(tmp_path / "r", kind="finetune", resume=True)  # a failed run's leftover
    a.close()  # must not release b's lock
    code = (
        "import sys\nfrom beitdomain.fileio import FolderLock\n"
        "try:\n    FolderLock(sys.argv[1]).acquire()\nexcept OSError:\n    sys.exit(3)\n"
    )
    held = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")], env=cli_env())
    assert held.returncode == 3
    b.finish()
    free = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")], env=cli_env())
    assert free.returncode == 0


def test_folder_lock_error_is_an_os_error_naming_the_folder(tmp_path):
    proc = _holder(tmp_path / "x")
    try:
        with pytest.raises(FolderLockedError, match=str(tmp_path / "x")):
            FolderLock(tmp_path / "x").acquire()
    finally:
        proc.kill()
        proc.wait()


def test_demo_refuses_a_folder_of_other_files(tmp_path, monkeypatch):
    pytest.importorskip("elpv_dataset")
    from beitdomain.engine.demo import run_demo

    site = user_folder(tmp_path / "site")
    before = snapshot(site)
    with pytest.raises(RunDirError, match="not a beitdomain run"):
        run_demo(recipe([]), site, device="cpu", quiet=True)
    assert snapshot(site) == before
    # a demo folder made before markers existed is still the demo's
    old = tmp_path / "old-demo"
    (old / "data").mkdir(parents=True)
    (old / "data" / "labels.csv").write_text(
        "path,label,split\r\ndefective/cell0001.png,defective,train\r\n"
        "functional/cell0012.png,functional,test\r\n"
    )
    RunDir.open(old / "tokenizer", kind="tokenizer").close()
    assert run_kind(old) == "demo" and foreign_files(old) == []


@pytest.mark.parametrize(
    "labels",
    [
        "path,label\nscan1.dcm,tumour\n",
        "path,label,split\n",  # no rows: nothing the demo exported
        "path,label,split\ndefective/cell0001.png,functional,train\n",  # not its class
        "path,label,split\ndefective/cell0001.png,defective,train\nscan1.dcm,tumour,test\n",
    ],
)
def test_demo_refuses_a_project_folder_with_labels_it_did_not_write(data, tmp_path, labels):
    # B4: data/labels.csv and one run subfolder made any folder an old demo, whose labels the
    # demo then replaced with the ELPV export.
    from beitdomain.engine.demo import run_demo

    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / "data" / "labels.csv").write_text(labels)
    shutil.copytree(data["tok"], proj / "tokenizer")
    assert run_kind(proj) is None
    before = snapshot(proj)
    with pytest.raises(RunDirError, match=rf"{proj} is not empty.*nothing was changed"):
        run_demo(recipe([]), proj, device="cpu", quiet=True)
    assert snapshot(proj) == before
    assert (proj / "data" / "labels.csv").read_text() == labels


def test_a_symlinked_lock_file_is_refused_and_its_target_kept(tmp_path):
    from beitdomain.data.cache import CacheError, build_cache
    from beitdomain.fileio import LockFileError

    thesis = tmp_path / "thesis.txt"
    thesis.write_text("my thesis\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).symlink_to(thesis)
    # a folder holding only a linked lock is not an empty folder
    with pytest.raises(RunDirError, match=f"{LOCK_FILE} is a symbolic link"):
        RunDir.open(out, kind="tokenizer")
    with pytest.raises(LockFileError, match=str(out / LOCK_FILE)):
        FolderLock(out).acquire()
    with pytest.raises(CacheError, match="symbolic link"):
        build_cache(tmp_path / "nowhere", out, size=16)
    assert thesis.read_text() == "my thesis\n"
    (out / LOCK_FILE).unlink()
    os.mkfifo(out / LOCK_FILE)
    with pytest.raises(RunDirError, match="not a regular file"):
        RunDir.open(out, kind="tokenizer")


def test_overwrite_keeps_user_files_in_the_folders_a_run_writes(data, tmp_path):
    out = tmp_path / "tok"
    assert cli(*tok_args(data, out)).exit_code == 0
    assert (out / "samples").is_dir() and any((out / "checkpoints").iterdir())
    mine = [
        "checkpoints/notes.txt",
        "checkpoints/imgs/a.png",
        "samples/keep/thesis.txt",
        "wandb/my-notes.md",
        "mlruns/notes.txt",
        "tensorboard/readme.md",
        "photos/.holiday.tmp",
        ".draft.tmp",
    ]
    for rel in mine:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("mine")
    # the run's own interrupted atomic writes stay the run's
    (out / "checkpoints" / ".step-00000002.pt.abcd_123.tmp").write_text("cut short")
    (out / ".manifest.json.x1y2z3w4.tmp").write_text("cut short")
    assert foreign_files(out) == sorted(mine)
    before = snapshot(out)
    res = cli(*tok_args(data, out), "--overwrite")
    assert res.exit_code == 2, res.output
    assert "nothing was deleted" in res.text and "samples/keep/thesis.txt" in res.text
    assert snapshot(out) == before


def test_data_cache_refuses_a_folder_with_another_programs_cache_json(data, tmp_path):
    from beitdomain.data.cache import CacheError, build_cache

    site = tmp_path / "site"
    site.mkdir()
    (site / "cache.json").write_text('{"version": 3}')
    (site / "index.html").write_text("<html>")
    only = tmp_path / "only"
    only.mkdir()
    (only / "cache.json").write_text('{"cache_version": 1, "entries": []}')
    for folder in (site, only):
        before = snapshot(folder)
        with pytest.raises(CacheError, match=f"{folder / 'cache.json'} is not a cache record"):
            build_cache(data["stripes"], folder, size=16)
        assert snapshot(folder) == before
    # a cache beitdomain wrote is still rebuilt in place
    ours = tmp_path / "ours"
    build_cache(data["stripes"], ours, size=16)
    assert build_cache(data["stripes"], ours, size=16, force=True).reused is False
