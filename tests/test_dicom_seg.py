"""DICOM Segmentation objects as label maps (issue 38): pydicom's bundled real SEG files, and
small SEGs built from them with pydicom for several segments, overlaps and FRACTIONAL."""

from __future__ import annotations

import copy

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.pixels import pack_bits  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402

from beitdomain.io.dicom_seg import (  # noqa: E402
    LABEL_MAP_SEGMENTATION_STORAGE,
    SegError,
    is_dicom_seg,
    read_dicom_seg,
    read_seg_mask,
    segment_names,
)

# the three CT slices liver_1frame.dcm references; its one frame lies on the first
LIVER_CT = [f"1.2.392.200103.20080913.113635.2.2009.6.22.21.43.10.{n}.1" for n in (23433, 23432)]


@pytest.mark.parametrize("name", ["liver_1frame.dcm", "liver_expb_1frame.dcm"])
def test_pydicoms_liver_seg_is_a_label_map_on_its_source_slice(name):
    path = get_testdata_file(name)  # explicit VR little and big endian: the same segmentation
    assert is_dicom_seg(path)
    seg = read_dicom_seg(path)
    assert seg.segments == {1: "Liver"} and not seg.fractional
    assert seg.sources == [(LIVER_CT[0], None)]
    assert seg.labels.shape == (1, 512, 512) and seg.labels.dtype == np.int64
    assert set(np.unique(seg.labels)) == {0, 1}
    assert int(seg.labels.sum()) == 36233  # the liver: 14% of the slice
    ys, xs = np.nonzero(seg.labels[0])
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (145, 366, 79, 350)
    assert len(seg.referenced) == 3 and seg.referenced[:2] == LIVER_CT
    assert segment_names(seg) == ["background", "Liver"]
    # a slice the SEG references but has no frame for is all background (writers leave empty
    # frames out); one alone is its only label map
    assert not seg.for_instance(LIVER_CT[1]).any()
    assert np.array_equal(read_seg_mask(path), seg.labels)
    with pytest.raises(SegError, match=rf"{name}: segments no image with SOP Instance UID 1\.2\.3"):
        seg.for_instance("1.2.3")


def test_images_are_not_segs():
    assert not is_dicom_seg(get_testdata_file("CT_small.dcm"))
    assert not is_dicom_seg(__file__)
    with pytest.raises(SegError, match=r"CT_small.dcm: is not a DICOM Segmentation"):
        read_dicom_seg(get_testdata_file("CT_small.dcm"))


