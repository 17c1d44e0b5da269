"""DICOM reader (pydicom; compressed transfer syntaxes through the pylibjpeg plugins).

What it does to the stored values, in DICOM's order: decode (YBR -> RGB is done by pydicom),
PALETTE COLOR -> RGB, Modality LUT / Rescale Slope+Intercept (HU for CT). The window
(recipe or file), percentile clipping and MONOCHROME1 inversion are applied later by
``beitdomain.io.intensity.normalize``; the reader only records the file's window and
whether to invert.

Privacy: metadata is built from an allow-list of technical attributes (below). Nothing from
the patient, study or equipment modules (names, IDs, dates, UIDs, institution) is copied, so
nothing written from ``meta`` can carry it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from beitdomain.io.base import BaseReader, check_size, is_dicom
from beitdomain.io.errors import MissingCodecError, ReaderError

CODEC_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise MissingCodecError(
            "<dicom>", "reading DICOM needs pydicom: pip install pydicom"
        ) from None
    return pydicom


class _DecoderLog(logging.Handler):
    """What pydicom's pixel decoders logged: one line per record, for the file's reason.

    A decoder that fails logs its exception with the traceback (``LOGGER.exception``) before
    pydicom tries the next one; the reason of the file says the same in one line.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # only the decoders' own records: pydicom's value checks (the "pydicom" logger) can
        # print an attribute's value, and a patient's ID must not reach an errors CSV
        if not record.name.startswith("pydicom.pixels"):
            return
        with contextlib.suppress(Exception):
            text = record.getMessage().strip()
            if text:
                self.lines.append(text.splitlines()[0])


@contextlib.contextmanager
def _quiet() -> Iterator[_DecoderLog]:
    """Silences pydicom's warnings and its log records; yields what its decoders logged.

    pydicom converts a value when it is first read (not when the file is read), and a value
    that does not fit its VR (a PatientID stored as IS) is then printed in a warning *and* a
    log line on the ``pydicom`` logger: a PHI leak on the console. A pixel decoder that fails
    logs an ERROR with its traceback on a child logger (``pydicom.pixels.decoders.base``),
    which ``disabled`` does not stop: the records go to a handler of this context instead of
    on up to the console. Everything that touches a dataset runs inside this.
    """
    logger = logging.getLogger("pydicom")
    disabled, propagate = logger.disabled, logger.propagate
    records = _DecoderLog()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.disabled = True
        logger.propagate = False  # a child's record stops at `records`
        logger.addHandler(records)
        try:
            yield records
        finally:
            logger.removeHandler(records)
            logger.disabled, logger.propagate = disabled, propagate


def _with_decoder_log(reason: str, lines: list[str]) -> str:
    """`reason` with what the decoders logged that it does not already say."""
    extra = [line for line in dict.fromkeys(lines) if line not in reason]
    return f"{reason}; {'; '.join(extra[:3])}" if extra else reason


def _dcmread(path: str | os.PathLike, **kwargs: Any) -> Any:
    """`pydicom.dcmread(path, force=True, **kwargs)` with pydicom's warnings silenced: a
    malformed file either reads or raises, and the caller words the error."""
    pydicom = _pydicom()
    with _quiet():
        return pydicom.dcmread(path, force=True, **kwargs)


def _float_list(value: Any) -> list[float]:
    if value is None:
        return []
    try:
        return [float(v) for v in value]
    except TypeError:
        return [float(value)]


