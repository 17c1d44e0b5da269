"""Volumes (NIfTI, NRRD, MetaImage) through MONAI's image readers, as a stack of slices.

Most public CT/MR data sets come as one 3D (or 4D) file per scan. The reader:

* decodes with MONAI's ``NibabelReader`` (``.nii``, ``.nii.gz``), ``NrrdReader`` (``.nrrd``,
  pynrrd) or ``ITKReader`` (``.mha``, ``.mhd``; also NRRD when pynrrd is missing). MONAI is
  imported here only, on the first volume read, so the cached training path and the 2D readers
  never pay its import (seconds per process);
* turns the voxel grid into the canonical RAS+ orientation (nibabel's ``io_orientation`` on the
  affine MONAI reports, which is RAS for all three readers), so slices of every file face the
  same way whatever order the scanner wrote them in;
* returns axial slices ``[Z, C, H, W]`` in radiological display order (anterior at the top,
  the patient's right on the image's left); ``reslice`` turns them into coronal or sagittal
  slices (``data.slice_axis``) without reading the file again;
* keeps intensities physical: NIfTI ``scl_slope``/``scl_inter`` are applied (HU for CT), so the
  CT window presets apply; the stored dtype and the rescale go into ``meta`` for ``dtype`` mode;
* records the voxel spacing (mm, RAS order) and the in-plane spacing of the chosen axis.

A 4D file (fMRI, multi-echo, vector fields) keeps its fourth axis as channels: pick them with
``data.channels`` (or ``--channels``), like the bands of a multispectral TIFF.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
import zlib
from typing import Any

import numpy as np

from beitdomain.io.base import BaseReader, check_size
from beitdomain.io.errors import MissingCodecError, ReaderError

SLICE_AXES = ("axial", "coronal", "sagittal")
INSTALL_HINT = "pip install 'beitdomain[volumes]' (monai, nibabel, pynrrd, itk-io)"
# Reader names of the formats read here: a manifest entry from one of them is a volume whose
# raw shape ``[Z, C, Y, X]`` gives the slice count along every axis.
VOLUME_READERS = frozenset({"nifti", "nrrd", "metaimage"})


# --------------------------------------------------------------------------------------------
# Content sniffing
# --------------------------------------------------------------------------------------------


def _gunzip_head(head: bytes) -> bytes:
    """The first decompressed bytes of a (possibly truncated) gzip stream; b'' if not gzip."""
    if not head.startswith(b"\x1f\x8b"):
        return b""
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 600)
    except zlib.error:
        return b""


def is_nifti(head: bytes) -> bool:
    """NIfTI-1 (``n+1``/``ni1`` at byte 344) or NIfTI-2 (``n+2`` at byte 4), plain or gzipped."""
    data = _gunzip_head(head) or head
    if len(data) >= 348 and data[344:347] in (b"n+1", b"ni1"):
        return int.from_bytes(data[:4], "little") == 348 or int.from_bytes(data[:4], "big") == 348
    return len(data) >= 8 and data[4:7] in (b"n+2", b"ni2")


def is_nrrd(head: bytes) -> bool:
    """NRRD: the magic ``NRRD000`` plus a version digit."""
    return head.startswith(b"NRRD000")


_META_KEYS = (b"ObjectType", b"NDims", b"Comment", b"ObjectSubType", b"TransformType")


def is_metaimage(head: bytes) -> bool:
    """MetaImage (``.mha``/``.mhd``): a text header of ``Key = value`` lines with ``NDims``."""
    first = head.lstrip().split(b"\n", 1)[0]
    return first.split(b"=", 1)[0].strip() in _META_KEYS and b"NDims" in head


def volume_format(head: bytes) -> str | None:
    """'nifti', 'nrrd', 'metaimage' or None, judged by content."""
    if is_nrrd(head):
        return "nrrd"
    if is_metaimage(head):
        return "metaimage"
    if is_nifti(head):
        return "nifti"
    return None


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _monai_reader(fmt: str, path: str) -> Any:
    """The MONAI reader for a format; MissingCodecError naming the packages when absent."""
    import importlib.util

    need = {"nifti": ["monai", "nibabel"], "nrrd": ["monai", "nibabel"]}.get(
        fmt, ["monai", "nibabel", "itk"]
    )
    if fmt == "nrrd" and importlib.util.find_spec("nrrd") is None:
        need.append("itk")  # MONAI's ITKReader reads NRRD too
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingCodecError(
            path, f"reading {fmt} volumes needs {', '.join(missing)}: {INSTALL_HINT}"
        )
    # MONAI logs optional-codec notices (nvImageCodec) on import; they are not the user's news.
    logging.getLogger("monai").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from monai.data import ITKReader, NibabelReader, NrrdReader

    if fmt == "nifti":
        return NibabelReader()
    if fmt == "nrrd" and importlib.util.find_spec("nrrd") is not None:
        return NrrdReader(dtype=None)  # keep the stored type (MONAI's default is float32)
    return ITKReader()


def _stored_type_and_rescale(img: Any, data: np.ndarray) -> tuple[str, list[float]]:
    """The file's stored dtype and the (slope, intercept) the reader applied (NIfTI only)."""
    with contextlib.suppress(AttributeError, TypeError):
        slope, inter = img.dataobj.slope, img.dataobj.inter  # nibabel's scaled array proxy
        stored = np.dtype(img.get_data_dtype())
        slope = 1.0 if slope is None or not np.isfinite(slope) else float(slope)
        inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
        return str(stored.newbyteorder("=")), [slope, inter]
    return str(data.dtype.newbyteorder("=")), [1.0, 0.0]


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorders/flips the three spatial axes of ``[X, Y, Z, ...]`` to RAS+.

    Returns:
        ``(array, spacing)``: the reoriented array and the voxel size (mm) along R, A, S.
    """
    from nibabel.orientations import apply_orientation, io_orientation

    ornt = io_orientation(affine)  # for each array axis: which RAS axis, and its direction
    out = apply_orientation(data, ornt)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))  # voxel size per array axis
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = zooms
    return out, spacing


def read_volume(path: str | os.PathLike, fmt: str | None = None) -> tuple[np.ndarray, dict]:
    """Reads a volume into axial slices ``[Z, C, H, W]`` (RAS+, radiological view) and meta.

    Args:
        path: A ``.nii``/``.nii.gz``, ``.nrrd`` or ``.mha``/``.mhd`` file (judged by content).
        fmt: 'nifti', 'nrrd' or 'metaimage'; None detects it.

    Raises:
        ReaderError: an unreadable file or an unsupported number of dimensions, naming the file.
        MissingCodecError: MONAI, nibabel, pynrrd or ITK not installed.
    """
    path = str(path)
    if fmt is None:
        from beitdomain.io.base import read_head

        fmt = volume_format(read_head(path, 1024))
        if fmt is None:
            raise ReaderError(path, "not a NIfTI, NRRD or MetaImage file")
    reader = _monai_reader(fmt, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = reader.read(path)
            _check_header_size(img, path)
            data, info = reader.get_data(img)
    except ReaderError:
        raise
    except MemoryError:
        raise ReaderError(path, "out of memory while decoding the volume") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ReaderError(
            path, f"cannot read the {fmt} volume: {type(e).__name__}: {first}"
        ) from None
    stored, rescale = _stored_type_and_rescale(img, data)
    data = np.asarray(data)
    data = data.astype(data.dtype.newbyteorder("="), copy=False)
    # [X, Y, Z] | [X, Y] | [X, Y, Z, C] | NIfTI's [X, Y, Z, 1, C] (vector intent)
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise ReaderError(
            path, f"{data.ndim}-D volume of shape {list(data.shape)}; expected 2, 3 or 4 axes"
        )
    ras, spacing = to_ras(data, np.asarray(info["affine"], dtype=np.float64))
    # [X, Y, Z, C] -> axial [Z, C, Y, X], then flip Y (anterior at the top) and X (radiological).
    axial = np.ascontiguousarray(ras.transpose(2, 3, 1, 0)[:, :, ::-1, ::-1])
    meta: dict[str, Any] = {
        "reader": fmt,
        "format": fmt,
        "volume": True,
        "orientation": "RAS",
        "slice_axis": "axial",
        "spacing": [float(s) for s in spacing],  # mm along R, A, S
        "pixel_spacing": [float(spacing[1]), float(spacing[0])],  # rows, columns (axial)
        "slice_spacing": float(spacing[2]),
        "dtype": stored,
        "signed": np.dtype(stored).kind == "i",
        "rescale": rescale,
        "window": None,
        "invert": False,
        "frames": int(axial.shape[0]),
        "shape": list(axial.shape),
    }
    return axial, meta


def _check_header_size(img: Any, path: str) -> None:
    """Refuses huge volumes from the header, before the voxels are decoded."""
    shape = getattr(img, "shape", None)
    if shape is None and hasattr(img, "GetLargestPossibleRegion"):  # ITK image
        shape = tuple(img.GetLargestPossibleRegion().GetSize())
    if shape is not None:
        check_size(path, int(np.prod([int(s) for s in shape], dtype=np.int64)))


def reslice(axial: np.ndarray, axis: str) -> np.ndarray:
    """Axial slices ``[Z, C, Y', X']`` (from ``read_volume``) as slices along ``axis``.

    coronal: ``[Y, C, Z', X']`` (superior at the top); sagittal: ``[X, C, Z', Y']`` (superior at
    the top, anterior on the left). Primes mark flipped axes. A view, not a copy.
    """
    if axis == "axial":
        return axial
    if axis == "coronal":
        return axial.transpose(2, 1, 0, 3)[::-1, :, ::-1, :]
    if axis == "sagittal":
        return axial.transpose(3, 1, 0, 2)[::-1, :, ::-1, :]
    raise ValueError(f"slice_axis={axis!r}; valid: {', '.join(SLICE_AXES)}")


def resliced_meta(meta: dict[str, Any], axis: str) -> dict[str, Any]:
    """``meta`` with the in-plane and slice spacing of ``axis``."""
    out = dict(meta)
    sx, sy, sz = meta.get("spacing") or (1.0, 1.0, 1.0)
    rows_cols_slice = {
        "axial": ([sy, sx], sz),
        "coronal": ([sz, sx], sy),
        "sagittal": ([sz, sy], sx),
    }
    out["pixel_spacing"], out["slice_spacing"] = rows_cols_slice[axis]
    out["slice_axis"] = axis
    return out


def slices_along(shape: list[int] | tuple[int, ...], axis: str) -> int:
    """How many slices a volume of raw (axial) shape ``[Z, C, Y, X]`` has along ``axis``."""
    z, _, y, x = shape
    return {"axial": z, "coronal": y, "sagittal": x}[axis]


class VolumeReader(BaseReader):
    """NIfTI, NRRD and MetaImage volumes through MONAI's readers (one class per format name)."""

    requires = (("monai", "monai"), ("nibabel", "nibabel"))
    fmt = ""

    def can_read(self, path: str, head: bytes) -> bool:
        return volume_format(head) == self.fmt

    def read(self, path: str) -> tuple[np.ndarray, dict[str, Any]]:
        return read_volume(path, self.fmt)


class NiftiReader(VolumeReader):
    name = "nifti"
    fmt = "nifti"
    description = "NIfTI-1/2 volumes (.nii, .nii.gz) via MONAI's NibabelReader; slices in RAS"


class NrrdVolumeReader(VolumeReader):
    name = "nrrd"
    fmt = "nrrd"
    description = "NRRD volumes via MONAI's NrrdReader (pynrrd); slices in RAS"
    requires = (*VolumeReader.requires, ("nrrd", "pynrrd"))


class MetaImageReader(VolumeReader):
    name = "metaimage"
    fmt = "metaimage"
    description = "MetaImage volumes (.mha, .mhd) via MONAI's ITKReader; slices in RAS"
    requires = (*VolumeReader.requires, ("itk", "itk-io"))
