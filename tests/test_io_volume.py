"""Volumes through MONAI's readers: nibabel's bundled NIfTI files, and NRRD / MetaImage copies of
them; canonical orientation, slice axes, spacing, HU windows, slice selection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pytest.importorskip("monai")
from nibabel.testing import data_path  # noqa: E402

from beitdomain.io import (  # noqa: E402
    IntensitySpec,
    ReaderError,
    SpecError,
    find_reader,
    kept_frames,
    load_image,
    read_raw,
)
from beitdomain.io.intensity import WINDOW_PRESETS, frame_indices  # noqa: E402
from beitdomain.io.volume import is_metaimage, is_nifti, is_nrrd, reslice  # noqa: E402

ANAT = os.path.join(data_path, "anatomical.nii")  # 33 x 41 x 25, int16, LAS, 2 mm
EX4D = os.path.join(data_path, "example4d.nii.gz")  # 128 x 96 x 24 x 2, oblique affine
STANDARD = os.path.join(data_path, "standard.nii.gz")  # 4 x 5 x 7 uint8, RAS, 1 x 3 x 2 mm


def canonical(path: str) -> np.ndarray:
    """nibabel's own RAS+ array (an independent reference for the reader's orientation)."""
    img = nib.as_closest_canonical(nib.load(path))
    return np.asarray(img.dataobj)


def test_sniffing_by_content(tmp_path: Path):
    for path in (ANAT, EX4D, STANDARD):
        assert find_reader(path).name == "nifti"
    renamed = tmp_path / "scan.dat"  # content, not suffix, decides
    renamed.write_bytes(Path(EX4D).read_bytes())
    assert find_reader(renamed).name == "nifti"
    assert is_nifti(Path(ANAT).read_bytes()[:512])
    assert not is_nrrd(b"NRRD") and is_nrrd(b"NRRD0005\ntype: int16\n")
    assert is_metaimage(b"ObjectType = Image\nNDims = 3\n")
    assert not is_metaimage(b"ObjectType = Image\n") and not is_nifti(b"\x00" * 512)


def test_nifti_axial_slices_match_nibabel_canonical():
    raw, meta = read_raw(ANAT)
    ref = canonical(ANAT)  # [X, Y, Z] in RAS+ (the file is LAS: x is flipped)
    assert raw.shape == (25, 1, 41, 33)  # [Z, C, Y, X]
    assert meta["reader"] == "nifti" and meta["orientation"] == "RAS"
    assert meta["spacing"] == [2.0, 2.0, 2.0]
    assert meta["dtype"] == "int16" and raw.dtype == np.int16  # big-endian file, native array
    # Radiological view: anterior at the top (y flipped), patient's right on the left (x flipped).
    for z in (0, 12, 24):
        np.testing.assert_array_equal(raw[z, 0], ref[::-1, ::-1, z].T)
    json.dumps(meta)


@pytest.mark.parametrize("axis", ["coronal", "sagittal"])
def test_other_slice_axes_match_nibabel(axis: str):
    ref = canonical(ANAT)
    image, meta = load_image(ANAT, IntensitySpec(slice_axis=axis, normalize="dtype"))
    raw, _ = read_raw(ANAT)
    sl = reslice(raw, axis)
    if axis == "coronal":
        assert sl.shape == (41, 1, 25, 33)
        np.testing.assert_array_equal(sl[10, 0], ref[::-1, 10, ::-1].T)  # superior at top
    else:
        assert sl.shape == (33, 1, 25, 41)
        np.testing.assert_array_equal(sl[5, 0], ref[5, ::-1, ::-1].T)  # anterior on the left
    assert image.shape[0] == sl.shape[0] and meta["slice_axis"] == axis


def test_spacing_follows_the_axis():
    _, meta = read_raw(STANDARD)
    assert meta["spacing"] == [1.0, 3.0, 2.0]
    expect = {
        "axial": ([3.0, 1.0], 2.0),
        "coronal": ([2.0, 1.0], 3.0),
        "sagittal": ([2.0, 3.0], 1.0),
    }
    for axis, (pixel, slice_) in expect.items():
        _, m = load_image(STANDARD, IntensitySpec(slice_axis=axis))
        assert m["pixel_spacing"] == pixel and m["slice_spacing"] == slice_


def test_oblique_4d_volume_channels_and_orientation():
    raw, _ = read_raw(EX4D)
    ref = canonical(EX4D)  # [X, Y, Z, T]
    assert raw.shape == (ref.shape[2], 2, ref.shape[1], ref.shape[0])
    np.testing.assert_array_equal(raw[3, 1], ref[::-1, ::-1, 3, 1].T)
    with pytest.raises(ReaderError, match="2 channels"):
        load_image(EX4D)  # two time points cannot be one grey channel without a choice
    image, _ = load_image(EX4D, IntensitySpec(channels=(1,), frames="middle"))
    assert image.shape == (1, 96, 128)


def test_hu_values_and_window_presets(tmp_path: Path):
    """A CT-like NIfTI stored as uint16 with scl_inter -1024: HU after reading, windows apply."""
    ref = canonical(ANAT).astype(np.float32)
    stored = (ref - ref.min()).astype(np.uint16)
    img = nib.Nifti1Image(stored, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_slope_inter(1.0, -1024.0)
    path = tmp_path / "ct.nii.gz"
    nib.save(img, path)
    raw, meta = read_raw(path)
    assert meta["rescale"] == [1.0, -1024.0] and meta["dtype"] == "uint16"
    hu = stored.astype(np.float32) - 1024.0
    np.testing.assert_allclose(raw[7, 0], hu[::-1, ::-1, 7].T)
    image, m = load_image(path, IntensitySpec(window="ct-lung"))
    center, width = WINDOW_PRESETS["ct-lung"]
    expect = np.clip((hu[::-1, ::-1, 7].T - (center - width / 2)) / width, 0, 1)
    np.testing.assert_allclose(image[7, 0], expect, atol=1e-6)
    assert m["normalization"]["mode"] == "window"


def test_slice_selection_policies():
    assert frame_indices(10, "every:3").tolist() == [0, 3, 6, 9]
    assert frame_indices(10, "range:2:5").tolist() == [2, 3, 4]
    assert frame_indices(10, "range:-2:").tolist() == [8, 9]
    assert frame_indices(10, "middle").tolist() == [5]
    for bad in ("every:0", "every:x", "range:a:b", "some", "range"):
        with pytest.raises(SpecError, match="every:K"):
            IntensitySpec(frames=bad)
    image, _ = load_image(ANAT, IntensitySpec(frames="range:10:14"))
    full, _ = load_image(ANAT)
    np.testing.assert_array_equal(image, full[10:14])
    spec = IntensitySpec(slice_axis="sagittal", frames="every:4")
    assert kept_frames([25, 1, 41, 33], "nifti", spec).tolist() == list(range(0, 33, 4))
    assert kept_frames([25, 1, 41, 33], "dicom", spec).tolist() == list(range(0, 25, 4))


def test_nrrd_and_metaimage_read_like_the_nifti(tmp_path: Path):
    """The same voxels written as NRRD (pynrrd) and MetaImage (ITK) give the same slices."""
    nrrd = pytest.importorskip("nrrd")
    itk = pytest.importorskip("itk")
    src = nib.load(ANAT)
    vox = np.asarray(src.dataobj).astype(np.int16)  # [X, Y, Z] in LAS
    ref, _ = read_raw(ANAT)
    # LPS spaces: the file's L axis is +x in LPS, its A axis is -y; write with directions.
    nrrd.write(
        str(tmp_path / "anat.nrrd"),
        vox,
        {
            "space": "left-posterior-superior",
            "space directions": [[2.0, 0, 0], [0, -2.0, 0], [0, 0, 2.0]],
            "space origin": [0.0, 0.0, 0.0],
        },
    )
    image = itk.image_from_array(np.ascontiguousarray(vox.transpose(2, 1, 0)))
    image.SetSpacing([2.0, 2.0, 2.0])
    direction = np.diag([1.0, -1.0, 1.0])
    image.SetDirection(itk.matrix_from_array(direction))
    itk.imwrite(image, str(tmp_path / "anat.mha"))
    for name, reader in (("anat.nrrd", "nrrd"), ("anat.mha", "metaimage")):
        raw, meta = read_raw(tmp_path / name)
        assert meta["reader"] == reader
        assert raw.shape == ref.shape
        np.testing.assert_array_equal(raw, ref)
        assert meta["spacing"] == [2.0, 2.0, 2.0]


def test_unreadable_volume_is_a_reader_error(tmp_path: Path):
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(Path(EX4D).read_bytes()[:2000])
    with pytest.raises(ReaderError, match="cut.nii.gz"):
        read_raw(bad)


def test_monai_is_imported_only_by_a_volume_read():
    code = (
        "import sys; from beitdomain.io import load_image; "
        "from beitdomain.data.cache import CachedImages; import beitdomain.data.unlabeled; "
        "assert 'monai' not in sys.modules, 'monai imported'; "
        f"load_image({ANAT!r}); assert 'monai' in sys.modules"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
