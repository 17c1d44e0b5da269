"""Masks as labels (issue 38 item a): pairing, reading through the readers, the up-front checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beitdomain.config import RecipeError, SegmentConfig, load_recipe
from beitdomain.data.masks import (
    MaskClasses,
    MaskError,
    MaskPair,
    load_pair,
    load_pairs,
    pairs_from_csv,
    pairs_from_folder,
    read_mask,
)
from beitdomain.io import IntensitySpec
from beitdomain.user import UserError

BINARY = MaskClasses(("background", "disc"))


def _disc(size: int = 32, r: int = 8) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    mask = ((yy - size // 2) ** 2 + (xx - size // 3) ** 2 < r * r).astype(np.uint8)
    image = (40 + 150 * mask).astype(np.uint8)
    return image, mask


def _write(tmp: Path, name: str, array: np.ndarray) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith((".tif", ".tiff")):
        import tifffile

        tifffile.imwrite(path, array)
    else:
        Image.fromarray(array).save(path)
    return path


def test_csv_pairs_read_png_and_tiff_masks(tmp_path):
    image, mask = _disc()
    _write(tmp_path, "img/a.png", image)
    _write(tmp_path, "msk/a.png", mask)
    _write(tmp_path, "img/b.png", image[::-1])
    _write(tmp_path, "msk/b.tif", mask[::-1].astype(np.uint16))
    csv = tmp_path / "labels.csv"
    csv.write_text("path,mask,split\nimg/a.png,msk/a.png,train\nimg/b.png,msk/b.tif,\n")
    pairs = pairs_from_csv(csv, tmp_path)
    assert [(p.image.name, p.mask.name, p.split) for p in pairs] == [
        ("a.png", "a.png", "train"),
        ("b.png", "b.tif", None),
    ]
    items = load_pairs(pairs, IntensitySpec(), BINARY)
    assert len(items) == 2
    (x, y), (_, y2) = items
    assert x.shape == (1, 32, 32) and x.dtype == np.float32
    assert y.dtype == np.int64 and np.array_equal(y, mask) and np.array_equal(y2, mask[::-1])


def test_csv_without_a_mask_column_says_what_to_write(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\na.png,x\n")
    with pytest.raises(MaskError, match="'path' and 'mask' columns"):
        pairs_from_csv(csv, tmp_path)


def test_a_mask_of_another_size_names_both_files(tmp_path):
    image, mask = _disc(32)
    img = _write(tmp_path, "a.png", image)
    msk = _write(tmp_path, "a_mask.png", mask[:, :30])
    with pytest.raises(MaskError) as e:
        load_pair(MaskPair(img, msk), IntensitySpec(), BINARY)
    assert str(img) in str(e.value) and str(msk) in str(e.value)
    assert "32 x 30" in str(e.value) and "1 x 32 x 32" in str(e.value)


def test_values_outside_the_classes_name_both_files_and_the_ignore_index_passes(tmp_path):
    image, mask = _disc()
    mask = mask.copy()
    mask[0, :4] = 255
    mask[1, 0] = 3
    img = _write(tmp_path, "a.png", image)
    msk = _write(tmp_path, "a_mask.png", mask)
    with pytest.raises(MaskError, match=r"holds values \[3, 255\] outside the classes") as e:
        load_pair(MaskPair(img, msk), IntensitySpec(), BINARY)
    assert str(img) in str(e.value) and str(msk) in str(e.value)
    three = MaskClasses(("bg", "disc", "rim", "core"), ignore_index=255)
    _, got = load_pair(MaskPair(img, msk), IntensitySpec(), three)
    assert got[0, 0, 0] == 255 and got[0, 1, 0] == 3


def test_classes_are_checked():
    with pytest.raises(UserError, match="at least 2"):
        MaskClasses(("only",))
    with pytest.raises(UserError, match="ignore_index=1 is the value of class 'disc'"):
        MaskClasses(("bg", "disc"), ignore_index=1)
    assert MaskClasses.from_config(SegmentConfig()).names == ("background", "foreground")


def test_an_rgb_mask_is_refused(tmp_path):
    _, mask = _disc()
    msk = _write(tmp_path, "m.png", np.stack([mask] * 3, axis=-1))
    with pytest.raises(MaskError, match="3 channels"):
        read_mask(msk)


def test_mirrored_folder_pairs_by_relative_path_and_stem(tmp_path):
    image, mask = _disc()
    a = _write(tmp_path, "data/p1/a.png", image)
    b = _write(tmp_path, "data/p2/b.tif", image)
    _write(tmp_path, "masks/p1/a.png", mask)
    _write(tmp_path, "masks/p2/b.png", mask)
    pairs = pairs_from_folder([a, b], tmp_path / "data", tmp_path / "masks")
    assert [p.mask.relative_to(tmp_path).as_posix() for p in pairs] == [
        "masks/p1/a.png",
        "masks/p2/b.png",
    ]
    c = _write(tmp_path, "data/p2/c.png", image)
    with pytest.raises(MaskError, match=r"1 image\(s\) .* have no mask .*p2/c.png"):
        pairs_from_folder([a, b, c], tmp_path / "data", tmp_path / "masks")


def test_a_nifti_label_volume_is_sliced_with_its_image(tmp_path):
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("monai")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(12, 10, 6)).astype(np.uint8)  # x, y, z
    scan = (labels * 100 + rng.normal(0, 5, labels.shape)).astype(np.float32)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(scan, affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "ct_seg.nii.gz")
    pair = MaskPair(tmp_path / "ct.nii.gz", tmp_path / "ct_seg.nii.gz")
    classes = MaskClasses(("bg", "liver", "tumour"))
    for axis, n in (("axial", 6), ("coronal", 10)):
        image, mask = load_pair(pair, IntensitySpec(slice_axis=axis), classes)
        assert image.shape[0] == mask.shape[0] == n
        # the slices line up: the bright voxels of each image slice are its class-2 voxels
        assert np.array_equal(image[:, 0] > 0.75, mask == 2)
    bad = labels.copy()
    bad[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(bad, affine), tmp_path / "bad.nii.gz")
    with pytest.raises(MaskError, match=r"bad.nii.gz \(of image .*ct.nii.gz\) holds values \[7\]"):
        load_pair(MaskPair(pair.image, tmp_path / "bad.nii.gz"), IntensitySpec(), classes)


def test_recipe_segment_section(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("segment:\n  classes: [bg, nucleus]\n  ignore_index: 255\n")
    recipe = load_recipe(path)
    assert recipe.segment.classes == ["bg", "nucleus"] and recipe.segment.ignore_index == 255
    assert recipe.segment.decoder == "progressive"
    path.write_text("segment:\n  decoder: upernet\n")
    with pytest.raises(RecipeError, match="segment.decoder"):
        load_recipe(path)


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_a_nifti_label_volume_round_trips_through_its_slices(tmp_path, axis):
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("monai")
    from beitdomain.data.masks import write_nifti_mask

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=(7, 5, 4)).astype(np.uint8)  # x, y, z
    # an oblique, flipped grid (LPS-like, axes swapped): the writer must undo the reorientation
    affine = np.array([[0, -2.0, 0, 10], [-1.5, 0, 0, 5], [0, 0, 3.0, -4], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "scan.nii.gz")
    slices = read_mask(tmp_path / "scan.nii.gz", IntensitySpec(slice_axis=axis))
    out = write_nifti_mask(tmp_path / "scan.nii.gz", slices, axis, tmp_path / "pred.nii.gz")
    back = nib.load(str(out))
    assert np.array_equal(np.asarray(back.dataobj), labels)
    assert np.allclose(back.affine, affine)
