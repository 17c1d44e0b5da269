"""TIFF reader (tifffile; LZW/deflate/JPEG/... through imagecodecs).

Handles 8/16/32-bit integer and float samples, multi-page stacks, tiles, planar configuration,
more than three samples per pixel (select them with ``channels`` in the recipe), palette
images and OME-TIFF (the first series). Everything that is not Y, X or a channel axis
(pages, Z, T, ...) becomes the slice axis S.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from beitdomain.io.base import BaseReader, check_size, is_tiff
from beitdomain.io.errors import MissingCodecError, ReaderError


def _tifffile():
    try:
        import tifffile
    except ImportError:
        raise MissingCodecError(
            "<tiff>", "reading TIFF needs tifffile: pip install tifffile imagecodecs"
        ) from None
    return tifffile


def _to_sfchw(arr: np.ndarray, axes: str) -> np.ndarray:
    """Reorders an array with tifffile axis letters into ``[S, C, H, W]``."""
    axes = axes.upper()
    if len(axes) != arr.ndim or "Y" not in axes or "X" not in axes:
        raise ValueError(f"unexpected axes {axes!r} for shape {arr.shape}")
    chan = [i for i, a in enumerate(axes) if a in "SC"]
    # With both S (samples) and C (channels, OME) keep S as colour and fold C into slices.
    chan = chan[-1:] if chan else []
    y, x = axes.index("Y"), axes.index("X")
    rest = [i for i in range(arr.ndim) if i not in (*chan, y, x)]
    arr = np.transpose(arr, (*rest, *chan, y, x))
    s = int(np.prod([arr.shape[i] for i in range(len(rest))])) if rest else 1
    c = arr.shape[len(rest)] if chan else 1
    return arr.reshape(s, c, arr.shape[-2], arr.shape[-1])


def read_tiff(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Reads the first series of a TIFF into raw ``[S, C, H, W]`` and metadata."""
    tifffile = _tifffile()
    path = str(path)
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise ReaderError(path, "TIFF holds no image series")
            series = tif.series[0]
            check_size(path, int(np.prod(series.shape)))
            page = series.pages[0] if series.pages else tif.pages[0]
            arr = series.asarray()
            axes = series.axes
            photometric = page.photometric.name if page.photometric is not None else None
            bits = int(page.bitspersample)
            colormap = page.colormap
            compression = page.compression.name if page.compression is not None else None
            is_ome = tif.is_ome
    except ReaderError:
        raise
    except Exception as e:
        msg = str(e)
        if "imagecodecs" in msg:
            raise MissingCodecError(
                path, f"TIFF compression needs imagecodecs: pip install imagecodecs ({msg})"
            ) from None
        raise ReaderError(path, f"cannot decode TIFF: {type(e).__name__}: {msg}") from None

    dtype = arr.dtype
    if photometric == "PALETTE" and colormap is not None:
        # colormap: [3, 2**bits] uint16; indices -> RGB samples
        rgb = np.asarray(colormap)[:, arr]  # [3, ...]
        arr = np.moveaxis(rgb, 0, -1)
        axes = axes + "S"
        dtype, bits = arr.dtype, 16
    try:
        arr = _to_sfchw(arr, axes)
    except ValueError as e:
        raise ReaderError(path, f"cannot arrange TIFF axes: {e}") from None
    if arr.dtype.kind == "c":
        raise ReaderError(path, "complex-valued TIFF is not supported; save magnitude instead")
    meta: dict[str, Any] = {
        "reader": "tiff",
        "format": "tiff",
        "photometric": photometric,
        "compression": compression,
        "ome": bool(is_ome),
        "axes": axes,
        "dtype": str(np.dtype(dtype).newbyteorder("=")),
        "bits_stored": bits if np.dtype(dtype).kind in "ui" else None,
        "signed": np.dtype(dtype).kind == "i",
        "window": None,
        "invert": photometric == "MINISWHITE",
        "frames": int(arr.shape[0]),
        "shape": list(arr.shape),
    }
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr, meta


class TiffReader(BaseReader):
    """TIFF and BigTIFF, by the II*/MM* signature."""

    name = "tiff"
    description = "TIFF/BigTIFF/OME-TIFF (tifffile + imagecodecs)"
    requires = (("tifffile", "tifffile"), ("imagecodecs", "imagecodecs"))

    def can_read(self, path: str, head: bytes) -> bool:
        return is_tiff(head)

    def read(self, path: str) -> tuple[np.ndarray, dict[str, Any]]:
        return read_tiff(path)
