"""Mask files: read a label map, check it against its image and the recipe's classes, and pair
images with their masks (a labels CSV's `mask` column, or a folder mirroring the data root).

A mask is a label map the readers understand (PNG or TIFF, a NIfTI label volume sliced like its
image volume, a DICOM SEG beside its DICOM image): pixel value i is `segment.classes[i]`, and
`segment.ignore_index` (when set) marks pixels no one annotated. A mask whose size differs from
its image's, or that holds values outside the classes, is a `MaskError` naming both files.
The datasets, splits and caches built from the pairs live in `data.masks`; the cache stores
pairs checked here.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from beitdomain.io import (
    IntensitySpec,
    ReaderError,
    prepare,
    read_raw,
    select_frames,
    select_slices,
)
from beitdomain.io.dicom_seg import is_dicom_seg, read_seg_mask
from beitdomain.user import MissingPathError, UserError

__all__ = [
    "MASK_SUFFIXES",
    "MaskClasses",
    "MaskError",
    "MaskPair",
    "load_pair",
    "load_pairs",
    "pairs_from_csv",
    "pairs_from_folder",
    "read_mask",
]

# Suffixes a mask in a mirrored folder may have (a JPEG image's mask is usually a PNG).
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".nii.gz", ".nii", ".nrrd", ".mha", ".bmp", ".dcm")


class MaskError(UserError):
    """A mask that cannot serve as its image's label; the message names both files."""


@dataclass(frozen=True)
class MaskClasses:
    """What a mask's values mean: value i is `names[i]`; `ignore_index` is left out of loss and
    metrics."""

    names: tuple[str, ...]
    ignore_index: int | None = None

    def __post_init__(self) -> None:
        if len(self.names) < 2:
            raise UserError(
                f"segment.classes {list(self.names)}: need at least 2 (e.g. [background, lesion])"
            )
        if len(set(self.names)) != len(self.names):
            raise UserError(f"segment.classes {list(self.names)} names a class twice")
        if self.ignore_index is not None and 0 <= self.ignore_index < len(self.names):
            raise UserError(
                f"segment.ignore_index={self.ignore_index} is the value of class "
                f"'{self.names[self.ignore_index]}'; use a value of no class (e.g. 255)"
            )

    @classmethod
    def from_config(cls, segment: Any) -> MaskClasses:
        """From the recipe's `segment` section."""
        return cls(tuple(segment.classes), segment.ignore_index)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def outside(self, mask: np.ndarray) -> list[int]:
        """The first few values of `mask` that are neither a class nor the ignore index."""
        bad = (mask < 0) | (mask >= self.num_classes)
        if self.ignore_index is not None:
            bad &= mask != self.ignore_index
        return np.unique(mask[bad])[:5].tolist() if bad.any() else []

    @property
    def allowed(self) -> str:
        """The values a mask may hold, for messages: ``0..1 (background, lesion)``."""
        allowed = f"0..{self.num_classes - 1} ({', '.join(self.names)})"
        if self.ignore_index is not None:
            allowed += f" or the ignore index {self.ignore_index}"
        return allowed

    def check(self, mask: np.ndarray, mask_path: str | Path, image_path: str | Path) -> None:
        """Refuses values that are neither a class nor the ignore index."""
        bad = self.outside(mask)
        if bad:
            raise MaskError(
                f"mask {mask_path} (of image {image_path}) holds values {bad} outside the "
                f"classes {self.allowed}; set segment.classes (and segment.ignore_index) to match"
            )


@dataclass(frozen=True)
class MaskPair:
    """An image file and its mask file, with the split and group the labels CSV gave them."""

    image: Path
    mask: Path
    split: str | None = None
    group: str | None = None


def read_mask(
    path: str | os.PathLike, spec: IntensitySpec | None = None, image_path: Any = None
) -> np.ndarray:
    """A label map as int64 ``[S, H, W]``: one channel, integer values, no normalization.

    Volumes are sliced like their image (``spec.slice_axis``, ``spec.frames``), so slice k of
    the mask lies on slice k of the image. A DICOM Segmentation object (SEG) gives the label
    map of its image's frames, found by the image's SOP Instance UID (`io.dicom_seg`): segment
    number k is class k.

    Raises:
        ReaderError: the file cannot be read.
        MaskError: several channels (an RGB colour mask) or values that are not integers.
    """
    spec = spec or IntensitySpec()
    of = f" (of image {image_path})" if image_path is not None else ""
    if is_dicom_seg(path):
        try:
            labels = read_seg_mask(path, image_path)  # [S, H, W] int64, S = the image's frames
        except ReaderError as e:
            if image_path is None:
                raise
            raise MaskError(f"mask {path}{of} cannot be read: {e}") from None
        return select_frames(labels[:, None], spec.frames)[:, 0]
    try:
        raw, meta = read_raw(path)
    except ReaderError as e:
        if image_path is None:
            raise
        raise MaskError(f"mask {path}{of} cannot be read: {e}") from None
    raw, _ = select_slices(raw, meta, spec)
    if raw.shape[1] != 1:
        raise MaskError(
            f"mask {path}{of} has {raw.shape[1]} channels; a mask is a one-channel label map "
            "(pixel value = class index): save it as a grayscale PNG/TIFF of class indices"
        )
    mask = raw[:, 0]
    if mask.dtype.kind == "f" and not np.array_equal(mask, np.round(mask)):  # NaN fails too
        raise MaskError(
            f"mask {path}{of} holds values that are not whole numbers; a mask holds class "
            "indices (was it resampled with interpolation instead of nearest neighbour?)"
        )
    return mask.astype(np.int64)


