"""DICOM reader: every bundled pydicom test file with pixel data, windows, inversion, privacy."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.uid import UID

from beitdomain.io import IntensitySpec, ReaderError, load_image, read_raw
from beitdomain.io.dicom import read_dicom_series

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _bundled_pixel_files() -> list[tuple[str, bool]]:
    """(path, decodable by pydicom + installed codecs) for local bundled files with pixels."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in get_testdata_files():  # local files only; pydicom does not download here
            if os.path.isdir(f):
                continue
            try:
                ds = pydicom.dcmread(f, force=True)
            except Exception:
                continue
            if not any(k in ds for k in PIXEL_KEYWORDS):
                continue
            try:
                _ = ds.pixel_array
                decodable = True
            except Exception:
                decodable = False
            out.append((f, decodable))
    return out


BUNDLED = _bundled_pixel_files()


def test_bundled_set_is_substantial():
    # Guards the parametrized test below against silently testing nothing.
    assert len(BUNDLED) >= 50
    assert sum(not ok for _, ok in BUNDLED) >= 3


@pytest.mark.parametrize(("path", "decodable"), BUNDLED, ids=[Path(p).name for p, _ in BUNDLED])
def test_bundled_file(path: str, decodable: bool):
    if decodable:
        image, meta = load_image(path)
        assert image.dtype == np.float32
        assert image.ndim in (3, 4) and image.shape[-3] == 1  # default in_chans=1
        assert np.isfinite(image).all()
        assert image.min() >= 0.0 and image.max() <= 1.0
        json.dumps(meta)  # metadata must be serializable for manifests
    else:
        with pytest.raises(ReaderError) as info:
            load_image(path)
        assert info.value.path == path
        assert path in str(info.value)


def test_known_broken_files_raise_reader_error():
    for name in ("MR_truncated.dcm", "JPEG2000-embedded-sequence-delimiter.dcm"):
        path = get_testdata_file(name)
        with pytest.raises(ReaderError, match=name):
            load_image(path)


