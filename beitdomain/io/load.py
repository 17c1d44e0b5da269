"""``load_image``: find the reader by content, decode, normalize. The one entry point."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from beitdomain.io.base import as_sfchw, read_head
from beitdomain.io.dicom import DicomReader, read_dicom_series
from beitdomain.io.errors import ReaderError
from beitdomain.io.intensity import IntensitySpec, frame_indices, normalize
from beitdomain.io.registry import ReaderRegistry
from beitdomain.io.rgb import PillowReader
from beitdomain.io.tiff import TiffReader
from beitdomain.io.volume import (
    VOLUME_READERS,
    MetaImageReader,
    NiftiReader,
    NrrdVolumeReader,
    reslice,
    resliced_meta,
    slices_along,
)

READERS = ReaderRegistry()
for _reader in (
    DicomReader,
    TiffReader,
    PillowReader,
    NiftiReader,
    NrrdVolumeReader,
    MetaImageReader,
):
    READERS.register(_reader)

# Suffixes we know; only used to make "unrecognized file" messages more helpful.
_SUFFIX_HINT = {
    ".dcm": "DICOM",
    ".dicom": "DICOM",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".bmp": "BMP",
    ".nii": "NIfTI",
    ".gz": "gzipped NIfTI",
    ".nrrd": "NRRD",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
}


def find_reader(path: str | os.PathLike, registry: ReaderRegistry | None = None) -> Any:
    """The reader that understands ``path`` by its content; ReaderError if none does."""
    registry = registry or READERS
    head = read_head(path)
    if not head:
        raise ReaderError(path, "file is empty (0 bytes); re-export or remove it")
    reader = registry.find(str(path), head)
    if reader is None:
        hint = _SUFFIX_HINT.get(Path(path).suffix.lower())
        problem = (
            f"has a {Path(path).suffix} suffix but does not start like a {hint} file"
            if hint
            else "is not a recognized image format"
        )
        names = ", ".join(r.name for r in registry.readers())
        raise ReaderError(
            path,
            f"{problem} (first bytes {head[:8]!r}; readers tried: {names}; "
            "a plugin in entry-point group 'beitdomain.readers' can add formats)",
        )
    return reader


def read_raw(
    path: str | os.PathLike, registry: ReaderRegistry | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decodes a file (or a folder holding one DICOM series) into raw ``[S, C, H, W]`` + meta.

    Raises:
        ReaderError: for anything that goes wrong, naming the file.
    """
    path = str(path)
    if os.path.isdir(path):
        return read_dicom_series(path)
    reader = find_reader(path, registry)
    try:
        raw, meta = reader.read(path)
    except ReaderError as e:
        if e.path.startswith("<"):  # raised before the reader knew the path (missing package)
            raise type(e)(path, e.reason) from None
        raise
    except MemoryError:
        raise ReaderError(
            path, "out of memory while decoding; is the image unusually large?"
        ) from None
    except Exception as e:  # plugin readers may raise anything; keep the documented type
        raise ReaderError(path, f"{reader.name} reader failed: {type(e).__name__}: {e}") from e
    raw = as_sfchw(raw, path)
    meta = dict(meta)
    meta.setdefault("reader", reader.name)
    meta.setdefault("dtype", str(raw.dtype))
    meta.setdefault("frames", int(raw.shape[0]))
    meta.setdefault("shape", list(raw.shape))
    return raw, meta


def select_frames(raw: np.ndarray, policy: str) -> np.ndarray:
    """Applies the frame policy to ``[S, C, H, W]`` (see ``intensity.parse_frames``)."""
    if policy == "all":
        return raw
    return raw[frame_indices(raw.shape[0], policy)]


def select_slices(
    raw: np.ndarray, meta: dict[str, Any], spec: IntensitySpec
) -> tuple[np.ndarray, dict[str, Any]]:
    """Volumes: slices along ``spec.slice_axis``; then the frame policy for every file.

    Returns:
        The kept ``[S', C, H, W]`` and meta with the spacing of the chosen axis.
    """
    if meta.get("volume") and spec.slice_axis != "axial":
        raw = reslice(raw, spec.slice_axis)
        meta = resliced_meta(meta, spec.slice_axis)
    return select_frames(raw, spec.frames), meta


def prepare(
    raw: np.ndarray, meta: dict[str, Any], spec: IntensitySpec, path: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """Raw reader output -> the normalized frames ``spec`` keeps, ``[S', C', H, W]``, and meta.

    A volume is normalized as a whole before slices are picked, so a slice gets the same
    values whichever slices are kept (percentiles of the scan, not of the selection).
    """
    kept = frame_indices(
        slices_along(raw.shape, spec.slice_axis) if meta.get("volume") else raw.shape[0],
        spec.frames,
    )
    if len(kept) == 0:
        raise ReaderError(path, f"frames={spec.frames!r} keeps none of its {raw.shape[0]} frames")
    if meta.get("volume"):
        whole, meta = select_slices(raw, meta, dataclasses.replace(spec, frames="all"))
        image, info = normalize(whole, meta, spec, path)
        image = image[kept]
    else:
        if spec.frames != "all":
            meta = dict(meta)
            for key in ("window_frames", "rescale_frames"):  # per-frame lists follow the frames
                if isinstance(meta.get(key), list) and len(meta[key]) == raw.shape[0]:
                    meta[key] = [meta[key][i] for i in kept]
        image, info = normalize(select_frames(raw, spec.frames), meta, spec, path)
    meta = dict(meta)
    meta["normalization"] = info
    meta["in_chans"] = int(image.shape[1])
    return image, meta


def kept_frames(shape: list[int] | tuple[int, ...], reader: str, spec: IntensitySpec) -> np.ndarray:
    """Which frames (slices) of a file with raw ``shape`` [S, C, H, W] ``spec`` keeps.

    The manifest records the raw shape and the reader, so datasets and the cache know how many
    items a file gives without decoding it again.
    """
    n = int(shape[0])
    if reader in VOLUME_READERS:
        n = slices_along(shape, spec.slice_axis)
    return frame_indices(n, spec.frames)


def load_image(
    path: str | os.PathLike, spec: IntensitySpec | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Reads a file and returns what the model sees.

    Args:
        path: An image file (format detected by content: DICOM, TIFF, PNG/JPEG/BMP, NIfTI,
            NRRD, MetaImage, plugins) or a folder with one DICOM series.
        spec: Normalization and channel policy; defaults to ``IntensitySpec()``.

    Returns:
        ``(image, meta)``: float32 ``[C, H, W]`` (or ``[S, C, H, W]`` when the file holds
        several frames and ``spec.frames == 'all'``) in [0, 1], and JSON-serializable metadata
        without patient-identifying fields.

    Raises:
        ReaderError: names the file, the problem and what would help.
    """
    spec = spec or IntensitySpec()
    raw, meta = read_raw(path)
    image, meta = prepare(raw, meta, spec, str(path))
    if image.shape[0] == 1:
        image = image[0]
    return image, meta
