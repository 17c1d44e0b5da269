"""Readers: files -> ``(array, meta)``, by content, for DICOM, TIFF, PNG/JPEG/BMP and plugins.

>>> from beitdomain.io import load_image, IntensitySpec
>>> image, meta = load_image("ct/slice_001.dcm", IntensitySpec(window="ct-lung"))  # doctest: +SKIP
>>> image.shape, image.dtype  # [C, H, W] float32 in [0, 1]  # doctest: +SKIP
"""

from beitdomain.io.base import MAX_PIXELS, BaseReader, Reader
from beitdomain.io.errors import MissingCodecError, ReaderError
from beitdomain.io.intensity import WINDOW_PRESETS, IntensitySpec, normalize
from beitdomain.io.load import READERS, find_reader, load_image, read_raw, select_frames
from beitdomain.io.registry import ENTRY_POINT_GROUP, ReaderRegistry

__all__ = [
    "ENTRY_POINT_GROUP",
    "MAX_PIXELS",
    "READERS",
    "WINDOW_PRESETS",
    "BaseReader",
    "IntensitySpec",
    "MissingCodecError",
    "Reader",
    "ReaderError",
    "ReaderRegistry",
    "find_reader",
    "load_image",
    "normalize",
    "read_raw",
    "select_frames",
]