def _first_window(ds: Any) -> tuple[float, float] | None:
    """The file's first Window Center/Width, also from Enhanced multi-frame functional groups."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None and "SharedFunctionalGroupsSequence" in ds:
        try:
            voi = ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
            center, width = voi.WindowCenter, voi.WindowWidth
        except (AttributeError, IndexError):
            return None
    centers, widths = _float_list(center), _float_list(width)
    if not centers or not widths or not widths[0] > 0:
        return None
    return centers[0], widths[0]


def _functional(ds: Any, frames: int, seq: str, attrs: tuple[str, str]) -> list | None:
    """Per-frame values of two attributes of a functional-group macro (Enhanced multi-frame).

    A frame's own group (PerFrameFunctionalGroupsSequence) wins over the shared one. Returns
    one ``[a, b]`` (floats) or None per frame, or None when neither sequence has the macro.
    """

    def values(group: Any) -> list[float] | None:
        try:
            item = getattr(group, seq)[0]
            a, b = (_float_list(item.get(k)) for k in attrs)
        except (AttributeError, IndexError, TypeError, ValueError):
            return None
        return [a[0], b[0]] if a and b else None

    shared = None
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        shared = values(ds.SharedFunctionalGroupsSequence[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    out = [values(per_frame[i]) if i < len(per_frame) else None for i in range(frames)]
    out = [v if v is not None else shared for v in out]
    return out if any(v is not None for v in out) else None


def _truncated(ds: Any, path: str) -> str | None:
    """Where a file ends inside its last element (a cut copy or download), or None.

    pydicom reads a truncated value silently; the raw element still says how long it should be.
    """
    try:
        size = os.path.getsize(path)
        tag = list(ds.keys())[-1]
        raw = ds.get_item(tag)
        tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
    except (OSError, IndexError, KeyError, TypeError):
        return None
    if tell is None or length is None or length == 0xFFFFFFFF or tell + length <= size:
        return None
    from pydicom.datadict import keyword_for_tag

    name = keyword_for_tag(tag) or str(tag)
    return (
        f"file is truncated: it ends at byte {size:,}, inside the element {name} {tag} that "
        f"should run to byte {tell + length:,}; copy or export the file again"
    )


def _pixel_spacing(ds: Any) -> list[float] | None:
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        if key in ds:
            values = _float_list(ds.get(key))
            if len(values) == 2:
                return values
    return None


def _safe_meta(ds: Any, path: str) -> dict[str, Any]:
    """Technical attributes only (allow-list); see module docstring."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    meta: dict[str, Any] = {
        "reader": "dicom",
        "format": "dicom",
        "modality": str(ds.get("Modality", "")) or None,
        "photometric": str(ds.get("PhotometricInterpretation", "")) or None,
        "bits_stored": int(ds.BitsStored) if ds.get("BitsStored") is not None else None,
        "signed": bool(ds.get("PixelRepresentation", 0)),
        "pixel_spacing": _pixel_spacing(ds),
        "transfer_syntax": ts.name if ts is not None else None,
    }
    return meta


