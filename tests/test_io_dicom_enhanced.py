"""Enhanced multi-frame DICOM (per-frame Rescale and VOI from functional groups), decoding a
multi-frame file once per use, and truncated files named as truncated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import bundled_dicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from beitdomain.data.dataset import ManifestImages
from beitdomain.data.index import scan
from beitdomain.io import IntensitySpec, ReaderError, load_image, read_raw

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def _group(**macros: dict[str, object]) -> Dataset:
    group = Dataset()
    for seq, attrs in macros.items():
        item = Dataset()
        for k, v in attrs.items():
            setattr(item, k, v)
        setattr(group, seq, Sequence([item]))
    return group


def write_enhanced_mr(
    dst: Path, slopes: list[float], windows: list[tuple[float, float]] | None = None
) -> tuple[Path, np.ndarray]:
    """An Enhanced MR whose frames are MR_small's real slice (flipped/rotated copies), with
    Rescale (and VOI) only in the per-frame functional groups, as scanners write them."""
    ds = pydicom.dcmread(bundled_dicom("MR_small.dcm"))
    base = ds.pixel_array.astype(np.int16)
    stack = np.stack([np.rot90(base, k) for k in range(len(slopes))])  # [F, 64, 64]
    for key in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        if key in ds:
            delattr(ds, key)
    ds.SOPClassUID = ENHANCED_MR
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_MR
    ds.SOPInstanceUID = generate_uid()
    ds.NumberOfFrames = len(slopes)
    ds.PixelData = stack.tobytes()
    ds.SharedFunctionalGroupsSequence = Sequence(
        [_group(PixelMeasuresSequence={"PixelSpacing": [0.5, 0.5], "SliceThickness": 2.0})]
    )
    frames = []
    for i, slope in enumerate(slopes):
        macros: dict[str, dict[str, object]] = {
            "PixelValueTransformationSequence": {
                "RescaleSlope": slope,
                "RescaleIntercept": -10.0 * i,
                "RescaleType": "US",
            }
        }
        if windows is not None:
            macros["FrameVOILUTSequence"] = {
                "WindowCenter": windows[i][0],
                "WindowWidth": windows[i][1],
            }
        frames.append(_group(**macros))
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst, stack


def test_per_frame_rescale_from_functional_groups(tmp_path: Path):
    slopes = [1.0, 2.108, 0.5]
    path, stored = write_enhanced_mr(tmp_path / "emr.dcm", slopes)
    raw, meta = read_raw(path)
    assert raw.shape == (3, 1, 64, 64)
    for i, slope in enumerate(slopes):
        np.testing.assert_allclose(raw[i, 0], stored[i] * slope - 10.0 * i, rtol=1e-6)
    assert meta["rescale"] == [1.0, 0.0]
    np.testing.assert_allclose(
        meta["rescale_frames"], [[s, -10.0 * i] for i, s in enumerate(slopes)]
    )


def test_shared_rescale_applies_to_every_frame(tmp_path: Path):
    path, stored = write_enhanced_mr(tmp_path / "emr.dcm", [1.0, 1.0])
    ds = pydicom.dcmread(path)
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.PixelValueTransformationSequence
    ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence = Sequence([Dataset()])
    shared = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    shared.RescaleSlope, shared.RescaleIntercept = 2.108, -5.0
    ds.save_as(path)
    raw, meta = read_raw(path)
    np.testing.assert_allclose(raw[:, 0], stored * np.float32(2.108) - 5.0, rtol=1e-6)
    assert meta["rescale"] == pytest.approx([2.108, -5.0])
    assert "rescale_frames" not in meta


def test_per_frame_voi_windows(tmp_path: Path):
    windows = [(300.0, 600.0), (500.0, 1000.0), (100.0, 200.0)]
    path, stored = write_enhanced_mr(tmp_path / "emr.dcm", [1.0, 1.0, 1.0], windows)
    image, meta = load_image(path)  # auto: the file's windows, each frame its own
    assert meta["normalization"]["mode"] == "window"
    for i, (c, w) in enumerate(windows):
        expect = np.clip((stored[i] - 10.0 * i - (c - w / 2)) / w, 0, 1)
        np.testing.assert_allclose(image[i, 0], expect, atol=1e-6)
    # Picking frames keeps each frame's window with it.
    two, _ = load_image(path, IntensitySpec(frames="range:1:3"))
    np.testing.assert_allclose(two, image[1:3], atol=1e-6)
    # A recipe window overrides the file's, for every frame alike.
    fixed, _ = load_image(path, IntensitySpec(window=(300.0, 600.0)))
    np.testing.assert_allclose(fixed[0], image[0], atol=1e-6)
    assert not np.allclose(fixed[1], image[1])


def test_dtype_range_covers_every_frames_rescale(tmp_path: Path):
    path, _ = write_enhanced_mr(tmp_path / "emr.dcm", [1.0, 2.0])
    image, meta = load_image(path, IntensitySpec(normalize="dtype"))
    lo, hi = meta["normalization"]["low"], meta["normalization"]["high"]
    bits = pydicom.dcmread(path).BitsStored
    # frame 1 (slope 2, intercept -10) stretches both ends
    assert lo == -(2 ** (bits - 1)) * 2.0 - 10.0 and hi == (2 ** (bits - 1) - 1) * 2.0 - 10.0
    assert image.min() >= 0 and image.max() <= 1


def test_multi_frame_file_is_decoded_once_per_use(tmp_path: Path):
    write_enhanced_mr(tmp_path / "data" / "emr.dcm", [1.0] * 12)
    manifest = scan(tmp_path / "data")
    images = ManifestImages(manifest, IntensitySpec())
    assert len(images) == 12
    frames = [images[i] for i in range(len(images))]
    assert images.decodes == 1
    whole, _ = load_image(tmp_path / "data" / "emr.dcm")
    np.testing.assert_array_equal(np.stack(frames), whole)
    frames[0][:] = 0  # a caller writing into an item must not change the kept decode
    assert images[0].max() > 0 and images.decodes == 1
    tight = ManifestImages(manifest, IntensitySpec(), budget=1)  # over budget: decode each time
    _ = [tight[i] for i in range(3)]
    assert tight.decodes == 3


def test_dicom_truncated_inside_patient_name_is_reported_as_truncated(tmp_path: Path):
    data = bundled_dicom("CT_small.dcm").read_bytes()
    at = data.find(b"\x10\x00\x10\x00PN")  # (0010,0010) PatientName, explicit VR little endian
    assert at > 0
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: at + 10])  # 2 of its value bytes
    with pytest.raises(ReaderError, match="truncated") as info:
        read_raw(cut)
    assert "PatientName" in str(info.value) and "no pixel data" not in str(info.value)
    # An intact non-image DICOM still says 'no pixel data'.
    from pydicom.data import get_testdata_file

    with pytest.raises(ReaderError, match="no pixel data"):
        read_raw(get_testdata_file("rtplan.dcm"))


def test_bundled_truncated_pixel_data_names_the_cut():
    from pydicom.data import get_testdata_file

    with pytest.raises(ReaderError, match="truncated.*PixelData"):
        read_raw(get_testdata_file("MR_truncated.dcm"))
