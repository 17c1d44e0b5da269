"""A folder holding one DICOM series is one volume, slices ordered by position, not file name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import bundled_dicom

from beitdomain.data.cache import CachedImages, build_cache
from beitdomain.data.dataset import ManifestImages
from beitdomain.data.index import scan
from beitdomain.io import IntensitySpec, load_image


def write_series(folder: Path, n: int = 5, patient: str = "PID-1") -> list[np.ndarray]:
    """`n` slices built from CT_small's real pixels (shifted per slice), written with file names
    in the reverse of their position along the slice normal. Returns the slices in position
    order (stored values)."""
    src = pydicom.dcmread(bundled_dicom("CT_small.dcm"))
    base = src.pixel_array
    series_uid = pydicom.uid.generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    slices = []
    for z in range(n):
        ds = pydicom.dcmread(bundled_dicom("CT_small.dcm"))
        arr = np.roll(base, 7 * z, axis=1).astype(base.dtype)
        ds.PixelData = arr.tobytes()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, -100.0 + 2.5 * z]
        ds.InstanceNumber = n - z  # misleading on purpose: position decides
        ds.PatientID = patient
        ds.save_as(folder / f"IM{n - z:04d}.dcm")  # names sort against the position
        slices.append(arr)
    return slices


def test_series_folder_reads_as_one_volume_in_position_order(tmp_path: Path):
    slices = write_series(tmp_path / "data" / "series1")
    write_series(tmp_path / "data" / "series2", n=3, patient="PID-2")
    manifest = scan(tmp_path / "data", dicom_series=True)
    assert [(e.path, e.frames, e.reader) for e in manifest.entries] == [
        ("series1", 5, "dicom-series"),
        ("series2", 3, "dicom-series"),
    ]
    assert [e.group for e in manifest.entries] == ["patient-1", "patient-2"]
    image, _ = load_image(tmp_path / "data" / "series1", IntensitySpec(normalize="dtype"))
    slope = float(pydicom.dcmread(bundled_dicom("CT_small.dcm")).RescaleSlope)
    hu = [s.astype(np.float32) * slope for s in slices]
    order = [
        int(np.argmax([np.corrcoef(image[k, 0].ravel(), h.ravel())[0, 1] for h in hu]))
        for k in range(5)
    ]
    assert order == [0, 1, 2, 3, 4]
    items = ManifestImages(manifest)
    assert len(items) == 8
    _ = [items[i] for i in range(5)]
    assert items.decodes == 1  # the series is decoded once for its five slices
    # Without the option every file is an image of its own.
    assert len(scan(tmp_path / "data").entries) == 8


def test_series_cache_is_fresh_until_a_slice_changes(tmp_path: Path):
    write_series(tmp_path / "data" / "s")
    manifest = scan(tmp_path / "data", dicom_series=True)
    out = tmp_path / "cache"
    cached = build_cache(manifest, out, size=32)
    assert len(cached) == 5 and [cached.source(i)[1] for i in range(5)] == [0, 1, 2, 3, 4]
    CachedImages(out)  # fresh
    victim = tmp_path / "data" / "s" / "IM0003.dcm"
    victim.write_bytes(victim.read_bytes() + b"\0\0")
    with pytest.raises(Exception, match="s: size"):
        CachedImages(out)