def read_dataset_pixels(ds: Any, path: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Decodes pixels of an already-read dataset into raw ``[S, C, H, W]`` plus meta."""
    with _quiet():
        return _read_dataset_pixels(ds, path)


def _read_dataset_pixels(ds: Any, path: str) -> tuple[np.ndarray, dict[str, Any]]:
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    cut = _truncated(ds, path)  # before decoding: the raw element still holds its length
    if not any(k in ds for k in PIXEL_KEYWORDS):
        if cut:
            raise ReaderError(path, cut)
        raise ReaderError(
            path,
            # No "--on-error skip" here: the reason is also what the skip report lists, and
            # every command that stops on it (--on-error fail) adds that hint once itself.
            "DICOM file has no pixel data (e.g. a report, RT structure set or DICOMDIR); "
            "remove it from the image folder",
        )
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    check_size(path, rows * cols * frames * samples)
    meta = _safe_meta(ds, path)
    try:
        with _quiet() as decoder_log:
            arr = ds.pixel_array
    except Exception as e:
        msg = str(e)
        ts = meta["transfer_syntax"] or "unknown transfer syntax"
        if "missing" in msg.lower() and ("plugin" in msg.lower() or "dependenc" in msg.lower()):
            raise MissingCodecError(
                path, f"no installed codec decodes {ts}: {CODEC_HINT}"
            ) from None
        # pydicom puts the reason after a colon on the next lines ("... raised by all
        # available plugins:\n  pylibjpeg: <why>"): keep those, not just the first line.
        lines = [line.strip() for line in msg.splitlines() if line.strip()]
        first = lines[0] if lines else type(e).__name__
        if first.endswith(":") and len(lines) > 1:
            first = f"{first} {'; '.join(lines[1:4])}"
        first = _with_decoder_log(first, decoder_log.lines)
        # Pillow names its buffer by address ("<_io.BytesIO object at 0x7f...>"): the same
        # file would get another reason on every scan
        first = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the encoded frame", first)
        if cut:
            first = f"{first}; {cut}"
        raise ReaderError(path, f"cannot decode DICOM pixel data ({ts}): {first}") from None

    photometric = (meta["photometric"] or "").upper()
    meta["dtype"] = (
        str(arr.dtype.newbyteorder("=")) if arr.dtype.byteorder == ">" else str(arr.dtype)
    )
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        meta["dtype"] = str(arr.dtype)
        meta["bits_stored"] = 16 if arr.dtype.itemsize == 2 else 8
        meta["signed"] = False
    rgb = arr.ndim == (4 if frames > 1 else 3)
    if not rgb:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        # Enhanced multi-frame (MR, CT, PET): Rescale and VOI live in functional groups, per
        # frame or shared; a real Enhanced MR has slope 2.108 there and none at the top level.
        rescales = _functional(
            ds, frames, "PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")
        )
        windows = _functional(ds, frames, "FrameVOILUTSequence", ("WindowCenter", "WindowWidth"))
        if "ModalityLUTSequence" in ds:
            arr = apply_modality_lut(arr, ds)
        elif rescales is not None:
            table = np.array([r or [slope, intercept] for r in rescales], dtype=np.float32)
            if (table != [1.0, 0.0]).any():
                frames_first = arr if frames > 1 else arr[None]
                arr = frames_first.astype(np.float32) * table[:, 0, None, None]
                arr += table[:, 1, None, None]
                arr = arr if frames > 1 else arr[0]
            slope, intercept = (float(v) for v in table[0])
            if len({tuple(r) for r in table.tolist()}) > 1:
                meta["rescale_frames"] = table.tolist()
        elif slope != 1.0 or intercept != 0.0:
            # float32 is exact for 16-bit stored values and half the cost of pydicom's float64.
            arr = arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        meta["rescale"] = [slope, intercept]
        meta["window"] = list(w) if (w := _first_window(ds)) else None
        if windows is not None:
            valid = [w if w is not None and w[1] > 0 else None for w in windows]
            meta["window"] = meta["window"] or next((w for w in valid if w), None)
            if all(valid) and len({tuple(w) for w in valid}) > 1:
                meta["window_frames"] = valid
        meta["invert"] = photometric == "MONOCHROME1"
    else:
        meta["window"] = None
        meta["invert"] = False
    # [H, W] | [F, H, W] | [H, W, 3] | [F, H, W, 3] -> [S, C, H, W]
    if frames == 1:
        arr = arr[None]
    arr = np.moveaxis(arr, -1, 1) if rgb else arr[:, None]
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    meta["frames"] = int(arr.shape[0])
    meta["shape"] = list(arr.shape)
    return arr, meta


def read_dicom(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Reads one DICOM file into raw ``[S, C, H, W]`` values (HU for CT) and safe metadata."""
    _pydicom()  # a missing pydicom is MissingCodecError, not "not a readable DICOM file"
    path = str(path)
    try:
        ds = _dcmread(path)
    except Exception as e:
        raise ReaderError(path, f"not a readable DICOM file: {type(e).__name__}: {e}") from None
    return read_dataset_pixels(ds, path)


def read_dicom_series(folder: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Reads a folder holding one DICOM series as slices ``[S, 1, H, W]``.

    Slices are ordered along the slice normal (Image Position/Orientation Patient) when
    present, else by Instance Number. All slices must share rows and columns.
    """
    _pydicom()
    with _quiet():
        return _read_dicom_series(Path(folder))


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, dict[str, Any]]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    slices = []
    for p in files:
        with open(p, "rb") as f:
            if not is_dicom(f.read(256)):
                continue
        try:
            ds = _dcmread(p)
        except Exception as e:
            raise ReaderError(p, f"not a readable DICOM file: {e}") from None
        if any(k in ds for k in PIXEL_KEYWORDS):
            slices.append((p, ds))
    if not slices:
        raise ReaderError(folder, "folder holds no DICOM files with pixel data")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise ReaderError(
            folder, f"folder mixes {len(series)} series; put each series in its own folder"
        )

    def position(item: tuple[Path, Any]) -> float:
        ds = item[1]
        ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if ipp is not None and iop is not None and len(iop) == 6:
            normal = np.cross(np.array(iop[:3], float), np.array(iop[3:], float))
            return float(np.dot(normal, np.array(ipp, float)))
        return float(ds.get("InstanceNumber", 0) or 0)

    slices.sort(key=position)
    arrays, meta = [], None
    for p, ds in slices:
        arr, m = read_dataset_pixels(ds, str(p))
        if meta is None:
            meta = m
        elif arr.shape[1:] != arrays[0].shape[1:]:
            raise ReaderError(p, f"slice shape {arr.shape[1:]} differs from {arrays[0].shape[1:]}")
        arrays.append(arr.astype(np.float32, copy=False))
    volume = np.concatenate(arrays, axis=0)
    meta = dict(meta or {})
    meta.update(reader="dicom-series", frames=int(volume.shape[0]), shape=list(volume.shape))
    return volume, meta


def patient_digest(path: str | os.PathLike, salt: bytes) -> str | None:
    """HMAC-SHA256 of the file's PatientID under ``salt``, or None without a PatientID.

    For grouping images by patient without holding the ID: the caller keeps the salt in memory
    for one scan only and writes neither the ID nor the digest (it numbers the patients), so
    nothing written can be matched against a list of IDs. A folder (one series) uses its first
    DICOM file.
    """
    import hashlib
    import hmac

    _pydicom()  # outside the try: a missing pydicom is an error, not "no PatientID"
    path = Path(path)
    if path.is_dir():
        path = next(
            (p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")), path
        )
    try:
        with _quiet():
            ds = _dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
            pid = _raw_text(ds, 0x00100020)
    except Exception:
        return None
    if not pid:
        return None
    return hmac.new(salt, pid, hashlib.sha256).hexdigest()


def _raw_text(ds: Any, tag: int) -> bytes:
    """An element's stored bytes, padding stripped, never converted through its VR.

    Converting runs pydicom's validation, which prints a value that does not fit its VR (a
    PatientID stored as IS or DS): the ID would reach the console. The bytes are the same
    whichever VR the file declares, so one patient gets one digest.
    """
    if tag not in ds:
        return b""
    elem = ds.get_item(tag)
    value = elem.value
    if value is None:
        return b""
    if not isinstance(value, bytes):  # already converted (a dataset built in memory)
        value = str(value).encode("utf-8", "surrogateescape")
    return value.strip(b" \x00")


class DicomReader(BaseReader):
    """DICOM Part 10 files and preamble-less datasets, by content."""

    name = "dicom"
    description = "DICOM (pydicom; JPEG/JPEG-LS/JPEG 2000 via pylibjpeg plugins)"
    requires = (("pydicom", "pydicom"),)

    def can_read(self, path: str, head: bytes) -> bool:
        return is_dicom(head)

    def read(self, path: str) -> tuple[np.ndarray, dict[str, Any]]:
        return read_dicom(path)
