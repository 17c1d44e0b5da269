"""Readers: files -> ``(array, meta)``, by content, for DICOM, TIFF, PNG/JPEG/BMP, volumes
(NIfTI, NRRD, MetaImage through MONAI) and plugins.

>>> from beitdomain.io import load_image, IntensitySpec
>>> image, meta = load_image("ct/slice_001.dcm", IntensitySpec(window="ct-lung"))  # doctest: +SKIP
>>> image.shape, image.dtype  # [C, H, W] float32 in [0, 1]  # doctest: +SKIP
"""

from beitdomain.io.base import MAX_PIXELS, BaseReader, Reader
from beitdomain.io.errors import MissingCodecError, ReaderError
from beitdomain.io.intensity import WINDOW_PRESETS, IntensitySpec, SpecError, normalize
from beitdomain.io.load import (
    READERS,
    find_reader,
    kept_frames,
    load_image,
    prepare,
    read_raw,
    select_frames,
    select_slices,
)
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
    "SpecError",
    "find_reader",
    "kept_frames",
    "load_image",
    "normalize",
    "prepare",
    "read_raw",
    "select_frames",
    "select_slices",
]