def _seg(
    tmp_path,
    frames: list[np.ndarray],
    segments: list[int],
    sources: list[tuple[str, int | None]],
    fractional: bool = False,
    name: str = "seg.dcm",
):
    """A SEG built from pydicom's liver SEG: `frames` (H x W each) of `segments` on `sources`,
    with segments 1..max(segments) described."""
    ds = copy.deepcopy(pydicom.dcmread(get_testdata_file("liver_1frame.dcm")))
    h, w = frames[0].shape
    ds.Rows, ds.Columns, ds.NumberOfFrames = h, w, len(frames)
    described = []
    for number in range(1, max(segments) + 1):
        item = copy.deepcopy(ds.SegmentSequence[0])
        item.SegmentNumber, item.SegmentLabel = number, ["Liver", "Tumor", "Vessel"][number - 1]
        described.append(item)
    ds.SegmentSequence = Sequence(described)
    template = ds.PerFrameFunctionalGroupsSequence[0]
    groups = []
    for segment, (uid, number) in zip(segments, sources):
        item = copy.deepcopy(template)
        item.SegmentIdentificationSequence[0].ReferencedSegmentNumber = segment
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        ref.ReferencedSOPInstanceUID = uid
        if number is not None:
            ref.ReferencedFrameNumber = number
        groups.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    stack = np.stack(frames)
    if fractional:
        ds.SegmentationType, ds.SegmentationFractionalType = "FRACTIONAL", "PROBABILITY"
        ds.MaximumFractionalValue = 255
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = stack.astype(np.uint8).tobytes()
    else:
        ds.PixelData = pack_bits(stack.astype(np.uint8))
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _discs(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    organ = ((yy - 8) ** 2 + (xx - 8) ** 2 < 36).astype(np.uint8)  # r = 6
    tumor = ((yy - 8) ** 2 + (xx - 10) ** 2 < 4).astype(np.uint8)  # r = 2, inside the organ
    return organ, tumor


def test_segments_on_the_frames_of_a_multi_frame_source(tmp_path):
    organ, tumor = _discs()
    apart = np.roll(tumor, (-7, -9), axis=(0, 1))  # a tumour in the corner, outside the organ
    path = _seg(
        tmp_path,
        [organ, apart, organ],
        [1, 2, 1],
        [("1.2.9", 1), ("1.2.9", 1), ("1.2.9", 3)],
    )
    seg = read_dicom_seg(path)
    assert seg.sources == [("1.2.9", 1), ("1.2.9", 3)]
    assert seg.segments == {1: "Liver", 2: "Tumor"}
    expected = organ + 2 * apart
    assert np.array_equal(seg.labels[0], expected) and np.array_equal(seg.labels[1], organ)
    # frame 2 of the 3-frame source has no SEG frame: background
    per_frame = seg.for_instance("1.2.9", frames=3)
    assert per_frame.shape == (3, 16, 16) and not per_frame[1].any()
    assert np.array_equal(per_frame[2], organ)
    with pytest.raises(SegError, match=r"seg.dcm: segments frame 3 of instance 1\.2\.9, which"):
        seg.for_instance("1.2.9", frames=2)

    # paired with its image by SOP Instance UID
    image = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    image.SOPInstanceUID, image.NumberOfFrames = "1.2.9", 3
    image.save_as(tmp_path / "ct.dcm")
    assert np.array_equal(read_seg_mask(path, tmp_path / "ct.dcm"), per_frame)
    with pytest.raises(SegError, match=r"seg.dcm: segments 2 source frame\(s\); say which"):
        read_seg_mask(path)


def test_overlapping_segments_are_refused_unless_the_higher_number_wins(tmp_path):
    organ, tumor = _discs()
    path = _seg(tmp_path, [organ, tumor], [1, 2], [("1.2.9", None)] * 2)
    with pytest.raises(
        SegError, match=r"seg.dcm: segments 1 \(Liver\) and 2 \(Tumor\) overlap in 9 pixel"
    ):
        read_dicom_seg(path)
    labels = read_dicom_seg(path, overlap="higher").labels[0]
    assert np.array_equal(labels, np.where(tumor > 0, 2, organ))
    # the order of the frames does not decide it
    swapped = _seg(tmp_path, [tumor, organ], [2, 1], [("1.2.9", None)] * 2, name="swapped.dcm")
    assert np.array_equal(read_dicom_seg(swapped, overlap="higher").labels[0], labels)


def test_a_fractional_seg_is_thresholded_at_half(tmp_path):
    organ, _ = _discs()
    probability = np.linspace(0, 255, 256).reshape(16, 16).round().astype(np.uint8) * organ
    path = _seg(tmp_path, [probability], [1], [("1.2.9", None)], fractional=True)
    seg = read_dicom_seg(path)
    assert seg.fractional
    assert np.array_equal(seg.labels[0], (probability >= 127.5).astype(np.int64))
    assert 0 < seg.labels.sum() < organ.sum()  # only the organ's upper half is above 0.5
    assert read_dicom_seg(path, threshold=0.25).labels.sum() > seg.labels.sum()


def test_what_is_not_supported_is_said_naming_the_file(tmp_path):
    organ, _ = _discs()
    path = _seg(tmp_path, [organ], [3], [("1.2.9", None)])
    ds = pydicom.dcmread(path)
    ds.SegmentSequence = Sequence(list(ds.SegmentSequence)[:2])  # segment 3 not described
    ds.save_as(tmp_path / "undescribed.dcm")
    with pytest.raises(SegError, match=r"undescribed.dcm: frame 1 belongs to segment 3, which"):
        read_dicom_seg(tmp_path / "undescribed.dcm")

    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence
    ds.save_as(tmp_path / "positions.dcm")
    with pytest.raises(SegError, match=r"positions.dcm: frame 1 names no source image"):
        read_dicom_seg(tmp_path / "positions.dcm")

    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 2
    ds.PixelData = pack_bits(np.stack([organ, organ]))
    ds.save_as(tmp_path / "short.dcm")
    with pytest.raises(SegError, match=r"short.dcm: holds 2 frame\(s\) but 1 PerFrame"):
        read_dicom_seg(tmp_path / "short.dcm")

    ds = pydicom.dcmread(path)
    ds.SOPClassUID = LABEL_MAP_SEGMENTATION_STORAGE
    ds.save_as(tmp_path / "labelmap.dcm")
    assert is_dicom_seg(tmp_path / "labelmap.dcm")
    with pytest.raises(SegError, match=r"labelmap.dcm: is a Label Map Segmentation"):
        read_dicom_seg(tmp_path / "labelmap.dcm")

    with pytest.raises(SegError, match=r"ct: is a DICOM series folder"):
        (tmp_path / "ct").mkdir()
        read_seg_mask(path, tmp_path / "ct")


def test_a_seg_error_is_a_user_error_naming_the_file(tmp_path):
    from beitdomain.user import UserError

    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 16)
    with pytest.raises(UserError, match=r"broken.dcm"):
        read_dicom_seg(bad)


def test_a_seg_is_a_mask_in_a_segmentation_pair(tmp_path):
    """`data.masks` reads a SEG beside its DICOM image: the label map of that image's frames,
    checked against the image's grid and the recipe's classes like any mask."""
    from beitdomain.data.masks import MaskClasses, MaskError, MaskPair, load_pair
    from beitdomain.io import IntensitySpec

    image = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    image.save_as(tmp_path / "ct.dcm")
    yy, xx = np.mgrid[:128, :128]
    organ = ((yy - 64) ** 2 + (xx - 60) ** 2 < 900).astype(np.uint8)
    seg = _seg(tmp_path, [organ], [1], [(str(image.SOPInstanceUID), None)])
    classes = MaskClasses(names=("background", "liver"))
    pixels, mask = load_pair(MaskPair(tmp_path / "ct.dcm", seg), IntensitySpec(), classes)
    assert pixels.shape == (1, 1, 128, 128) and mask.shape == (1, 128, 128)
    assert np.array_equal(mask[0], organ)

    other = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    other.SOPInstanceUID = "1.2.826.0.1.3680043.2.1125.99"
    other.save_as(tmp_path / "other.dcm")
    with pytest.raises(MaskError, match=r"mask .*seg\.dcm \(of image .*other\.dcm\) cannot be"):
        load_pair(MaskPair(tmp_path / "other.dcm", seg), IntensitySpec(), classes)
    two = _seg(tmp_path, [organ], [2], [(str(image.SOPInstanceUID), None)], name="two.dcm")
    with pytest.raises(MaskError, match=r"two\.dcm"):  # segment 2: no such class
        load_pair(MaskPair(tmp_path / "ct.dcm", two), IntensitySpec(), classes)
