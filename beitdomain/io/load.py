"""``load_image``: find the reader by content, decode, normalize. The one entry point."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from beitdomain.io.base import as_sfchw, read_head
from beitdomain.io.dicom import DicomReader, read_dicom_series
from beitdomain.io.errors import ReaderError
from beitdomain.io.intensity import IntensitySpec, normalize
from beitdomain.io.registry import ReaderRegistry
from beitdomain.io.rgb import PillowReader
from beitdomain.io.tiff import TiffReader

READERS = ReaderRegistry()
for _reader in (DicomReader, TiffReader, PillowReader):
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
    """Applies the frame policy to ``[S, C, H, W]``: 'all', 'middle' or 'first'."""
    if policy == "middle":
        return raw[raw.shape[0] // 2][None]
    if policy == "first":
        return raw[:1]
    return raw


def load_image(
    path: str | os.PathLike, spec: IntensitySpec | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Reads a file and returns what the model sees.

    Args:
        path: An image file (format detected by content) or a folder with one DICOM series.
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
    raw = select_frames(raw, spec.frames)
    image, info = normalize(raw, meta, spec, str(path))
    meta["normalization"] = info
    meta["in_chans"] = int(image.shape[1])
    if image.shape[0] == 1:
        image = image[0]
    return image, meta
