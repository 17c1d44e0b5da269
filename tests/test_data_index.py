"""Scanning folders into manifests: labels, CSVs, bad files, save/load, fingerprints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from helpers import write_dicom_with_phi
from PIL import Image

from beitdomain.data.index import Manifest, ScanError, errors_path, scan


def _png(path: Path, value: int = 100, shape=(20, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _png(root / "cat" / "a.png")
    _png(root / "cat" / "b.png", shape=(30, 30))
    (root / "dog").mkdir()
    tifffile.imwrite(
        root / "dog" / "c.tif", np.zeros((3, 16, 16), np.uint16), photometric="minisblack"
    )
    (root / "dog" / "notes.txt").write_text("ignored side file")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "junk.bin").write_bytes(b"xx")
    return root


def test_imagefolder_labels_and_shapes(folder: Path):
    m = scan(folder)
    assert [e.path for e in m.entries] == ["cat/a.png", "cat/b.png", "dog/c.tif"]
    assert [e.label for e in m.entries] == ["cat", "cat", "dog"]
    assert m.classes == ["cat", "dog"]
    tif = m.entries[2]
    assert (tif.reader, tif.shape, tif.dtype, tif.frames) == ("tiff", [3, 1, 16, 16], "uint16", 3)
    assert m.errors == []


def test_bad_files_fail_listing_all_or_skip(folder: Path):
    (folder / "cat" / "empty.png").write_bytes(b"")
    (folder / "dog" / "junk.dcm").write_bytes(b"not dicom at all" * 10)
    with pytest.raises(ScanError) as info:
        scan(folder)
    text = str(info.value)
    assert "2 of 5 files could not be used" in text
    assert "cat/empty.png: file is empty" in text and "dog/junk.dcm" in text
    assert "--on-error skip" in text
    m = scan(folder, on_error="skip")
    assert len(m) == 3 and {p for p, _ in m.errors} == {"cat/empty.png", "dog/junk.dcm"}


def test_empty_folder(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("no images here")
    with pytest.raises(ScanError, match="no image files found"):
        scan(tmp_path / "empty")


def test_labels_csv(folder: Path, tmp_path: Path):
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label,split\ncat/a.png,healthy,train\ndog/c.tif,defect,test\n")
    m = scan(folder, labels_csv=csv)
    assert [(e.path, e.label, e.split) for e in m.entries] == [
        ("cat/a.png", "healthy", "train"),
        ("dog/c.tif", "defect", "test"),
    ]


def test_labels_csv_problems_are_listed_together(folder: Path, tmp_path: Path):
    outside = _png(tmp_path / "outside.png")
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "cat/a.png,x\n"
        "cat/a.png,y\n"  # duplicate
        f"{os.path.relpath(outside, folder)},z\n"  # escapes the root
        "cat/b.png,x,holdout\n"  # bad split
        "cat/b.png\n"  # missing label
    )
    with pytest.raises(ScanError) as info:
        scan(folder, labels_csv=csv)
    text = str(info.value)
    assert "4 problem(s)" in text
    assert "line 2" in text and "duplicates line 1" in text
    assert "resolves outside the data root" in text
    assert "'holdout' is not one of train, val, test" in text
    assert "expected 'path,label[,split]'" in text


def test_labels_csv_missing_file_and_outside_allowed(folder: Path, tmp_path: Path):
    outside = _png(tmp_path / "outside.png")
    csv = tmp_path / "labels.csv"
    csv.write_text(f"cat/a.png,x\nnope.png,y\n{outside},z\n")
    with pytest.raises(ScanError, match="nope.png: listed in labels.csv line 2 but the file"):
        scan(folder, labels_csv=csv, allow_outside_root=True)
    m = scan(folder, labels_csv=csv, allow_outside_root=True, on_error="skip")
    assert [e.path for e in m.entries] == ["cat/a.png", str(outside.resolve())]
    assert m.abspath(m.entries[1]) == outside.resolve()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_save_load_round_trip(folder: Path, tmp_path: Path, suffix: str):
    (folder / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    m = scan(folder, on_error="skip")
    out = tmp_path / f"manifest{suffix}"
    m.save(out)
    loaded = Manifest.load(out, root=folder)
    assert loaded.entries == m.entries
    assert loaded.errors == m.errors and errors_path(out).is_file()
    assert loaded.fingerprint() == m.fingerprint()


def test_fingerprint_changes_with_files(folder: Path):
    before = scan(folder).fingerprint()
    _png(folder / "cat" / "a.png", value=7, shape=(21, 24))
    assert scan(folder).fingerprint() != before


def test_patient_name_never_written(tmp_path: Path):
    root = tmp_path / "dicoms"
    write_dicom_with_phi(root / "ct.dcm", "Smith^Johanna", "MRN-0042", "19661231")
    (root / "broken.dcm").write_bytes(root.joinpath("ct.dcm").read_bytes()[:600])
    m = scan(root, on_error="skip")
    out = tmp_path / "m.jsonl"
    m.save(out)
    m.save(tmp_path / "m.csv")
    written = [out, errors_path(out), tmp_path / "m.csv"]
    for f in written:
        text = f.read_text()
        for secret in ("Smith", "Johanna", "MRN-0042", "19661231"):
            assert secret not in text, f"{secret} leaked into {f.name}"
    header = json.loads(out.read_text().splitlines()[0])
    assert header["count"] == 1
