"""A command refused before it starts leaves `--out` as it found it: no run folder, marker or
lock for a missing one, nothing added to an empty one, the previous run intact for --overwrite;
the refusal is one line and exit 2 (issue 39 item 4). And what third-party libraries log or
draw while a command reads or writes (pydicom's decoder tracebacks, transformers' progress
bars) is folded into the file's reason or kept off the console (issue 39 item 6)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import (
    FINETUNE_SETS,
    PRETRAIN_SETS,
    TOKENIZER_SETS,
    sets_to_args,
    write_separable_set,
    write_tiny_tokenizer,
)
from typer.testing import CliRunner

from beitdomain.cli.app import app
from beitdomain.engine.run.folder import RunDir


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def invoke(*args: str):
    # a wide terminal: one error is then one line, whatever its length
    return CliRunner().invoke(app, ["--device", "cpu", "--quiet", *args], env={"COLUMNS": "2000"})


def one_line_error(res, lists_files: bool = False) -> str:
    """The error of a refused command, asserting it is one line (an unreadable file's error
    lists the files under it) and exit 2."""
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2, (res.output, res.exception)
    assert lines and lines[0].startswith("error:"), res.output
    assert "Traceback" not in res.output
    assert len(lines) == 1 or (lists_files and not any(x.startswith("error:") for x in lines[1:]))
    return res.output


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("starts")
    data = write_separable_set(tmp / "data", per_class=4)
    corrupt = write_separable_set(tmp / "corrupt", per_class=4)
    cut = corrupt / "horizontal" / "horizontal_000.png"
    cut.write_bytes(cut.read_bytes()[:60])  # a truncated PNG
    return {"data": data, "corrupt": corrupt, "tok": write_tiny_tokenizer(tmp / "tok"), "tmp": tmp}


def _bad_starts(f: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments without --out, a piece of the error)."""
    data, tok = str(f["data"]), str(f["tok"])
    ft = ["finetune", "--data", data, *sets_to_args([*FINETUNE_SETS, "finetune.train.steps=1"])]
    pre = sets_to_args([*PRETRAIN_SETS, "pretrain.train.steps=1"])
    tok_train = sets_to_args([*TOKENIZER_SETS, "tokenizer.train.steps=1"])
    return {
        "--labels 150%": ([*ft, "--labels", "150%"], "150%"),
        "1% of the images gives no labels": ([*ft, "--labels", "1%"], "1%"),
        "a missing augment file": (
            [*ft, "--set", f"data.augment={f['tmp'] / 'no-augment.yaml'}"],
            "no-augment.yaml",
        ),
        "a bare pretrain": (["pretrain", *pre], "tokenizer"),
        "pretrain without data": (["pretrain", "--tokenizer", tok, *pre], "no images given"),
        "tokenizer train without data": (["tokenizer", "train", *tok_train], "no images given"),
        "a corrupt image": (
            ["pretrain", "--data", str(f["corrupt"]), "--tokenizer", tok, *pre],
            "horizontal_000.png",
        ),
    }


def test_a_refused_start_leaves_no_run_folder(files):
    failures = []
    for k, (name, (args, hint)) in enumerate(_bad_starts(files).items()):
        out = files["tmp"] / f"out-{k}"
        res = invoke(*args, "--out", str(out))
        try:
            assert hint in one_line_error(res, lists_files="corrupt" in name), res.output
            assert not out.exists(), f"left {sorted(os.listdir(out))}"
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)


def test_a_refused_start_leaves_an_empty_folder_empty(files):
    for k, (name, (args, _)) in enumerate(_bad_starts(files).items()):
        out = files["tmp"] / f"empty-{k}"
        out.mkdir()
        one_line_error(invoke(*args, "--out", str(out)), lists_files="corrupt" in name)
        assert list(out.iterdir()) == [], name


def test_a_refused_overwrite_or_resume_keeps_the_previous_run(files, tmp_path):
    out = tmp_path / "run"
    run = RunDir.open(out, kind="finetune")
    run.start("finetune", None, "cpu")
    (out / "results.json").write_text('{"accuracy": 0.9}\n')
    run.finish(result={"accuracy": 0.9})
    before = snapshot(out)
    args, _ = _bad_starts(files)["1% of the images gives no labels"]
    for flag in ("--overwrite", "--resume"):
        one_line_error(invoke(*args, "--out", str(out), flag))
        assert snapshot(out) == before, flag  # --overwrite deletes only once the start is good


