"""Bad input: empty, truncated, non-image, missing, oversized files give ReaderError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.data import get_testdata_file

from beitdomain.io import ReaderError, base, load_image


def test_zero_byte(tmp_path: Path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(ReaderError, match=r"empty\.dcm: file is empty"):
        load_image(tmp_path / "empty.dcm")


def test_non_image_with_image_suffix(tmp_path: Path):
    (tmp_path / "notes.png").write_text("hello, not a picture")
    with pytest.raises(ReaderError, match=r"notes\.png: has a \.png suffix but does not start"):
        load_image(tmp_path / "notes.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ReaderError, match="not a recognized image format"):
        load_image(tmp_path / "notes.txt")


def test_missing_file_and_folder_of_non_dicom(tmp_path: Path):
    with pytest.raises(ReaderError, match="file not found"):
        load_image(tmp_path / "nope.tif")
    (tmp_path / "d").mkdir()
    with pytest.raises(ReaderError, match="no DICOM files"):
        load_image(tmp_path / "d")


@pytest.mark.parametrize("kind", ["png", "jpg", "tif", "dcm"])
def test_truncated_files(tmp_path: Path, kind: str):
    arr = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    full = tmp_path / f"full.{kind}"
    if kind == "tif":
        tifffile.imwrite(full, arr, compression="zlib")
    elif kind == "dcm":
        full.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    else:
        Image.fromarray(arr).save(full)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ReaderError) as info:
        load_image(cut)
    assert str(cut) in str(info.value)


def test_decompression_bomb_refused_before_decoding(tmp_path: Path, monkeypatch):
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "big.png")
    tifffile.imwrite(tmp_path / "big.tif", np.zeros((64, 64), np.uint8))
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.save_as(tmp_path / "big.dcm")
    monkeypatch.setattr(base, "MAX_PIXELS", 1000)
    for name in ("big.png", "big.tif", "big.dcm"):
        with pytest.raises(ReaderError, match="exceed the limit of 1,000"):
            load_image(tmp_path / name)


def test_reader_error_pickles_with_fields():
    import pickle

    e = pickle.loads(pickle.dumps(ReaderError("a/b.dcm", "broken (fix it)")))
    assert (e.path, e.reason, str(e)) == ("a/b.dcm", "broken (fix it)", "a/b.dcm: broken (fix it)")
