"""PNG / JPEG / BMP reader (Pillow).

16-bit PNGs keep their 16 bits, EXIF orientation is applied, palette images become RGB,
alpha channels are dropped (LA -> L, RGBA -> RGB): alpha rarely carries image content,
and compositing onto a made-up background would invent pixels.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

from beitdomain.io import base
from beitdomain.io.base import BaseReader, is_pillow_image
from beitdomain.io.errors import MissingCodecError, ReaderError


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise MissingCodecError(
            "<image>", "reading PNG/JPEG/BMP needs Pillow: pip install pillow"
        ) from None
    return Image, ImageOps


def read_pillow(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Reads an image with Pillow into raw ``[1, C, H, W]`` and metadata."""
    Image, ImageOps = _pil()
    path = str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                base.check_size(path, im.width * im.height)
                fmt = im.format
                mode_in = im.mode
                im.load()
                im = ImageOps.exif_transpose(im)
                mode = im.mode
                if mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                elif mode == "PA":
                    im = im.convert("RGBA")
                elif mode == "1":
                    im = im.convert("L")
                elif mode == "CMYK" or mode == "YCbCr":
                    im = im.convert("RGB")
                mode = im.mode
                arr = np.asarray(im)
    except ReaderError:
        raise
    except Exception as e:
        raise ReaderError(path, f"cannot decode image: {type(e).__name__}: {e}") from None

    # 16-bit PNGs arrive as mode I;16 (uint16) or I (int32 holding 16-bit values).
    bits = None
    if mode.startswith("I;16"):
        arr = arr.astype(np.uint16)
        bits = 16
    elif mode == "I":
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            arr = arr.astype(np.uint16)
            bits = 16
    elif arr.dtype == np.uint8:
        bits = 8
    if arr.ndim == 2:
        arr = arr[None]  # [1, H, W]
    else:
        if arr.shape[-1] in (2, 4):  # drop alpha: LA -> L, RGBA -> RGB
            arr = arr[..., :-1]
        arr = np.moveaxis(arr, -1, 0)  # [C, H, W]
    arr = np.ascontiguousarray(arr)[None]  # [1, C, H, W]
    meta: dict[str, Any] = {
        "reader": "pillow",
        "format": (fmt or "image").lower(),
        "photometric": "RGB" if arr.shape[1] == 3 else "MONOCHROME2",
        "mode": mode_in,
        "dtype": str(arr.dtype),
        "bits_stored": bits,
        "signed": False,
        "window": None,
        "invert": False,
        "frames": 1,
        "shape": list(arr.shape),
    }
    return arr, meta


class PillowReader(BaseReader):
    """PNG, JPEG, BMP (and GIF/WebP first frame), by signature."""

    name = "pillow"
    description = "PNG (16-bit kept), JPEG, BMP via Pillow; EXIF orientation applied"
    requires = (("PIL", "pillow"),)

    def can_read(self, path: str, head: bytes) -> bool:
        return is_pillow_image(head)

    def read(self, path: str) -> tuple[np.ndarray, dict[str, Any]]:
        return read_pillow(path)