def test_ct_rescale_and_recipe_window():
    path = get_testdata_file("CT_small.dcm")
    raw, meta = read_raw(path)
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(raw[0, 0], hu)
    image, meta = load_image(path, IntensitySpec(window="ct-lung"))
    lo, hi = -600 - 750, -600 + 750
    expected = np.clip((hu - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(image[0], expected, atol=1e-6)
    assert meta["normalization"]["mode"] == "window"
    image2, _ = load_image(path, IntensitySpec(window=(40, 400)))
    assert not np.allclose(image, image2)


def _mr_small(tmp_path: Path, **changes) -> Path:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for key, value in changes.items():
        setattr(ds, key, value)
    out = tmp_path / f"mr_{len(list(tmp_path.iterdir()))}.dcm"
    ds.save_as(out)
    return out


def test_monochrome1_is_inverted(tmp_path: Path):
    mono2 = _mr_small(tmp_path)
    mono1 = _mr_small(tmp_path, PhotometricInterpretation="MONOCHROME1")
    spec = IntensitySpec(normalize="dtype")
    a2, _ = load_image(mono2, spec)
    a1, meta = load_image(mono1, spec)
    assert meta["photometric"] == "MONOCHROME1"
    np.testing.assert_allclose(a1, 1.0 - a2, atol=1e-6)


def test_file_window_used_in_auto_mode(tmp_path: Path):
    path = _mr_small(tmp_path, WindowCenter=600, WindowWidth=400)
    image, meta = load_image(path)
    assert meta["window"] == [600.0, 400.0]
    assert meta["normalization"] == {"mode": "window", "low": 400.0, "high": 800.0}
    raw, _ = read_raw(path)
    np.testing.assert_allclose(image[0], np.clip((raw[0, 0] - 400.0) / 400.0, 0, 1), atol=1e-6)
    # The recipe window wins over the file's.
    _, meta2 = load_image(path, IntensitySpec(window="ct-bone"))
    assert meta2["normalization"]["low"] == 400 - 900


def test_no_patient_data_in_meta(tmp_path: Path):
    path = _mr_small(
        tmp_path,
        PatientName="Doe^Jane",
        PatientID="PID-123456",
        PatientBirthDate="19700101",
        InstitutionName="Saint Nowhere Hospital",
        ReferringPhysicianName="House^Gregory",
        AccessionNumber="ACC98765",
    )
    _, meta = load_image(path)
    text = json.dumps(meta)
    for secret in ("Doe", "Jane", "PID-123456", "19700101", "Nowhere", "House", "ACC98765"):
        assert secret not in text
    ds = pydicom.dcmread(path)
    assert str(ds.StudyInstanceUID) not in text
    assert not any("patient" in k.lower() or "uid" in k.lower() for k in meta)


def test_multiframe_and_frame_policy():
    path = get_testdata_file("rtdose.dcm")
    image, meta = load_image(path)
    assert image.shape == (15, 1, 10, 10)
    assert meta["frames"] == 15
    middle, _ = load_image(path, IntensitySpec(frames="middle"))
    assert middle.shape == (1, 10, 10)
    raw, _ = read_raw(path)
    np.testing.assert_array_equal(np.argsort(middle.ravel()), np.argsort(raw[7, 0].ravel()))


def test_color_files_luminance_or_rgb():
    palette = get_testdata_file("examples_palette.dcm")
    gray, _ = load_image(palette)
    rgb, meta = load_image(palette, IntensitySpec(in_chans=3))
    assert gray.shape == (1, 350, 800) and rgb.shape == (3, 350, 800)
    assert meta["photometric"] == "PALETTE COLOR"
    assert not np.allclose(rgb[0], rgb[2])  # real colour survived
    ybr, _ = load_image(get_testdata_file("SC_rgb_dcmtk_+eb+cy+n1.dcm"), IntensitySpec(in_chans=3))
    # Top band of this test image is red: R high, G and B low after YBR -> RGB.
    assert ybr[0, 2, 50] > 0.9 and ybr[1, 2, 50] < 0.1 and ybr[2, 2, 50] < 0.1


def test_unsupported_transfer_syntax(tmp_path: Path):
    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"))
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2
    path = tmp_path / "mpeg.dcm"
    ds.save_as(path)
    with pytest.raises(ReaderError, match=r"mpeg\.dcm: cannot decode .*MPEG2"):
        load_image(path)


def test_dicom_without_pixels(tmp_path: Path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    del ds.PixelData
    path = tmp_path / "nopix.dcm"
    ds.save_as(path)
    with pytest.raises(ReaderError, match="no pixel data"):
        load_image(path)


def test_series_folder_sorted_by_position(tmp_path: Path):
    series = tmp_path / "series"
    series.mkdir()
    base = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    # File names in reverse order of the slice position: sorting must follow the position.
    for k, z in enumerate([20.0, 10.0, 0.0]):
        ds = base.copy()
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, z]
        arr = np.full((64, 64), int(z), dtype=np.int16)
        ds.PixelData = arr.tobytes()
        ds.save_as(series / f"slice_{k}.dcm")
    raw, meta = read_dicom_series(series)
    assert raw.shape == (3, 1, 64, 64)
    assert [float(raw[i, 0, 0, 0]) for i in range(3)] == [0.0, 10.0, 20.0]
    image, meta = load_image(series, IntensitySpec(normalize="percentile"))
    assert image.shape == (3, 1, 64, 64) and meta["reader"] == "dicom-series"


def test_decoder_reason_after_a_colon_is_kept(monkeypatch: pytest.MonkeyPatch):
    # pydicom's multi-plugin failures put the reason on the lines after "...plugins:".
    path = get_testdata_file("CT_small.dcm")

    def fail(self):
        raise RuntimeError(
            "Unable to decompress 'JPEG 2000' pixel data because all plugins failed:\n"
            "  pylibjpeg: invalid marker 0xFF4F at offset 12\n"
        )

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(fail))
    with pytest.raises(ReaderError, match="plugins failed: pylibjpeg: invalid marker 0xFF4F"):
        load_image(path)