def test_a_start_that_fails_writing_removes_what_it_wrote(files, tmp_path, monkeypatch):
    from beitdomain.fileio import WriteError

    def full_disk(self, *a, **k):
        (self.path / "recipe.yaml").write_text("half a recipe")
        if self.path.name == "user-writes":
            (self.path / "NOTES.md").write_text("mine")  # a user's file, meanwhile
        raise WriteError(28, f"could not write {self.path / 'manifest.json'}: No space left")

    monkeypatch.setattr(RunDir, "start", full_disk)
    args = ["finetune", "--data", str(files["data"]), *sets_to_args(FINETUNE_SETS)]
    (tmp_path / "empty").mkdir()
    for name, left in [("missing", None), ("empty", []), ("user-writes", ["NOTES.md"])]:
        out = tmp_path / name
        assert "No space left" in one_line_error(invoke(*args, "--out", str(out)))
        assert (sorted(os.listdir(out)) if out.exists() else None) == left, name


def test_the_quarantine_report_written_before_the_start_is_the_runs_own(tmp_path):
    """Reading the data (before the folder is created) may write its quarantine report there;
    the start that follows takes it as its own, also beside a died run's lock and marker."""
    import time

    from beitdomain.engine.run.guard import RunDirError
    from beitdomain.fileio import read_marker

    for died in (False, True):
        out = tmp_path / f"run-{died}"
        if died:
            RunDir.open(out, kind="finetune").close()  # a run that died before writing
        since = time.time_ns()
        assert RunDir.check(out, kind="finetune") is None
        out.mkdir(exist_ok=True)
        (out / "quarantine.csv").write_text("path,reason\nbad.png,truncated\n")
        with pytest.raises(RunDirError):
            RunDir.open(out, kind="finetune")  # without knowing when the job looked
        run = RunDir.open(out, kind="finetune", fresh_since_ns=since)
        run.close()
        assert "quarantine.csv" in read_marker(out)["files"], died


# --------------------------------------------------------------------------------------------
# third-party output (issue 39 item 6)
# --------------------------------------------------------------------------------------------


def _corrupt_jpeg_dicom(dst: Path) -> Path:
    """A bundled JPEG DICOM whose compressed frame is overwritten: every decoder fails, and
    pydicom logs each failure with its traceback before raising."""
    import pydicom
    from helpers import bundled_dicom

    ds = pydicom.dcmread(bundled_dicom("SC_rgb_jpeg_dcmtk.dcm"))
    data = bytearray(ds.PixelData)
    data[40:-40:7] = b"\xff" * len(data[40:-40:7])
    ds.PixelData = bytes(data)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return dst


def test_a_corrupt_dicom_is_one_reason_and_no_traceback(tmp_path):
    import json
    import shutil

    from helpers import bundled_dicom, run_cli

    root = tmp_path / "dicoms"
    root.mkdir()
    shutil.copy(bundled_dicom("CT_small.dcm"), root / "good.dcm")
    _corrupt_jpeg_dicom(root / "bad.dcm")
    # a process of its own: the scan's workers write to the real stderr
    res = run_cli(
        ["--json", "data", "scan", str(root), "--on-error", "skip", "--out", str(tmp_path / "m")]
    )
    assert res.returncode == 0, res.stderr
    both = res.stdout + res.stderr
    assert "Traceback" not in both and 'File "' not in both and "ERROR" not in both, both
    assert res.stderr == "", res.stderr  # -q: warnings and errors only, and there are none
    reasons = {Path(e["path"]).name: e["reason"] for e in json.loads(res.stdout)["unreadable"]}
    assert list(reasons) == ["bad.dcm"]
    assert reasons["bad.dcm"].startswith("cannot decode DICOM pixel data")
    assert "BytesIO object at" not in reasons["bad.dcm"]  # the same reason on every scan


def test_the_hf_export_draws_no_progress_bar(tmp_path):
    pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging

    data = write_separable_set(tmp_path / "data", per_class=4)
    pre = sets_to_args([*PRETRAIN_SETS, "model.target=pixels", "pretrain.train.steps=1"])
    run = tmp_path / "pre"
    assert invoke("pretrain", "--data", str(data), "--out", str(run), *pre).exit_code == 0
    bars = hf_logging.is_progress_bar_enabled()
    for quiet in (["--quiet"], []):  # -q, and stderr not a terminal (CliRunner's)
        out = tmp_path / f"hf{len(quiet)}"
        args = ["--device", "cpu", *quiet, "pretrain", "export", str(run), "--format", "hf"]
        res = CliRunner().invoke(app, [*args, "--out", str(out)])
        assert res.exit_code == 0, (res.output, res.exception)
        assert "Writing model shards" not in res.output and "it/s" not in res.output, res.output
        assert (out / "config.json").is_file()
        assert hf_logging.is_progress_bar_enabled() is bars  # put back after the command
