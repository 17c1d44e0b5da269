"""DICOM Segmentation objects (SEG) as integer label maps: 0 is background, segment number k is
class k.

A SEG stores one frame per (segment, source frame): frame i of the pixel data belongs to the
segment its `PerFrameFunctionalGroupsSequence[i].SegmentIdentificationSequence` names, and lies
on the source image its `DerivationImageSequence.SourceImageSequence` references (SOP Instance
UID, and the frame number for a multi-frame source). The frames of one source are merged into
one label map. A BINARY frame marks its segment where it is 1; a FRACTIONAL frame where its
value over `MaximumFractionalValue` is at least `threshold` (0.5: half the pixel, or an even
probability). Segments that overlap in a pixel cannot share one label map: that is refused
unless ``overlap="higher"`` (the higher segment number wins, e.g. a tumour over its organ).

A source the SEG references (`ReferencedSeriesSequence`) but holds no frame for is all
background: writers leave empty frames out. pydicom reads the file; highdicom is not needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from beitdomain.io.base import is_dicom
from beitdomain.io.dicom import _dcmread, _pydicom, _quiet
from beitdomain.io.errors import ReaderError

__all__ = [
    "SEG_SOP_CLASSES",
    "DicomSeg",
    "SegError",
    "is_dicom_seg",
    "read_dicom_seg",
    "read_seg_mask",
    "segment_names",
]

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
SEG_SOP_CLASSES = (SEGMENTATION_STORAGE, LABEL_MAP_SEGMENTATION_STORAGE)

Source = tuple[str, int | None]  # (referenced SOP Instance UID, frame number or None)


class SegError(ReaderError):
    """A DICOM SEG that cannot be read as a label map; the message names the file."""


@dataclass
class DicomSeg:
    """A SEG's label maps, one per source frame it has frames for.

    Attributes:
        path: The SEG file.
        segments: Segment number -> Segment Label (the label maps' values, 0 aside).
        sources: ``(SOP Instance UID, frame number or None)`` of each label map.
        labels: ``[N, H, W]`` int64, ``labels[k]`` on ``sources[k]``.
        referenced: The source instances the SEG names (`ReferencedSeriesSequence`), in order;
            one without frames is all background.
        fractional: The SEG is FRACTIONAL (thresholded into the labels).
    """

    path: Path
    segments: dict[int, str]
    sources: list[Source]
    labels: np.ndarray
    referenced: list[str] = field(default_factory=list)
    fractional: bool = False

    def for_instance(self, uid: str, frames: int = 1) -> np.ndarray:
        """The label maps ``[frames, H, W]`` of source instance `uid` (frame f of a multi-frame
        source is row f - 1; a frame without SEG frames is background).

        Raises:
            SegError: the SEG neither holds frames for `uid` nor references it.
        """
        height, width = self.labels.shape[1:]
        out = np.zeros((frames, height, width), np.int64)
        hits = [k for k, (u, _) in enumerate(self.sources) if u == uid]
        if not hits and uid not in self.referenced:
            known = sorted({u for u, _ in self.sources} | set(self.referenced))
            shown = ", ".join(known[:3]) + (f" and {len(known) - 3} more" if len(known) > 3 else "")
            raise SegError(
                self.path,
                f"segments no image with SOP Instance UID {uid}; it references {shown}",
            )
        for k in hits:
            number = self.sources[k][1]
            row = 0 if number is None else number - 1
            if not 0 <= row < frames:
                raise SegError(
                    self.path,
                    f"segments frame {number} of instance {uid}, which has {frames} frame(s)",
                )
            out[row] = self.labels[k]
        return out


def is_dicom_seg(path: str | os.PathLike) -> bool:
    """Whether `path` is a DICOM file of a Segmentation SOP class (read from its header)."""
    try:
        with open(path, "rb") as f:
            if not is_dicom(f.read(256)):
                return False
        ds = _dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # not a file, not DICOM: not a SEG either
        return False
    return str(ds.get("SOPClassUID", "")) in SEG_SOP_CLASSES


def _segments(ds: Any, path: str) -> dict[int, str]:
    items = ds.get("SegmentSequence") or []
    if not items:
        raise SegError(path, "is a DICOM SEG without a SegmentSequence (no segments described)")
    segments: dict[int, str] = {}
    for item in items:
        number = item.get("SegmentNumber")
        if number is None or int(number) < 1:
            raise SegError(
                path, f"SegmentSequence holds a segment number {number!r}; use 1, 2, ..."
            )
        if int(number) in segments:
            raise SegError(path, f"SegmentSequence describes segment {int(number)} twice")
        segments[int(number)] = str(item.get("SegmentLabel", "") or f"segment {int(number)}")
    return segments


def _one(item: Any, keyword: str) -> Any:
    seq = item.get(keyword) if item is not None else None
    return seq[0] if seq else None


def _frame_info(ds: Any, frames: int, path: str) -> list[tuple[int, Source]]:
    """(segment number, source) of each frame, per-frame entries over the shared ones."""
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    shared = _one(ds, "SharedFunctionalGroupsSequence")
    if len(per_frame) < frames:
        raise SegError(
            path,
            f"holds {frames} frame(s) but {len(per_frame)} PerFrameFunctionalGroupsSequence "
            "item(s); each frame needs one to say its segment and source image",
        )
    # Items past the pixel data's frames describe frames that are not there (pydicom's
    # one-frame test files keep all three items of the original); only the first are used.
    info: list[tuple[int, Source]] = []
    for i, item in enumerate(per_frame[:frames]):
        ident = _one(item, "SegmentIdentificationSequence") or _one(
            shared, "SegmentIdentificationSequence"
        )
        if ident is None or "ReferencedSegmentNumber" not in ident:
            raise SegError(
                path, f"frame {i + 1} has no SegmentIdentificationSequence.ReferencedSegmentNumber"
            )
        segment = int(ident.ReferencedSegmentNumber)
        derivation = _one(item, "DerivationImageSequence") or _one(
            shared, "DerivationImageSequence"
        )
        source = _one(derivation, "SourceImageSequence")
        if source is None or "ReferencedSOPInstanceUID" not in source:
            raise SegError(
                path,
                f"frame {i + 1} names no source image (DerivationImageSequence."
                "SourceImageSequence.ReferencedSOPInstanceUID); a label map is kept per source "
                "image, so SEGs that give only plane positions are not supported",
            )
        numbers = source.get("ReferencedFrameNumber")
        if numbers is not None and not isinstance(numbers, int | str):
            numbers = list(numbers)
            if len(numbers) != 1:
                raise SegError(path, f"frame {i + 1} references source frames {numbers}; one")
            numbers = numbers[0]
        info.append((segment, (str(source.ReferencedSOPInstanceUID), _frame_number(numbers))))
    return info


def _frame_number(value: Any) -> int | None:
    return None if value is None or value == "" else int(value)


def _referenced(ds: Any) -> list[str]:
    return [
        str(inst.ReferencedSOPInstanceUID)
        for series in ds.get("ReferencedSeriesSequence") or []
        for inst in series.get("ReferencedInstanceSequence") or []
        if "ReferencedSOPInstanceUID" in inst
    ]


def read_dicom_seg(
    path: str | os.PathLike,
    threshold: float = 0.5,
    overlap: Literal["error", "higher"] = "error",
) -> DicomSeg:
    """Reads a BINARY or FRACTIONAL DICOM SEG into one label map per source frame.

    Args:
        path: The SEG file.
        threshold: A FRACTIONAL frame marks its segment where value / MaximumFractionalValue
            is at least this.
        overlap: ``"error"`` refuses a pixel two segments claim; ``"higher"`` gives it the
            higher segment number.

    Raises:
        SegError: not a SEG, a SEG type or layout not supported (LABELMAP, no source image
            references, overlapping segments), or pixel data that cannot be decoded; each
            message names the file.
    """
    _pydicom()
    path = str(path)
    if overlap not in ("error", "higher"):
        raise ValueError(f"overlap={overlap!r}; valid: error, higher")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold}; a fraction in (0, 1]")
    try:
        ds = _dcmread(path)
    except Exception as e:
        raise SegError(path, f"not a readable DICOM file: {type(e).__name__}: {e}") from None
    sop = str(ds.get("SOPClassUID", ""))
    if sop == LABEL_MAP_SEGMENTATION_STORAGE:
        raise SegError(
            path,
            "is a Label Map Segmentation (SegmentationType LABELMAP), which is not supported "
            "yet; save it as a BINARY SEG, or as a label image (PNG/TIFF/NIfTI)",
        )
    if sop != SEGMENTATION_STORAGE:
        raise SegError(path, f"is not a DICOM Segmentation (SOP Class UID {sop or 'missing'})")
    kind = str(ds.get("SegmentationType", "")).upper()
    if kind not in ("BINARY", "FRACTIONAL"):
        raise SegError(
            path, f"SegmentationType {kind or 'missing'!r} is not supported: BINARY or FRACTIONAL"
        )
    segments = _segments(ds, path)
    try:
        with _quiet():
            pixels = np.asarray(ds.pixel_array)
    except Exception as e:
        raise SegError(path, f"pixel data cannot be decoded: {type(e).__name__}: {e}") from None
    if pixels.ndim == 2:  # one frame (NumberOfFrames 1 or absent)
        pixels = pixels[None]
    if pixels.ndim != 3:
        raise SegError(path, f"pixel data of shape {list(pixels.shape)}; a SEG is one channel")
    if kind == "BINARY":
        marked = pixels > 0
    else:
        top = float(ds.get("MaximumFractionalValue", 0) or 0)
        if top <= 0:
            raise SegError(path, "is FRACTIONAL without a positive MaximumFractionalValue")
        marked = pixels.astype(np.float64) / top >= threshold
    info = _frame_info(ds, len(pixels), path)
    order: dict[Source, int] = {}
    for _, source in info:
        order.setdefault(source, len(order))
    labels = np.zeros((len(order), *pixels.shape[1:]), np.int64)
    for i, (segment, source) in enumerate(info):
        if segment not in segments:
            raise SegError(
                path,
                f"frame {i + 1} belongs to segment {segment}, which the SegmentSequence does not "
                f"describe (it has {sorted(segments)})",
            )
        target = labels[order[source]]
        on = marked[i]
        clash = on & (target > 0) & (target != segment)
        if clash.any():
            other = int(target[clash][0])
            if overlap == "error":
                uid, number = source
                where = uid if number is None else f"{uid} frame {number}"
                raise SegError(
                    path,
                    f"segments {other} ({segments[other]}) and {segment} ({segments[segment]}) "
                    f"overlap in {int(clash.sum())} pixel(s) of source image {where}; a label "
                    "map holds one class a pixel (overlap='higher' gives it the higher number)",
                )
            on = on & ~(target > segment)  # a higher number already there stays
        target[on] = segment
    return DicomSeg(
        path=Path(path),
        segments=segments,
        sources=list(order),
        labels=labels,
        referenced=_referenced(ds),
        fractional=kind == "FRACTIONAL",
    )


def _source_of(image_path: str | os.PathLike) -> tuple[str, int]:
    """(SOP Instance UID, number of frames) of a DICOM image file."""
    if os.path.isdir(image_path):
        raise SegError(
            image_path,
            "is a DICOM series folder; a SEG mask is paired with one DICOM image file (a slice "
            "or a multi-frame image) for now",
        )
    try:
        ds = _dcmread(
            image_path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "NumberOfFrames"]
        )
        uid = str(ds.SOPInstanceUID)
    except Exception as e:
        raise SegError(
            image_path, f"has no readable SOP Instance UID to find its SEG frames by ({e})"
        ) from None
    return uid, int(ds.get("NumberOfFrames", 1) or 1)


def read_seg_mask(
    path: str | os.PathLike,
    image_path: str | os.PathLike | None = None,
    overlap: Literal["error", "higher"] = "error",
) -> np.ndarray:
    """A SEG's label maps ``[S, H, W]`` int64 for its image: the frames of the DICOM image
    `image_path` (matched by SOP Instance UID), or, without an image, the SEG's one source.

    Raises:
        SegError: what `read_dicom_seg` refuses, an image the SEG does not segment, or no image
            given for a SEG of several sources.
    """
    seg = read_dicom_seg(path, overlap=overlap)
    if image_path is not None:
        uid, frames = _source_of(image_path)
        return seg.for_instance(uid, frames)
    if len(seg.sources) == 1 and seg.sources[0][1] is None:
        return seg.labels.copy()
    raise SegError(
        path,
        f"segments {len(seg.sources)} source frame(s); say which image it is the mask of",
    )


def segment_names(seg: DicomSeg, background: str = "background") -> Sequence[str]:
    """`segment.classes` for a SEG whose segments are numbered 1..n: background, then the
    Segment Labels in number order."""
    numbers = sorted(seg.segments)
    if numbers != list(range(1, len(numbers) + 1)):
        raise SegError(seg.path, f"segment numbers {numbers} are not 1..{len(numbers)}")
    return [background, *(seg.segments[n] for n in numbers)]
