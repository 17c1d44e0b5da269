"""Clear one-line refusals, honest scoring, a curve's Ctrl-C and one writer per cache folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    FINETUNE_SETS,
    cli,
    cli_command,
    cli_env,
    recipe,
    scratch_curve_args,
    sets_to_args,
    write_labels_csv,
    write_separable_set,
)

from beitdomain.data.cache import CacheError, build_cache
from beitdomain.engine.finetune import finetune


def one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "error:" in res.text, res.output
    return res.text.split("error:", 1)[1]


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    return write_separable_set(tmp_path_factory.mktemp("ref") / "stripes", per_class=8)


# --------------------------------------------------------------------------------------------
# weights and tokenizers that must not load
# --------------------------------------------------------------------------------------------


def test_a_pickle_named_safetensors_is_a_one_line_error(stripes, tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "evil.safetensors")
    for args in (
        ["finetune", "--data", str(stripes), "--init", str(tmp_path / "evil.safetensors")],
        ["pretrain", "--data", str(stripes), "--init", str(tmp_path / "evil.safetensors")],
    ):
        res = cli(*args, "--out", str(tmp_path / args[0]), "--set", "model.target=pixels")
        text = one_line_error(res)
        assert "not a readable safetensors file" in text and ".pth" in text


def test_an_untrusted_or_wrong_tokenizer_file_is_a_one_line_error(stripes, tmp_path):
    torch.save({"a": 1}, tmp_path / "tokenizer.pt")
    res = cli("pretrain", "--data", str(stripes), "--tokenizer", str(tmp_path / "tokenizer.pt"))
    assert "is not a tokenizer" in one_line_error(res)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{not json")
    torch.save({"a": 1}, tmp_path / "tok" / "tokenizer.safetensors")  # a pickle inside
    res = cli("pretrain", "--data", str(stripes), "--tokenizer", str(tmp_path / "tok"))
    assert "not valid JSON" in one_line_error(res)


def test_dalle_without_trust_is_a_one_line_error_and_nothing_is_unpickled(stripes, tmp_path):
    (tmp_path / "dalle").mkdir()
    marker = tmp_path / "pwned"
    code = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')"
    payload = f"cos\nsystem\n(S{json.dumps('python -c ' + json.dumps(code))}\ntR.".encode()
    for part in ("encoder.pkl", "decoder.pkl"):
        (tmp_path / "dalle" / part).write_bytes(payload)
    res = cli(
        "tokenizer",
        "train",
        "--data",
        str(stripes),
        "--dalle",
        str(tmp_path / "dalle"),
        "--out",
        str(tmp_path / "t"),
    )
    assert "--trust-pickle" in one_line_error(res)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------


def _ft(root: Path, labels: Path, out: Path) -> dict:
    r = recipe(
        [*FINETUNE_SETS, "finetune.train.steps=1"],
        **{"data.root": str(root), "data.labels": str(labels)},
    )
    torch.manual_seed(0)
    return finetune(r, out, device="cpu", quiet=True)


def _rows(root: Path, split_of) -> list[tuple[str, str, str]]:
    files = sorted(root.rglob("*.png"))
    return [
        (p.relative_to(root).as_posix(), p.parent.name, split_of(i, p)) for i, p in enumerate(files)
    ]


def test_a_split_column_without_test_rows_is_said(stripes, tmp_path, caplog):
    rows = _rows(stripes, lambda i, p: "val" if i % 4 == 0 else "train")
    labels = write_labels_csv(tmp_path / "labels.csv", rows)
    res = _ft(stripes, labels, tmp_path / "ft")
    assert "test" not in res
    assert any("no test images" in w for w in res["warnings"])
    assert "no test images" in caplog.text
    saved = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert saved["warnings"] == res["warnings"]


def test_a_test_split_missing_a_class_is_warned_about(stripes, tmp_path, caplog):
    def split(i, p):
        if p.parent.name == "horizontal" and i % 4 == 1:
            return "test"
        return "val" if i % 4 == 0 else "train"

    labels = write_labels_csv(tmp_path / "labels.csv", _rows(stripes, split))
    res = _ft(stripes, labels, tmp_path / "ft")
    assert res["test"]["absent_classes"] == ["vertical"]
    assert any("no images of ['vertical']" in w for w in res["warnings"])
    assert "balanced accuracy" in caplog.text


def test_curve_refuses_cells_without_test_scores(stripes, tmp_path):
    rows = _rows(stripes, lambda i, p: "val" if i % 4 == 0 else "train")
    labels = write_labels_csv(tmp_path / "labels.csv", rows)
    sets = [*FINETUNE_SETS, "finetune.train.steps=1", f"data.labels={labels}"]
    res = cli(*scratch_curve_args(stripes, tmp_path / "c", sets))
    assert "no test images" in one_line_error(res) and "'test' rows" in res.text
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["status"] == "failed"


# --------------------------------------------------------------------------------------------
# Ctrl-C on a curve
# --------------------------------------------------------------------------------------------


def test_ctrl_c_on_curve_records_interrupted_and_advises_what_curve_has(stripes, tmp_path):
    out = tmp_path / "curve"
    sets = [*FINETUNE_SETS, "finetune.train.steps=400", "finetune.train.ckpt_every=2"]
    argv = ["curve", "--data", str(stripes), "--init", "scratch", "--fractions", "100%"]
    argv += ["--seeds", "1", "--out", str(out), *sets_to_args(sets)]
    proc = subprocess.Popen(
        cli_command(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env()
    )
    deadline = time.monotonic() + 240
    while not list(out.glob("cells/*/checkpoints/step-*.pt.json")):
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, "no checkpoint in 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = " ".join(err.decode().split())
    assert proc.returncode == 130, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    for text in (err, manifest["error"]):
        assert "run the same `beitdomain curve` command" in text, text
        assert "--resume" not in text


# --------------------------------------------------------------------------------------------
# data cache: one writer, never among other files
# --------------------------------------------------------------------------------------------


def test_cache_is_not_written_into_a_folder_of_other_files(stripes, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<html></html>")
    with pytest.raises(CacheError, match="not a beitdomain cache"):
        build_cache(stripes, tmp_path / "site", size=32)
    assert [p.name for p in (tmp_path / "site").iterdir()] == ["index.html"]
    res = cli("data", "cache", str(stripes), "--out", str(tmp_path / "site"), "--size", "32")
    assert "not a beitdomain cache" in one_line_error(res)


_HOLD_CACHE = textwrap.dedent(
    """
    import sys, time
    from beitdomain.fileio import FolderLock
    FolderLock(sys.argv[1]).acquire("a cache")
    print("locked", flush=True)
    time.sleep(120)
    """
)


def test_two_cache_writers_into_one_folder_the_second_is_refused(stripes, tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_CACHE, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        res = cli("data", "cache", str(stripes), "--out", str(out), "--size", "32")
        assert f"PID {proc.pid}" in one_line_error(res)
        assert not (out / "cache.json").exists() and not (out / ".images.partial.npy").exists()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    res = cli("data", "cache", str(stripes), "--out", str(out), "--size", "32")
    assert res.exit_code == 0, res.output
    assert (out / "cache.json").is_file()


def test_a_failed_cache_build_leaves_no_partial_file(stripes, tmp_path, monkeypatch):
    import beitdomain.data.cache as cache_mod

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod.np, "save", boom)
    with pytest.raises(OSError):
        build_cache(stripes, tmp_path / "c", size=32)
    assert not (tmp_path / "c").exists()  # the build made the folder, and took it back
