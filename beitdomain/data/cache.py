"""Decode once: every image normalized, resized and stored in one memory-mapped array.

Layout of a cache folder::

    images.npy   [N, C, size, size] uint8 | uint16 | float16   (np.load(mmap_mode="r"))
    items.npy    [N, 3] int64: row in images.npy, file index, frame index
    masks.npy    [N, size, size] uint8 | uint16 | int32, only in a cache of (image, mask) pairs
                 (a segmentation recipe's): row k is image row k's label map, nearest neighbour
    cache.json   settings (size, dtype, fit, intensity spec), per-file size/mtime(/sha256),
                 labels and splits (and each mask file's, and the classes); written last, so
                 its presence means the cache is complete

Working resolution: each frame is resized to ``size x size``. ``fit`` says how non-square
images get there: 'squash' (default; keeps all content, the aspect change is within what
random-resized-crop does anyway), 'crop' (shorter side to ``size``, center crop) or 'pad'
(longer side to ``size``, zero padding). Pick ``size`` a bit above the training size (256 for
224 training) so random crops still have detail. uint8 is plenty after windowing; uint16 keeps
16-bit detail for wide windows/percentile ranges; float16 when values must stay continuous.

Invalidation: opening a cache compares every file's size and mtime (and sha256 when the cache
was built with ``hash_files``), its mask files alike, and the normalization settings, and
refuses a stale cache with a message naming what changed. ``build_cache`` reuses a fresh
cache and rebuilds a stale one. A damaged cache (``images.npy`` or ``masks.npy`` cut short or
replaced, ``items.npy`` rows pointing outside it) is refused as it opens, naming the file, and
rebuilt by ``build_cache``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from beitdomain.data.index import DataError, Manifest, ScanError, path_stat, scan
from beitdomain.data.mask_files import MaskClasses, MaskError, MaskPair, load_pair
from beitdomain.data.parallel import parallel_map
from beitdomain.fileio import (
    LOCK_FILE,
    RUN_MARKER,
    FolderLock,
    FolderLockedError,
    LockFileError,
    WriteError,
    atomic_open,
    atomic_write_json,
    check_lock_file,
    free_bytes,
    make_dirs,
    read_marker,
    sha256_file,
    write_marker,
)
from beitdomain.io import IntensitySpec, ReaderError, kept_frames, load_image

CACHE_VERSION = 1
DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "float16": np.float16}
MASK_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "int32": np.int32}
FITS = ("squash", "crop", "pad")


class CacheError(DataError):
    """The cache is missing, stale or was built with other settings; says what changed."""


@dataclass(frozen=True)
class CacheMasks:
    """The masks a cache of (image, mask) pairs stores beside its images (``masks.npy``, one
    label map per image row, nearest neighbour to the image's cached grid).

    Attributes:
        files: each image's mask file, keyed by the image's resolved path.
        names: the classes (mask value i is ``names[i]``); every mask is checked against them
            as it is cached, as the segmentation fine-tune checks it.
        ignore_index: the mask value of unannotated pixels, or None.
    """

    files: Mapping[Path, Path]
    names: tuple[str, ...]
    ignore_index: int | None = None

    @property
    def dtype(self) -> str:
        """The narrowest type that holds every class and the ignore index."""
        values = [0, len(self.names) - 1, self.ignore_index or 0]
        if min(values) >= 0 and max(values) < 2**8:
            return "uint8"
        return "uint16" if min(values) >= 0 and max(values) < 2**16 else "int32"

    def record(self) -> dict[str, Any]:
        """What cache.json says of the masks (compared when a fine-tune opens the cache)."""
        return {"classes": list(self.names), "ignore_index": self.ignore_index, "dtype": self.dtype}


def _fitted_shape(h: int, w: int, size: int, fit: str) -> tuple[int, int]:
    """The (height, width) an ``h x w`` frame is resized to before `fit` crops or pads it."""
    if fit == "squash":
        return size, size
    if fit == "crop":
        s = size / min(h, w)
        return max(size, round(h * s)), max(size, round(w * s))
    if fit == "pad":
        s = size / max(h, w)
        return max(1, round(h * s)), max(1, round(w * s))
    raise ValueError(f"fit={fit!r}; valid: {', '.join(FITS)}")


def _crop_or_pad(out: np.ndarray, size: int, fit: str) -> np.ndarray:
    """``[C, h, w]`` at `_fitted_shape` -> ``[C, size, size]``: centre crop or zero padding."""
    c, new_h, new_w = out.shape
    if fit == "crop":
        y, x = (new_h - size) // 2, (new_w - size) // 2
        return np.ascontiguousarray(out[:, y : y + size, x : x + size])
    if fit == "pad":
        padded = np.zeros((c, size, size), out.dtype)
        y, x = (size - new_h) // 2, (size - new_w) // 2
        padded[:, y : y + new_h, x : x + new_w] = out
        return padded
    return np.ascontiguousarray(out)


def resize_square(image: np.ndarray, size: int, fit: str = "squash") -> np.ndarray:
    """Resizes ``[C, H, W]`` float32 to ``[C, size, size]`` (see module docstring for ``fit``)."""
    c, h, w = image.shape
    hwc = np.ascontiguousarray(image.transpose(1, 2, 0))  # cv2 wants [H, W, C]
    new_h, new_w = _fitted_shape(h, w, size, fit)
    # INTER_AREA averages when shrinking (no aliasing); linear when enlarging.
    interp = cv2.INTER_AREA if new_h * new_w < h * w else cv2.INTER_LINEAR
    if c <= 4:
        out = cv2.resize(hwc, (new_w, new_h), interpolation=interp).reshape(new_h, new_w, c)
    else:
        out = np.stack(
            [cv2.resize(hwc[..., k], (new_w, new_h), interpolation=interp) for k in range(c)], -1
        )
    return _crop_or_pad(out.transpose(2, 0, 1), size, fit)  # [C, new_h, new_w] in


def resize_square_labels(mask: np.ndarray, size: int, fit: str = "squash") -> np.ndarray:
    """A label map ``[H, W]`` on the grid `resize_square` gives its image: ``[size, size]``
    int32, nearest neighbour (a class index is never blended), padding 0 (background)."""
    h, w = mask.shape
    new_h, new_w = _fitted_shape(h, w, size, fit)
    labels = np.ascontiguousarray(mask, dtype=np.int32)  # cv2 resizes int32, not int64
    out = cv2.resize(labels, (new_w, new_h), interpolation=cv2.INTER_NEAREST_EXACT)
    return _crop_or_pad(out.reshape(1, new_h, new_w), size, fit)[0]


def quantize(image: np.ndarray, dtype: str) -> np.ndarray:
    """[0, 1] float32 -> uint8 (x255) / uint16 (x65535) with rounding, or float16."""
    if dtype == "float16":
        return image.astype(np.float16)
    top = np.float32(255.0 if dtype == "uint8" else 65535.0)
    return (image * top + np.float32(0.5)).astype(DTYPES[dtype])


def dequantize_scale(dtype: np.dtype) -> float:
    """Factor that maps cached values back to [0, 1]."""
    return {np.dtype(np.uint8): 1 / 255.0, np.dtype(np.uint16): 1 / 65535.0}.get(
        np.dtype(dtype), 1.0
    )


def _decode_file(args: tuple) -> tuple[int, np.ndarray | None, str | None, np.ndarray | None]:
    """Worker: one file -> ``[k, C, size, size]`` in the cache dtype, and with a mask (`pair`:
    its path, the class names, the ignore index, the masks' dtype) its ``[k, size, size]``
    label maps. Module-level for pickling.

    Returns:
        (index, images or None, why not, masks or None). A pair is read and checked as the
        uncached segmentation fine-tune reads it (`masks.load_pair`: the image's grid, values
        of the classes); its problem is the MaskError's message.
    """
    index, path, spec_dict, size, dtype, fit, frames, pair = args
    spec = IntensitySpec.from_config(spec_dict)
    masks = None
    if pair is None:
        try:
            image, _ = load_image(path, spec)
        except ReaderError as e:
            return index, None, e.reason, None
        if image.ndim == 3:
            image = image[None]
    else:
        mask_path, names, ignore_index, mask_dtype = pair
        try:
            image, labels = load_pair(
                MaskPair(Path(path), Path(mask_path)), spec, MaskClasses(tuple(names), ignore_index)
            )
        except MaskError as e:
            return index, None, str(e), None
        masks = np.stack([resize_square_labels(m, size, fit) for m in labels]).astype(mask_dtype)
    if image.shape[0] != frames:
        why = f"has {image.shape[0]} frames but the manifest says {frames}; re-scan"
        return index, None, why, None
    out = np.stack([quantize(resize_square(f, size, fit), dtype) for f in image])
    return index, out, None, masks


def _settings(spec: IntensitySpec, size: int, dtype: str, fit: str) -> dict[str, Any]:
    return {"size": int(size), "dtype": dtype, "fit": fit, "spec": spec.to_dict()}


def _diff_settings(cached: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    out = []
    for key in ("size", "dtype", "fit"):
        if cached.get(key) != wanted.get(key):
            out.append(f"{key}: {cached.get(key)!r} in the cache, {wanted.get(key)!r} requested")
    cspec, wspec = cached.get("spec", {}), wanted.get("spec", {})
    for key in sorted(set(cspec) | set(wspec)):
        if cspec.get(key) != wspec.get(key):
            out.append(f"{key}: {cspec.get(key)!r} in the cache, {wspec.get(key)!r} requested")
    return out


def _changed_files(root: Path, files: Sequence[dict[str, Any]]) -> list[str]:
    changes = []
    for f in files:
        p = Path(f["path"])
        p = p if p.is_absolute() else root / p
        try:
            st_size, st_mtime_ns = path_stat(p)  # a DICOM series folder: its files together
        except FileNotFoundError:
            changes.append(f"{f['path']}: deleted")
            continue
        if st_size == f["size"] and st_mtime_ns == f["mtime_ns"]:
            continue
        if f.get("sha256") and st_size == f["size"] and sha256_file(p) == f["sha256"]:
            continue  # touched or copied, content identical
        changes.append(
            f"{f['path']}: size {f['size']} -> {st_size}"
            if st_size != f["size"]
            else f"{f['path']}: modified (mtime changed)"
        )
    return changes


def check_cache(
    cache_dir: str | os.PathLike,
    spec: IntensitySpec | None = None,
    size: int | None = None,
    dtype: str | None = None,
    fit: str | None = None,
    manifest: Manifest | None = None,
    masks: CacheMasks | None = None,
) -> list[str]:
    """Reasons the cache cannot be used as is; empty when it is complete and fresh.

    Settings left as None are not compared. With ``manifest``, files added to or removed
    from the dataset since the cache was built are reported too; with ``masks``, a cache
    without masks, or with other classes or other mask files. A cache's mask files are
    always compared with the files on disk, as its images are.
    """
    return _cache_problems(Path(cache_dir), spec, size, dtype, fit, manifest, masks=masks)[0]


def _cache_problems(
    cache_dir: Path,
    spec: IntensitySpec | None = None,
    size: int | None = None,
    dtype: str | None = None,
    fit: str | None = None,
    manifest: Manifest | None = None,
    fresh: bool = True,
    masks: CacheMasks | None = None,
) -> tuple[list[str], dict[str, Any] | None, np.ndarray | None]:
    """`check_cache`'s reasons, with the record and the items array when they could be read
    (so opening a cache reads each once). Without `fresh`, only the record and the arrays are
    checked (a cache `build_cache` has just written or found fresh)."""
    meta_path = cache_dir / "cache.json"
    if not meta_path.is_file():
        why = "no cache here (cache.json missing; build it with beitdomain data cache)"
        return [f"{cache_dir}: {why}"], None, None
    if not _is_our_record(meta_path):
        why = "cannot be read as a cache record (damaged, or not a cache)"
        return [f"{meta_path} {why}"], None, None
    info = json.loads(meta_path.read_text(encoding="utf-8"))
    if info.get("cache_version") != CACHE_VERSION:
        return (
            [f"cache format {info.get('cache_version')} != {CACHE_VERSION}; rebuild it"],
            info,
            None,
        )
    reasons, items = _damage(cache_dir, info)
    if not fresh:
        return reasons, info, items
    cached = info["settings"]
    wanted = {
        "size": size if size is not None else cached["size"],
        "dtype": dtype if dtype is not None else cached["dtype"],
        "fit": fit if fit is not None else cached["fit"],
        "spec": spec.to_dict() if spec is not None else cached["spec"],
    }
    reasons += [f"setting changed: {d}" for d in _diff_settings(cached, wanted)]
    mask_files = [f["mask"] for f in info["files"] if isinstance(f.get("mask"), dict)]
    changes = _changed_files(Path(info["root"]), [*info["files"], *mask_files])
    if changes:
        shown = changes[:10] + ([f"... and {len(changes) - 10} more"] if len(changes) > 10 else [])
        reasons.append(
            f"{len(changes)} file(s) changed since the cache was built: " + "; ".join(shown)
        )
    if manifest is not None:
        cached_paths = {f["path"] for f in info["files"]} | {p for p, _ in info.get("errors", [])}
        added = [e.path for e in manifest.entries if e.path not in cached_paths]
        if added:
            reasons.append(f"{len(added)} file(s) not in the cache, e.g. {added[0]}")
    if masks is not None:
        reasons += _mask_differences(info, masks)
    return reasons, info, items


def _mask_differences(info: dict[str, Any], masks: CacheMasks) -> list[str]:
    """How a cache's masks differ from those asked for (none, other classes, other files)."""
    cached = info.get("masks")
    if not isinstance(cached, dict):
        return ["the cache holds no masks (built without them); a segmentation recipe's needs them"]
    wanted = masks.record()
    out = [
        f"setting changed: segment.{name}: {cached.get(key)!r} in the cache, "
        f"{wanted[key]!r} requested"
        for key, name in (("classes", "classes"), ("ignore_index", "ignore_index"))
        if cached.get(key) != wanted[key]
    ]
    root = Path(info["root"])
    wanted_pairs = {str(Path(i).resolve()): str(Path(m).resolve()) for i, m in masks.files.items()}
    had = {
        str((root / f["path"]).resolve()): str((root / f["mask"]["path"]).resolve())
        for f in info["files"]
        if isinstance(f.get("mask"), dict)
    }
    both = wanted_pairs.keys() | had.keys()
    differ = sorted(k for k in both if wanted_pairs.get(k) != had.get(k))
    if differ:
        out.append(
            f"{len(differ)} image(s) with another mask (or none) than in the cache, e.g. "
            f"{differ[0]}: {had.get(differ[0])} in the cache, {wanted_pairs.get(differ[0])} asked"
        )
    return out


def _damage(cache_dir: Path, info: dict[str, Any]) -> tuple[list[str], np.ndarray | None]:
    """What is wrong with `images.npy` and `items.npy` (a copy cut short, a file replaced,
    rows pointing outside the images), read from their headers and the small items array
    only, so a bad cache is refused as it opens, not by a traceback mid-training.

    Returns:
        The problems, each naming its file, and the items array when it is usable.
    """
    images_path, items_path = cache_dir / "images.npy", cache_dir / "items.npy"
    reasons: list[str] = []
    shape = _images_header(images_path, info, reasons)
    if isinstance(info.get("masks"), dict):
        _masks_header(cache_dir / "masks.npy", info, shape[0] if shape else None, reasons)
    try:
        items = np.load(items_path, allow_pickle=False)  # a pickle is refused, never run
    except FileNotFoundError:
        return [*reasons, f"{items_path} is missing"], None
    except (OSError, ValueError, EOFError) as e:
        return [*reasons, f"{items_path} cannot be read as an array ({e})"], None
    if not isinstance(items, np.ndarray) or items.dtype.kind not in "iu" or items.ndim != 2:
        what = f"{items.dtype} {list(items.shape)}" if isinstance(items, np.ndarray) else "npz"
        return [*reasons, f"{items_path} holds {what}, not [N, 3] integers"], None
    if items.shape[1] != 3:
        return [*reasons, f"{items_path} has shape {list(items.shape)}, not [N, 3]"], None
    if isinstance(info.get("count"), int) and len(items) != info["count"]:
        reasons.append(f"{items_path} has {len(items)} rows; cache.json says {info['count']}")
    # column: what it points at, how many there are (None: unknown), where that is said
    limits = [
        ("image row", shape[0] if shape else None, "images.npy holds"),
        ("file", len(info["files"]), "cache.json lists"),
        ("frame", None, ""),
    ]
    for col, (what, n, holds) in enumerate(limits):
        values = items[:, col]
        out = values < 0 if n is None else (values < 0) | (values >= n)
        bad = np.flatnonzero(out)
        if bad.size:
            k = int(bad[0])
            of = f" ({holds} {n})" if n is not None else ""
            reasons.append(
                f"{items_path} row {k} points at {what} {int(values[k])}{of}; "
                f"{bad.size} row(s) out of range"
            )
    sample = info.get("pixel_sample")
    if (
        not reasons
        and shape is not None
        and isinstance(sample, dict)
        and sample.get("sha256")
        and _pixel_digest(images_path, sample.get("rows", [])) != sample["sha256"]
    ):
        reasons.append(
            f"{images_path}: the pixels of {len(sample.get('rows', []))} sampled images differ "
            "from those written (sha256 in cache.json): the file was changed or damaged "
            "(zeroed by a bad disk?)"
        )
    if (
        not reasons
        and isinstance(sample, dict)
        and sample.get("masks_sha256")
        and _pixel_digest(cache_dir / "masks.npy", sample.get("rows", [])) != sample["masks_sha256"]
    ):
        reasons.append(
            f"{cache_dir / 'masks.npy'}: the masks of {len(sample.get('rows', []))} sampled "
            "images differ from those written (sha256 in cache.json): the file was changed or "
            "damaged"
        )
    return reasons, (items if not reasons else None)


PIXEL_SAMPLES = 64  # images checked each time a cache opens: a few MiB read at most


def _pixel_sample_rows(items: np.ndarray) -> list[int]:
    """Up to PIXEL_SAMPLES image rows the items use, evenly spread, first and last included."""
    used = np.unique(items[:, 0]) if len(items) else np.zeros(0, dtype=np.int64)
    if len(used) <= PIXEL_SAMPLES:
        return [int(r) for r in used]
    picks = np.linspace(0, len(used) - 1, PIXEL_SAMPLES).round().astype(np.int64)
    return [int(r) for r in used[np.unique(picks)]]


def _pixel_digest(images_path: Path, rows: list[int]) -> str | None:
    """sha256 over the bytes of `rows` of `images_path` (None when they cannot be read)."""
    try:
        images = np.load(images_path, mmap_mode="r")
        h = hashlib.sha256()
        for r in rows:
            h.update(np.ascontiguousarray(images[int(r)]).tobytes())
    except (OSError, ValueError, IndexError, TypeError):
        return None
    return h.hexdigest()


def _images_header(path: Path, info: dict[str, Any], reasons: list[str]) -> tuple[int, ...] | None:
    """The shape `path`'s .npy header declares when it fits the record and the file holds all
    of it; otherwise None, with what is wrong added to `reasons`."""
    want = np.dtype(DTYPES.get(info["settings"].get("dtype"), np.uint8))
    frame = tuple(info.get("shape", [])[1:]) or None
    return _npy_header(path, want, frame, ("C", "size", "size"), reasons, "images")


def _masks_header(
    path: Path, info: dict[str, Any], rows: int | None, reasons: list[str]
) -> tuple[int, ...] | None:
    """`_images_header` for `masks.npy`: one ``[size, size]`` label map per image row."""
    want = np.dtype(MASK_DTYPES.get(info["masks"].get("dtype"), np.uint8))
    size = info["settings"].get("size")
    shape = _npy_header(path, want, (size, size), ("size", "size"), reasons, "masks")
    if shape is not None and rows is not None and shape[0] != rows:
        reasons.append(f"{path} holds {shape[0]} masks for the {rows} images of images.npy")
        return None
    return shape


def _npy_header(
    path: Path,
    want: np.dtype,
    frame: tuple[int, ...] | None,
    frame_names: tuple[str, ...],
    reasons: list[str],
    what: str,
) -> tuple[int, ...] | None:
    """The shape `path`'s .npy header declares when it is `want` ``[N, *frame]`` and the file
    holds all of it; otherwise None, with what is wrong added to `reasons`."""
    from numpy.lib import format as npy

    try:
        with open(path, "rb") as f:
            version = npy.read_magic(f)
            if version == (1, 0):
                shape, fortran, dt = npy.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dt = npy.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy format {version} is not one a cache writes")
            offset, have = f.tell(), os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        reasons.append(f"{path} is missing")
        return None
    except (OSError, ValueError, EOFError, SyntaxError) as e:
        reasons.append(f"{path} is not a readable .npy array ({e})")
        return None
    ndim = 1 + len(frame_names)
    if dt != want or fortran or len(shape) != ndim or (frame and tuple(shape[1:]) != frame):
        expected = f"{want} [N, {', '.join(map(str, frame or frame_names))}]"
        reasons.append(f"{path} holds {dt} {list(shape)}, not the cache's {expected}")
        return None
    need = offset + int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if have < need:
        reasons.append(
            f"{path} is cut short: {have} bytes, where its {shape[0]} {what} need {need} "
            f"(a copy or a disk lost data)"
        )
        return None
    return tuple(shape)


def build_cache(
    source: Manifest | str | os.PathLike,
    out_dir: str | os.PathLike,
    size: int = 256,
    dtype: str = "uint8",
    spec: IntensitySpec | None = None,
    fit: str = "squash",
    workers: int = 0,
    hash_files: bool = False,
    on_error: str = "fail",
    progress: bool = False,
    force: bool = False,
    masks: CacheMasks | None = None,
) -> CachedImages:
    """Decodes every image of ``source`` once into ``out_dir`` (see the module docstring).

    Args:
        source: A Manifest, a manifest file (.jsonl/.csv) or a data folder (scanned first).
        out_dir: Cache folder; created if needed.
        size: Working resolution (square side in pixels).
        dtype: 'uint8', 'uint16' or 'float16'.
        spec: Normalization applied before storing; defaults to ``IntensitySpec()``.
        fit: 'squash', 'crop' or 'pad' for non-square images.
        workers: Decoding processes (0 = this process).
        hash_files: Also store each file's sha256 (slower; makes invalidation content-exact).
        on_error: 'fail' raises listing every bad file; 'skip' leaves them out, listed in
            cache.json under "errors".
        progress: Show a rich progress bar.
        force: Rebuild even if a fresh cache with the same settings exists.
        masks: Each image's mask, stored beside it in ``masks.npy`` at the image's cached
            grid (`resize_square_labels`: the same fit, nearest neighbour), every pair read
            and checked as the segmentation fine-tune checks it; a bad pair fails the build
            whatever ``on_error`` says (the fine-tune would refuse it too).

    Returns:
        The opened cache.

    Raises:
        MaskError: with ``masks``, an image without a mask or a pair that cannot serve (the
            first named, with how many others failed).
    """
    spec = spec or IntensitySpec()
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; valid: {', '.join(DTYPES)}")
    if fit not in FITS:
        raise ValueError(f"fit={fit!r}; valid: {', '.join(FITS)}")
    if size < 8:
        raise ValueError(f"size={size}; the working resolution should be >= the training size")
    out_dir = Path(out_dir).expanduser()  # a quoted '~/c' means the home folder
    _check_cache_folder(out_dir)  # before a long scan
    # What was there before, so that a failed build leaves --out as it found it
    made: list[Path] = []  # the folders make_dirs will create, deepest first
    missing = out_dir
    while not os.path.lexists(missing):
        made.append(missing)
        missing = missing.parent
    had_marker = read_marker(out_dir) is not None
    had_lock = os.path.lexists(out_dir / LOCK_FILE)
    make_dirs(out_dir, "write the cache")
    try:
        lock = FolderLock(out_dir).acquire("a cache")
    except FolderLockedError as e:
        raise CacheError(e.strerror or str(e)) from None
    partial = out_dir / ".images.partial.npy"
    partial_masks = out_dir / ".masks.partial.npy"
    renamed = False  # whether this build has put its images.npy in place
    try:
        manifest = _as_manifest(source, on_error, workers, progress)
        mask_of = _mask_files(manifest, masks)
        fresh = (out_dir / "cache.json").is_file() and not check_cache(
            out_dir, spec, size, dtype, fit, manifest, masks
        )
        if fresh and not force:
            cached = CachedImages(out_dir, verify=False)
            cached.reused = True
            return cached
        write_marker(out_dir, "cache")
        kept = [kept_frames(e.shape, e.reader, spec) for e in manifest.entries]
        per_file = [len(k) for k in kept]
        offsets = np.concatenate([[0], np.cumsum(per_file)]).astype(np.int64)
        total = int(offsets[-1])
        shape = (total, spec.in_chans, size, size)
        images = _preallocated_array(partial, DTYPES[dtype], shape, out_dir / "images.npy")
        labels = None
        if masks is not None:
            labels = _preallocated_array(
                partial_masks, MASK_DTYPES[masks.dtype], (total, size, size), out_dir / "masks.npy"
            )
        spec_dict = spec.to_dict()
        jobs = [
            (
                i,
                str(manifest.abspath(e)),
                spec_dict,
                size,
                dtype,
                fit,
                per_file[i],
                None
                if masks is None
                else (str(mask_of[i]), list(masks.names), masks.ignore_index, masks.dtype),
            )
            for i, e in enumerate(manifest.entries)
        ]
        failed: dict[int, str] = {}
        decoded = parallel_map(
            _decode_file,
            jobs,
            workers=workers,
            progress=progress,
            description="Decoding into the cache",
        )
        for i, arr, reason, mask_arr in decoded:
            if arr is None:
                failed[i] = reason or "unreadable"
                continue
            images[offsets[i] : offsets[i + 1]] = arr
            if labels is not None:
                labels[offsets[i] : offsets[i + 1]] = mask_arr
        images.flush()
        del images
        if labels is not None:
            labels.flush()
            del labels
        if failed and masks is not None:  # a pair the fine-tune would refuse: no cache of it
            first = min(failed)
            more = f" ({len(failed) - 1} more pair(s) failed too)" if len(failed) > 1 else ""
            raise MaskError(f"{failed[first]}{more}; nothing was cached")
        errors = list(manifest.errors) + [
            (manifest.entries[i].path, r) for i, r in sorted(failed.items())
        ]
        if failed and on_error == "fail":
            raise ScanError(
                f"{manifest.root}: {len(failed)} file(s) could not be cached:",
                [(manifest.entries[i].path, r) for i, r in sorted(failed.items())],
                "Fix or remove them, or pass --on-error skip.",
            )
        items, files = [], []
        for i, e in enumerate(manifest.entries):
            if i in failed:
                continue
            entry = {
                "path": e.path,
                "size": e.size,
                "mtime_ns": e.mtime_ns,
                "label": e.label,
                "split": e.split,
                "group": e.group,
                "frames": per_file[i],
            }
            if hash_files and manifest.abspath(e).is_file():  # not for series folders
                entry["sha256"] = sha256_file(manifest.abspath(e))
            if masks is not None:
                entry["mask"] = _file_entry(mask_of[i], Path(manifest.root), hash_files)
            file_index = len(files)
            files.append(entry)
            # Frame (slice) index within the source file, so a selection records which were kept.
            for k in range(per_file[i]):
                items.append((int(offsets[i]) + k, file_index, int(kept[i][k])))
        item_rows = np.asarray(items, dtype=np.int64).reshape(-1, 3)
        rows = _pixel_sample_rows(item_rows)
        record = {  # built before anything is renamed into place
            "cache_version": CACHE_VERSION,
            "settings": _settings(spec, size, dtype, fit),
            "root": str(Path(manifest.root).resolve()),
            "count": len(items),
            "shape": [len(items), spec.in_chans, size, size],
            "manifest_fingerprint": manifest.fingerprint(),
            "files": files,
            "errors": [list(x) for x in errors],
            # a sampled checksum of the pixels, checked as the cache opens (a zeroed or
            # rewritten images.npy is refused instead of training silently)
            "pixel_sample": {"rows": rows, "sha256": _pixel_digest(partial, rows)},
        }
        if masks is not None:
            record["masks"] = masks.record()
            record["pixel_sample"]["masks_sha256"] = _pixel_digest(partial_masks, rows)
        # Until here a rebuild's old cache is whole; from here an interrupted one must not look
        # complete, so its cache.json goes first
        with contextlib.suppress(FileNotFoundError):
            (out_dir / "cache.json").unlink()
        os.replace(partial, out_dir / "images.npy")
        renamed = True
        if masks is not None:
            os.replace(partial_masks, out_dir / "masks.npy")
        else:  # a rebuild without masks: an older build's masks.npy would only fill the disk
            (out_dir / "masks.npy").unlink(missing_ok=True)
        with atomic_open(out_dir / "items.npy") as f:
            np.save(f, item_rows)
        atomic_write_json(out_dir / "cache.json", record)
    except BaseException:
        partial.unlink(missing_ok=True)  # no half-built cache left behind
        partial_masks.unlink(missing_ok=True)
        if renamed:  # without its cache.json this build's images.npy only fills the disk
            for name in ("images.npy", "items.npy", "masks.npy"):
                (out_dir / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # what this build added to the folder
            if not had_marker:
                (out_dir / RUN_MARKER).unlink(missing_ok=True)
            if not had_lock:
                (out_dir / LOCK_FILE).unlink(missing_ok=True)  # held: no one else uses it
            for folder in made:  # the folders it created, each only when empty
                folder.rmdir()
        raise
    finally:
        lock.release()
    cached = CachedImages(out_dir, verify=False)
    cached.reused = False
    return cached


def _mask_files(manifest: Manifest, masks: CacheMasks | None) -> list[Path]:
    """The mask file of each manifest entry, in its order (empty without masks).

    Raises:
        MaskError: an image of the manifest that `masks` gives no mask.
    """
    if masks is None:
        return []
    by_image = {Path(k).resolve(): Path(v) for k, v in masks.files.items()}
    out, unpaired = [], []
    for e in manifest.entries:
        found = by_image.get(manifest.abspath(e).resolve())
        if found is None:
            unpaired.append(e.path)
        else:
            out.append(found)
    if unpaired:
        raise MaskError(
            f"{len(unpaired)} image(s) of {manifest.root} have no mask to cache with them, e.g. "
            f"{unpaired[0]}"
        )
    return out


def _file_entry(path: Path, root: Path, hash_files: bool) -> dict[str, Any]:
    """A file as cache.json records it: its path (relative to `root` when inside), size and
    mtime (and sha256), what `_changed_files` compares."""
    try:
        rel = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        rel = str(path.resolve())
    st_size, st_mtime_ns = path_stat(path)
    entry: dict[str, Any] = {"path": rel, "size": st_size, "mtime_ns": st_mtime_ns}
    if hash_files:
        entry["sha256"] = sha256_file(path)
    return entry


# posix_fallocate's answers for a file system that cannot reserve space (then zeros are written)
_NO_FALLOCATE = {errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def _preallocated_array(
    partial: Path, dtype: Any, shape: tuple[int, ...], target: Path
) -> np.memmap:
    """A writable memory map of a new `partial` .npy whose disk space is reserved first.

    A plain `open_memmap(mode="w+")` makes a sparse file: on a full disk the first write into
    a page with no block behind it kills the process by SIGBUS, with no message. Reserving the
    blocks up front (posix_fallocate, else writing zeros) turns a full disk into an OSError
    here, before anything is decoded.

    Raises:
        WriteError: naming `target`, the space needed and what is free; `partial` is removed.
    """
    try:
        images = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape)
        offset, nbytes = images.offset, images.nbytes
        del images  # nothing written through it yet: unmap before reserving the blocks
        _reserve(partial, offset, nbytes)
        return np.lib.format.open_memmap(partial, mode="r+")
    except OSError as e:
        need = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        with contextlib.suppress(OSError):
            partial.unlink()  # at once: what is free is said without it (and it fills the disk)
        try:
            free = f", {free_bytes(partial.parent) / 2**20:.1f} MiB free"
        except OSError:
            free = ""
        raise WriteError(
            e.errno,
            f"could not write the cache {target}: {e.strerror or e} ({need / 2**20:.1f} MiB needed "
            f"for {shape[0]} images{free}); nothing was kept. Free some space, or choose "
            f"another --out",
        ) from e


def _reserve(path: Path, offset: int, nbytes: int, chunk: int = 16 << 20) -> None:
    """Allocates disk blocks for bytes `offset` .. `offset + nbytes` of `path` (kept zero)."""
    with open(path, "r+b") as f:
        fallocate = getattr(os, "posix_fallocate", None)
        if fallocate is not None:
            try:
                fallocate(f.fileno(), offset, nbytes)
                return
            except OSError as e:
                if e.errno not in _NO_FALLOCATE:
                    raise
        f.seek(offset)  # no fallocate here (or on this file system): write the zeros
        zeros = bytes(min(chunk, nbytes))
        for start in range(0, nbytes, chunk):
            f.write(zeros[: min(chunk, nbytes - start)])
        f.flush()
        os.fsync(f.fileno())  # a file system that allocates late reports ENOSPC here


def _check_cache_folder(out_dir: Path) -> None:
    """A cache is written into a new or empty folder, or over a cache (never among other files).

    Raises:
        CacheError: `out_dir` holds files and is not a cache; nothing was written.
    """
    if not out_dir.is_dir():
        if out_dir.exists():
            raise CacheError(f"{out_dir} is a file; give the cache a folder of its own")
        return
    try:
        check_lock_file(out_dir)  # a linked lock would truncate its target
    except LockFileError as e:
        raise CacheError(str(e)) from None
    meta = out_dir / "cache.json"
    if meta.is_file() or meta.is_symlink():
        # Another program's cache.json is not ours to replace: only the fields build_cache
        # writes make it one of ours (a cache from before markers has no other sign).
        if not _is_our_record(meta):
            raise CacheError(
                f"{meta} is not a cache record beitdomain wrote (no cache_version, settings, "
                f"root, files and manifest_fingerprint), so the folder holds another program's "
                f"files; nothing was written. Choose an empty or new folder with --out"
            )
        ours = True
    else:
        ours = (read_marker(out_dir) or {}).get("kind") == "cache"
    entries = sorted(p.name for p in out_dir.iterdir() if p.name not in (LOCK_FILE, RUN_MARKER))
    if entries and not ours:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise CacheError(
            f"{out_dir} is not empty ({shown}) and is not a beitdomain cache; nothing was "
            f"written. Choose an empty or new folder with --out"
        )


def _is_our_record(meta: Path) -> bool:
    """Whether `meta` is a cache.json build_cache wrote (a regular file with its fields)."""
    if meta.is_symlink():
        return False
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(info, dict)
        and isinstance(info.get("cache_version"), int)
        and isinstance(info.get("settings"), dict)
        and {"size", "dtype", "fit", "spec"} <= info["settings"].keys()
        and isinstance(info.get("files"), list)
        and isinstance(info.get("root"), str)
        and "manifest_fingerprint" in info
    )


def _as_manifest(source: Any, on_error: str, workers: int, progress: bool) -> Manifest:
    if isinstance(source, Manifest):
        return source
    path = Path(source)
    if path.is_dir():
        return scan(path, on_error=on_error, workers=workers, progress=progress)
    return Manifest.load(path)


class CachedImages:
    """Read access to a cache: ``cache[i]`` is a zero-copy ``[C, size, size]`` view.

    Pickles without the mapped array (each DataLoader worker maps the file itself).

    Attributes:
        root: Data root the cache was built from.
        settings: size, dtype, fit and the intensity spec used.
        reused: Set by ``build_cache``: True when an existing fresh cache was returned.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        spec: IntensitySpec | None = None,
        size: int | None = None,
        dtype: str | None = None,
        fit: str | None = None,
        verify: bool = True,
    ) -> None:
        """Opens a cache; with ``verify`` refuses it when files or requested settings differ,
        and always when its arrays are damaged (checked from their headers and ``items.npy``).

        Raises:
            CacheError: naming what changed and how to rebuild.
        """
        self.cache_dir = Path(cache_dir)
        # Without `verify` the source files and settings are not compared, but a damaged
        # images.npy / items.npy is refused all the same (it would fail mid-training).
        reasons, info, items = _cache_problems(self.cache_dir, spec, size, dtype, fit, fresh=verify)
        if reasons or info is None or items is None:
            raise CacheError(
                f"{self.cache_dir}: cache cannot be used:\n  "
                + "\n  ".join(reasons)
                + "\nRebuild it with: beitdomain data cache ... --out "
                + str(self.cache_dir)
            )
        self.root = info["root"]
        self.settings = info["settings"]
        self.files: list[dict[str, Any]] = info["files"]
        self.errors = [tuple(e) for e in info.get("errors", [])]
        self.items = items  # [N, 3]: row, file, frame
        self._rows = self.items[:, 0]
        self.reused = False
        self._images: np.ndarray | None = None
        # {classes, ignore_index, dtype} of the masks beside the images; None: no masks
        self.mask_record: dict[str, Any] | None = (
            info["masks"] if isinstance(info.get("masks"), dict) else None
        )
        self._masks: np.ndarray | None = None

    @property
    def images(self) -> np.ndarray:
        """The whole mapped array ``[rows, C, size, size]`` (opened lazily, read-only)."""
        if self._images is None:
            self._images = np.load(self.cache_dir / "images.npy", mmap_mode="r")
        return self._images

    @property
    def masks(self) -> np.ndarray:
        """The mapped label maps ``[rows, size, size]``, row k the mask of image row k.

        Raises:
            CacheError: the cache was built without masks.
        """
        if self.mask_record is None:
            raise CacheError(f"{self.cache_dir}: the cache holds no masks")
        if self._masks is None:
            self._masks = np.load(self.cache_dir / "masks.npy", mmap_mode="r")
        return self._masks

    def mask(self, i: int) -> np.ndarray:
        """Item ``i``'s mask ``[size, size]`` (a zero-copy view, the cache's mask dtype)."""
        return np.asarray(self.masks[self._rows[i]])

    def mask_path(self, i: int) -> str:
        """Item ``i``'s mask file as cache.json records it (relative to the root when inside)."""
        if self.mask_record is None:
            raise CacheError(f"{self.cache_dir}: the cache holds no masks")
        return self.files[self.items[i, 1]]["mask"]["path"]

    @property
    def spec(self) -> IntensitySpec:
        return IntensitySpec.from_config(self.settings["spec"])

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> np.ndarray:
        # np.asarray drops the memmap subclass but keeps the zero-copy view.
        return np.asarray(self.images[self._rows[i]])

    def source(self, i: int) -> tuple[str, int]:
        """(path relative to the root, frame index) of item ``i``."""
        _, f, frame = self.items[i]
        return self.files[f]["path"], int(frame)

    def label(self, i: int) -> str | None:
        return self.files[self.items[i, 1]]["label"]

    def split(self, i: int) -> str | None:
        return self.files[self.items[i, 1]]["split"]

    def group(self, i: int) -> str | None:
        """The file's group (patient, wafer, slide); None: its own (caches before groups)."""
        return self.files[self.items[i, 1]].get("group")

    @property
    def labels(self) -> list[str | None]:
        """Label of every item (frames inherit their file's label)."""
        per_file = [f["label"] for f in self.files]
        return [per_file[f] for f in self.items[:, 1]]

    @property
    def classes(self) -> list[str]:
        return sorted({f["label"] for f in self.files if f["label"] is not None})

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_images"] = None  # never pickle the mapped data; re-map in the worker
        state["_masks"] = None
        return state