def load_pair(
    pair: MaskPair, spec: IntensitySpec, classes: MaskClasses
) -> tuple[np.ndarray, np.ndarray]:
    """The normalized image ``[S, C, H, W]`` (float32 in [0, 1]) and its mask ``[S, H, W]``.

    Raises:
        MaskError: either file cannot be read, size or slice count differ, or values lie
            outside the classes (each names both files).
    """
    try:
        raw, meta = read_raw(pair.image)
        image, _ = prepare(raw, meta, spec, str(pair.image))
    except ReaderError as e:
        raise MaskError(f"image {pair.image} (of mask {pair.mask}) cannot be read: {e}") from None
    mask = read_mask(pair.mask, spec, pair.image)
    if mask.shape != (image.shape[0], *image.shape[2:]):
        what = "slices x height x width" if image.shape[0] > 1 or mask.shape[0] > 1 else "size"
        raise MaskError(
            f"mask {pair.mask} is {' x '.join(map(str, mask.shape))} but its image {pair.image} "
            f"is {' x '.join(map(str, (image.shape[0], *image.shape[2:])))} ({what}); a mask "
            "must have its image's grid"
        )
    classes.check(mask, pair.mask, pair.image)
    return image, mask


def load_pairs(
    pairs: Sequence[MaskPair], spec: IntensitySpec, classes: MaskClasses
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every pair's slices as ``(image [C, H, W], mask [H, W])``, all checked before any
    training starts (the first bad pair raises)."""
    items: list[tuple[np.ndarray, np.ndarray]] = []
    for pair in pairs:
        image, mask = load_pair(pair, spec, classes)
        items.extend(zip(image, mask))
    return items


def pairs_from_csv(
    csv_path: str | os.PathLike, root: str | os.PathLike, allow_outside_root: bool = False
) -> list[MaskPair]:
    """Pairs from a labels CSV with a header naming ``path`` and ``mask`` (and optionally
    ``split``, ``group``); both paths relative to ``root``.

    Raises:
        MissingPathError: the CSV, or a file it lists, does not exist.
        MaskError: no ``mask`` column, an empty cell, or a path outside the root.
    """
    csv_path, root = Path(csv_path), Path(root)
    if not csv_path.is_file():
        raise MissingPathError(f"labels CSV {csv_path} not found (data.labels)")
    root_resolved = root.resolve()
    pairs: list[MaskPair] = []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in reader.fieldnames or []]
        if "path" not in fields or "mask" not in fields:
            raise MaskError(
                f"{csv_path}: a segmentation labels CSV needs a header with 'path' and 'mask' "
                f"columns (got {reader.fieldnames}); or set segment.masks to a mirrored folder"
            )
        reader.fieldnames = fields
        for lineno, row in enumerate(reader, start=2):
            cells = {k: (v or "").strip() for k, v in row.items() if k is not None}
            if not any(cells.values()) or cells["path"].startswith("#"):
                continue
            if not cells["path"] or not cells["mask"]:
                raise MaskError(f"{csv_path} line {lineno}: 'path' and 'mask' must both be set")
            files = []
            for column in ("path", "mask"):
                resolved = (root / cells[column]).resolve()
                if not allow_outside_root and not resolved.is_relative_to(root_resolved):
                    raise MaskError(
                        f"{csv_path} line {lineno}: {column} {cells[column]!r} resolves outside "
                        f"the data root {root} (or set data.allow_outside_root=true)"
                    )
                if not resolved.exists():
                    raise MissingPathError(
                        f"{csv_path} line {lineno}: {column} {cells[column]!r} does not exist "
                        f"under {root}"
                    )
                files.append(resolved)
            pairs.append(
                MaskPair(files[0], files[1], cells.get("split") or None, cells.get("group") or None)
            )
    if not pairs:
        raise MaskError(f"{csv_path}: no image,mask rows")
    return pairs


def _stem(name: str) -> str:
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem


def pairs_from_folder(
    images: Sequence[str | os.PathLike], root: str | os.PathLike, masks: str | os.PathLike
) -> list[MaskPair]:
    """Pairs each image under ``root`` with the mask at the same relative path under ``masks``
    (the same name, or the same stem with a mask suffix: ``a/x.jpg`` -> ``a/x.png``).

    Raises:
        MissingPathError: the mask folder does not exist.
        MaskError: images without a mask (the first few named), or two candidate masks.
    """
    root, masks = Path(root), Path(masks)
    if not masks.is_dir():
        raise MissingPathError(f"segment.masks: mask folder {masks} not found")
    pairs: list[MaskPair] = []
    unpaired: list[str] = []
    for image in images:
        rel = Path(image).resolve().relative_to(root.resolve())
        same = masks / rel
        if same.is_file():
            pairs.append(MaskPair(Path(image), same))
            continue
        stem = _stem(rel.name)
        found = [masks / rel.parent / f"{stem}{s}" for s in MASK_SUFFIXES]
        found = [p for p in found if p.is_file()]
        if len(found) > 1:
            raise MaskError(
                f"image {image}: two masks could be its own ({found[0]}, {found[1]}); keep one"
            )
        if not found:
            unpaired.append(str(rel))
            continue
        pairs.append(MaskPair(Path(image), found[0]))
    if unpaired:
        more = f" and {len(unpaired) - 3} more" if len(unpaired) > 3 else ""
        shown = ", ".join(unpaired[:3]) + more
        raise MaskError(
            f"{len(unpaired)} image(s) under {root} have no mask under {masks}: {shown} "
            f"(a mask has the image's relative path, or its stem with {', '.join(MASK_SUFFIXES)})"
        )
    return pairs


# --------------------------------------------------------------------------------------------
# Recipe -> segmentation datasets: pairs, split by image file, the label subset
# --------------------------------------------------------------------------------------------
