"""Issue 40 items B7, B8, B11, B13: a FIFO in a data folder, a PatientID stored with a numeric
VR, a read-only output, and integers / NUL bytes a recipe or label CSV cannot hold: each is a
sentence naming the path, key or file, never a hang, a leak or a traceback."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import bundled_dicom, cli, said

# --------------------------------------------------------------------------------------------
# B7: a FIFO (or any non-regular file) is reported without being opened
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_hang(seconds: int = 30):
    """Fails the test instead of hanging: an open() blocked on a FIFO is interrupted."""

    def fire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: something opened the FIFO")

    old = signal.signal(signal.SIGALRM, fire)
    # sent to the main thread itself: a process-wide alarm may land on a torch thread and
    # leave the blocked open() in the main thread uninterrupted
    timer = threading.Timer(
        seconds, signal.pthread_kill, (threading.main_thread().ident, signal.SIGALRM)
    )
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        signal.signal(signal.SIGALRM, old)


def _images(root: Path, n: int = 2) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 255, (16, 16), dtype=np.uint8)
            Image.fromarray(img).save(root / label / f"{i}.png")
    return root


needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")


@needs_fifo
def test_a_fifo_in_a_data_folder_is_named_and_never_opened(tmp_path):
    from beitdomain.data.index import ScanError, scan

    root = _images(tmp_path / "data")
    os.mkfifo(root / "a" / "pipe.png")
    with _no_hang():
        with pytest.raises(ScanError) as e:
            scan(root)  # on_error='fail': refused, naming the pipe
        m = scan(root, on_error="skip")
    assert [p for p, _ in e.value.errors] == ["a/pipe.png"]
    assert "named pipe (FIFO)" in e.value.errors[0][1]
    assert len(m.entries) == 4
    assert [p for p, _ in m.errors] == ["a/pipe.png"]


@needs_fifo
def test_a_fifo_listed_in_a_labels_csv_or_inside_a_dicom_series_folder_does_not_hang(tmp_path):
    import shutil

    from beitdomain.data.index import scan

    root = _images(tmp_path / "data")
    os.mkfifo(root / "a" / "pipe.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\na/0.png,a\na/pipe.png,a\nb/0.png,b\n")
    series = root / "ct"
    series.mkdir()
    for i in range(2):
        shutil.copy(bundled_dicom(), series / f"{i}.dcm")
    os.mkfifo(series / "z.dcm")
    with _no_hang():
        m = scan(root, labels_csv=csv, on_error="skip")
        s = scan(root, on_error="skip", dicom_series=True)
    assert [p for p, _ in m.errors] == ["a/pipe.png"]
    assert "named pipe (FIFO)" in m.errors[0][1]
    assert {p for p, _ in s.errors} == {"a/pipe.png", "ct/z.dcm"}


# --------------------------------------------------------------------------------------------
# B8: a PatientID stored with a numeric VR never reaches the console
# --------------------------------------------------------------------------------------------


def _dicom_with_vr(dst: Path, patient_id: str, vr: bytes) -> Path:
    """A bundled DICOM whose PatientID (explicit VR) is declared with `vr` (e.g. IS)."""
    import pydicom

    ds = pydicom.dcmread(bundled_dicom())
    ds.PatientID = patient_id
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    data = bytearray(dst.read_bytes())
    i = data.find(patient_id.encode())
    assert data[i - 4 : i - 2] == b"LO"
    data[i - 4 : i - 2] = vr
    dst.write_bytes(bytes(data))
    return dst


def test_a_patient_id_stored_as_a_number_is_never_printed_and_still_groups(tmp_path, capfd, caplog):
    from beitdomain.data.index import scan
    from beitdomain.io.dicom import patient_digest

    a = _dicom_with_vr(tmp_path / "d" / "x" / "a.dcm", "ZZID4718", b"IS")
    b = _dicom_with_vr(tmp_path / "d" / "x" / "b.dcm", "ZZID4719", b"DS")
    same = _dicom_with_vr(tmp_path / "d" / "y" / "c.dcm", "ZZID4718", b"LO")
    salt = b"s" * 32
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        digests = [patient_digest(p, salt) for p in (a, b, same)]
        m = scan(tmp_path / "d")
    out, err = capfd.readouterr()
    shown = out + err + caplog.text + " ".join(str(w.message) for w in seen)
    assert "ZZID" not in shown
    assert None not in digests
    assert digests[0] != digests[1]  # two patients
    assert digests[0] == digests[2]  # one ID, whichever VR the file declares
    groups = {e.path: e.group for e in m.entries}
    assert groups["x/a.dcm"] == groups["y/c.dcm"] != groups["x/b.dcm"]


# --------------------------------------------------------------------------------------------
# B11: an output that cannot be written is a WriteError naming the path
# --------------------------------------------------------------------------------------------


def test_atomic_write_where_no_temporary_file_can_be_made_is_a_write_error(tmp_path, monkeypatch):
    from beitdomain.fileio import WriteError, atomic_write_text

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # a read-only folder, as root cannot
    target = tmp_path / "out" / "scan.jsonl"
    with pytest.raises(WriteError, match="Permission denied") as e:
        atomic_write_text(target, "x")
    assert str(target) in str(e.value)
    assert e.value.errno == errno.EACCES


def test_an_output_under_a_file_is_a_write_error_naming_the_folder(tmp_path):
    from beitdomain.fileio import WriteError, atomic_write_text, make_dirs

    (tmp_path / "f").write_text("a file, not a folder")
    with pytest.raises(WriteError) as e:
        atomic_write_text(tmp_path / "f" / "sub" / "scan.jsonl", "x")
    assert str(tmp_path / "f" / "sub") in str(e.value)
    with pytest.raises(WriteError, match="to write the cache"):
        make_dirs(tmp_path / "f" / "c", "write the cache")
    assert make_dirs(tmp_path / "ok" / "c") == tmp_path / "ok" / "c"
    assert (tmp_path / "ok" / "c").is_dir()


def test_a_lock_that_cannot_be_created_is_a_write_error(tmp_path, monkeypatch):
    from beitdomain.fileio import LOCK_FILE, FolderLock, WriteError

    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(LOCK_FILE):
            raise PermissionError(errno.EROFS, "Read-only file system")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(WriteError, match="Read-only file system") as e:
        FolderLock(tmp_path).acquire()
    assert str(tmp_path / LOCK_FILE) in str(e.value)


# --------------------------------------------------------------------------------------------
# B13: integers past 64 bits, over-long YAML integers, a NUL byte in a label-CSV path
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"options": {"seed": 99999999999999999999}}, "'seed'"),
        ({"options": {"seed": 2**32}}, "'seed'"),
        ({"sets": ["pretrain.train.steps=99999999999999999999"]}, "'pretrain.train.steps'"),
        ({"sets": ["curve.seeds=[0, 18446744073709551616]"]}, "'curve.seeds[1]'"),
        ({"sets": ["data.image_size=" + "9" * 5000]}, "data.image_size"),
        ({"sets": ["seed=2026-13-45"]}, "seed=2026-13-45"),
    ],
)
def test_integers_a_run_cannot_hold_are_refused_naming_the_key(kwargs, key):
    from beitdomain.config import RecipeError, load_recipe

    with pytest.raises(RecipeError) as e:
        load_recipe(**kwargs)
    assert key in str(e.value)
    assert len(str(e.value)) < 400  # never the 5000 digits back


def test_the_largest_seed_still_loads():
    from beitdomain.config import SEED_MAX, load_recipe

    assert load_recipe(options={"seed": SEED_MAX}).seed == SEED_MAX


def test_a_recipe_with_an_integer_past_pythons_digit_limit_names_the_line_and_key(tmp_path):
    from beitdomain.config import RecipeError, load_recipe

    big = tmp_path / "big.yaml"
    big.write_text("pretrain:\n  train:\n    steps: 5\ndata:\n  image_size: " + "9" * 5000 + "\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(big)
    msg = str(e.value)
    assert str(big) in msg and "line 5" in msg and "'image_size'" in msg and "5000 digits" in msg


def test_a_seed_past_64_bits_is_refused_before_the_run_folder_exists(tmp_path):
    data = _images(tmp_path / "data", n=3)
    out = tmp_path / "s"
    res = cli(
        "--seed",
        "99999999999999999999",
        "finetune",
        "--data",
        str(data),
        "--init",
        "scratch",
        "--labels",
        "50%",
        "--steps",
        "1",
        "--out",
        str(out),
    )
    assert isinstance(res.exception, SystemExit), res.exception
    assert said(res.output, "'seed'", "64 bits")
    assert not out.exists()


def test_a_nul_byte_in_a_labels_csv_path_is_a_problem_naming_the_line(tmp_path):
    from beitdomain.data.index import ScanError, scan

    root = _images(tmp_path / "data")
    csv = tmp_path / "nul.csv"
    csv.write_text("path,label\na/0.png,a\na/x\0.png,a\n")
    with pytest.raises(ScanError) as e:
        scan(root, labels_csv=csv)
    [(where, why)] = e.value.errors
    assert where == "nul.csv line 3"
    assert "NUL" in why and "a/x\\0.png" in why
