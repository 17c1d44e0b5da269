"""The reader contract and content sniffing.

A reader turns one file into ``(raw, meta)``:

* ``raw``: ``[S, C, H, W]`` (frames/slices/pages, channels, height, width) in the file's own
  physical units and any real dtype. Readers from plugins may also return ``[H, W]`` or
  ``[C, H, W]``; ``as_sfchw`` adds the missing axes.
* ``meta``: a small JSON-serializable dict. Keys the normalizer understands: ``format``,
  ``dtype`` (stored dtype), ``bits_stored``, ``signed``, ``rescale`` (slope, intercept),
  ``window`` (center, width from the file), ``invert`` (MONOCHROME1 / min-is-white).

Normalization to [0, 1] is a separate step (``beitdomain.io.intensity``), so every reader
gets windowing, percentiles and the channel policy for free.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

import numpy as np

from beitdomain.io.errors import ReaderError

# Bytes read from the start of a file for format detection; covers DICOM's 128-byte preamble.
HEAD_BYTES = 512

# Refuse images whose pixel count (all frames) exceeds this before decoding them, so a
# malformed or hostile header cannot make a worker allocate tens of GB (decompression bomb).
# Raise it for trusted whole-slide images: ``beitdomain.io.base.MAX_PIXELS = 2**32``.
MAX_PIXELS = 2**28


@runtime_checkable
class Reader(Protocol):
    """What a reader provides. Subclassing is optional; duck typing is enough for plugins."""

    name: str
    description: str

    def can_read(self, path: str, head: bytes) -> bool:
        """Whether this reader understands the file; judge by ``head`` (the first bytes)."""
        ...

    def read(self, path: str) -> tuple[np.ndarray, dict[str, Any]]:
        """Decodes the file into raw ``[S, C, H, W]`` values and metadata."""
        ...


class BaseReader:
    """Convenience base for built-in readers: name, description, priority, requirements."""

    name: str = ""
    description: str = ""
    # Higher priority readers are asked first; built-ins use 0.
    priority: int = 0
    # Import names of optional packages this reader needs, with the pip name to suggest.
    requires: tuple[tuple[str, str], ...] = ()

    def can_read(self, path: str, head: bytes) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, path: str) -> tuple[np.ndarray, dict[str, Any]]:  # pragma: no cover
        raise NotImplementedError

    def missing(self) -> list[str]:
        """pip names of required packages that are not importable."""
        import importlib.util

        return [pip for mod, pip in self.requires if importlib.util.find_spec(mod) is None]


def read_head(path: str | os.PathLike, n: int = HEAD_BYTES) -> bytes:
    """Reads the first ``n`` bytes, turning OS errors into ReaderError."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except IsADirectoryError:
        raise ReaderError(path, "is a folder, not a file") from None
    except FileNotFoundError:
        raise ReaderError(path, "file not found") from None
    except OSError as e:
        raise ReaderError(path, f"cannot open: {e.strerror or e}") from None


def is_dicom(head: bytes) -> bool:
    """DICOM Part 10 file (``DICM`` at byte 128) or a plausible preamble-less dataset."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    # Raw dataset without preamble: first tag in group 0002/0008, little or big endian, with
    # an explicit VR of two upper-case letters or an implicit-VR 4-byte length.
    group_le = int.from_bytes(head[0:2], "little")
    group_be = int.from_bytes(head[0:2], "big")
    if group_le not in (0x0002, 0x0008) and group_be not in (0x0002, 0x0008):
        return False
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    length = int.from_bytes(head[4:8], "little")
    return 0 < length < 1024


def is_tiff(head: bytes) -> bool:
    """Classic TIFF (II*\\0 / MM\\0*) or BigTIFF (II+\\0 / MM\\0+)."""
    return head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def is_pillow_image(head: bytes) -> bool:
    """PNG, JPEG, BMP (and GIF, WebP) signatures."""
    return (
        head.startswith(b"\x89PNG\r\n\x1a\n")
        or head.startswith(b"\xff\xd8\xff")
        or head.startswith(b"BM")
        or head.startswith((b"GIF87a", b"GIF89a"))
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
    )


def as_sfchw(array: np.ndarray, path: str) -> np.ndarray:
    """Adds missing axes: ``[H, W]`` -> ``[1, 1, H, W]``, ``[C, H, W]`` -> ``[1, C, H, W]``."""
    a = np.asarray(array)
    if a.dtype.kind not in "biuf":
        raise ReaderError(path, f"reader returned dtype {a.dtype}; expected numbers")
    if a.ndim == 2:
        return a[None, None]
    if a.ndim == 3:
        return a[None]
    if a.ndim == 4:
        return a
    raise ReaderError(path, f"reader returned shape {a.shape}; expected [S, C, H, W]")


def check_size(path: str, n_pixels: int) -> None:
    """Refuses images above ``MAX_PIXELS`` before they are decoded."""
    if n_pixels > MAX_PIXELS:
        raise ReaderError(
            path,
            f"{n_pixels:,} pixels exceed the limit of {MAX_PIXELS:,} (possible decompression "
            "bomb; if the file is trusted raise beitdomain.io.base.MAX_PIXELS)",
        )
