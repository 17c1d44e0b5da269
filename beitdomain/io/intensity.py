"""Intensity normalization to [0, 1] and the channel policy.

Readers return raw physical values (Hounsfield units for CT after Rescale Slope/Intercept,
counts for 16-bit TIFFs, 0-255 for photos). This module turns them into what the model sees:
float32 in [0, 1] with the number of channels the model expects. Keeping the two steps apart
lets the cache, the contact sheet and the training loader share one definition of "normalized".

Why not MONAI's ``ScaleIntensityRangePercentiles``/``ScaleIntensityRange``: they are three lines
of numpy here, and importing MONAI costs seconds of start-up in every loader worker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from beitdomain.io.errors import ReaderError
from beitdomain.user import UserError

# (center, width) in Hounsfield units; the usual radiology display presets.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "ct-lung": (-600.0, 1500.0),
    "ct-mediastinum": (50.0, 350.0),
    "ct-soft-tissue": (50.0, 400.0),
    "ct-abdomen": (40.0, 400.0),
    "ct-liver": (60.0, 160.0),
    "ct-bone": (400.0, 1800.0),
    "ct-brain": (40.0, 80.0),
    "ct-subdural": (75.0, 215.0),
    "ct-stroke": (40.0, 40.0),
}

NORMALIZE_MODES = ("auto", "window", "percentile", "dtype")
NONFINITE_POLICIES = ("error", "zero")
FRAME_POLICIES = ("all", "middle", "first", "every:K", "range:A:B")
SLICE_AXES = ("axial", "coronal", "sagittal")

# ITU-R BT.601 luma weights, the same as Pillow's "L" conversion.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class SpecError(UserError):
    """An intensity, channel or slice setting that cannot be used; names the key and the value."""


def parse_frames(policy: str) -> tuple[str, int, int | None]:
    """Parses a frame/slice policy into ``(kind, a, b)``.

    'all', 'middle', 'first'; 'every:K' keeps frames 0, K, 2K, ...; 'range:A:B' keeps frames
    A to B-1 (Python slice rules: negative counts from the end, B may be left out).

    Raises:
        SpecError: anything else, listing the valid forms.
    """
    text = str(policy).strip()
    bad = SpecError(
        f"frames={policy!r}; valid: all, middle, first, every:K (K >= 1, every K-th slice), "
        "range:A:B (slices A to B-1, e.g. range:10:50)"
    )
    if text in ("all", "middle", "first"):
        return text, 0, None
    kind, colon, rest = text.partition(":")
    if not colon:
        raise bad
    try:
        if kind == "every":
            k = int(rest)
            if k < 1:
                raise bad
            return "every", k, None
        if kind == "range":
            a, _, b = rest.partition(":")
            return "range", int(a or 0), int(b) if b.strip() else None
    except ValueError:
        raise bad from None
    raise bad


def frame_indices(n: int, policy: str) -> np.ndarray:
    """Indices of the frames (slices) that ``policy`` keeps out of ``n``; int64, ascending."""
    kind, a, b = parse_frames(policy)
    if kind == "middle":
        return np.array([n // 2], dtype=np.int64)
    if kind == "first":
        return np.zeros(1, dtype=np.int64)
    if kind == "every":
        return np.arange(0, n, a, dtype=np.int64)
    if kind == "range":
        return np.arange(n, dtype=np.int64)[slice(a, b)]
    return np.arange(n, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class IntensitySpec:
    """How raw pixel values become model input.

    Attributes:
        normalize: 'auto' (DICOM: recipe window, else the file's window, else percentile;
            other formats: percentile unless a window is given), 'window', 'percentile' or
            'dtype' (divide by the full range of the stored integer type / bits stored).
        window: A preset name from ``WINDOW_PRESETS`` or ``(center, width)``; None = not set.
        percentiles: Low and high percentile clipped to 0 and 1 in 'percentile' mode.
        in_chans: Channels the model takes: 1 (RGB -> luminance) or 3 (grayscale replicated).
        channels: Samples to keep from files with more than 3 (e.g. multispectral TIFF).
        nonfinite: NaN/Inf in float images: 'error' raises, 'zero' sets those pixels to 0.
        frames: Multi-frame files and volumes: 'all' keeps ``[S, C, H, W]``, 'middle'/'first'
            pick one, 'every:K' every K-th, 'range:A:B' slices A to B-1.
        slice_axis: Volumes (NIfTI, NRRD, MetaImage): slice 'axial', 'coronal' or 'sagittal'.
    """

    normalize: str = "auto"
    window: str | tuple[float, float] | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    in_chans: int = 1
    channels: tuple[int, ...] | None = None
    nonfinite: str = "error"
    frames: str = "all"
    slice_axis: str = "axial"

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZE_MODES:
            raise SpecError(f"normalize={self.normalize!r}; valid: {', '.join(NORMALIZE_MODES)}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise SpecError(f"nonfinite={self.nonfinite!r}; valid: 'error', 'zero'")
        parse_frames(self.frames)
        if self.slice_axis not in SLICE_AXES:
            raise SpecError(f"slice_axis={self.slice_axis!r}; valid: {', '.join(SLICE_AXES)}")
        if self.in_chans < 1:
            raise SpecError(f"in_chans={self.in_chans}; must be >= 1 (usually 1 or 3)")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise SpecError(f"percentiles={self.percentiles}; need 0 <= low < high <= 100")
        if self.window is not None:
            try:
                object.__setattr__(self, "window", _parse_window(self.window))
            except ValueError as e:
                raise SpecError(str(e)) from None
        if self.channels is not None:
            channels = tuple(int(c) for c in self.channels)
            if not channels or min(channels) < 0:
                raise SpecError(
                    f"channels={list(self.channels)}; give sample indices >= 0, e.g. [0, 1, 2]"
                )
            object.__setattr__(self, "channels", channels)
        object.__setattr__(self, "percentiles", (float(lo), float(hi)))

    @property
    def window_range(self) -> tuple[float, float] | None:
        """The recipe window as (low, high) in physical units, or None."""
        if self.window is None:
            return None
        center, width = resolve_window(self.window)
        return center - width / 2.0, center + width / 2.0

    @classmethod
    def from_config(cls, cfg: Any) -> IntensitySpec:
        """Builds a spec from any object (or mapping) with the same field names.

        ``window`` may be a preset name, ``(center, width)`` or ``{center: .., width: ..}``.
        Missing attributes keep their defaults.
        """
        get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d: getattr(cfg, k, d))
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            value = get(field.name, None)
            if value is not None:
                kwargs[field.name] = value
        if "percentiles" in kwargs:
            kwargs["percentiles"] = tuple(kwargs["percentiles"])
        try:
            return cls(**kwargs)
        except SpecError as e:
            if isinstance(cfg, Mapping):
                raise
            raise SpecError(f"data.{e}") from None  # a recipe's data section: name its key

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form; used by the cache to notice changed settings."""
        out = dataclasses.asdict(self)
        out["window"] = list(self.window) if isinstance(self.window, tuple) else self.window
        out["percentiles"] = list(self.percentiles)
        out["channels"] = list(self.channels) if self.channels is not None else None
        if out["slice_axis"] == "axial":
            del out["slice_axis"]  # the default: caches built before the key existed stay valid
        return out


def _parse_window(window: Any) -> str | tuple[float, float]:
    if isinstance(window, str):
        text = window.strip()
        if text in WINDOW_PRESETS:
            return text
        parts = text.split(",")
        if len(parts) == 2:
            try:
                return _check_width(float(parts[0]), float(parts[1]))
            except ValueError:
                pass
        raise ValueError(
            f"window={window!r} is neither a preset ({', '.join(sorted(WINDOW_PRESETS))}) "
            "nor 'CENTER,WIDTH' like '40,400'"
        )
    if isinstance(window, Mapping):
        if set(window) != {"center", "width"}:
            raise ValueError(f"window mapping {dict(window)!r} needs exactly keys center, width")
        return _check_width(float(window["center"]), float(window["width"]))
    try:
        center, width = window
    except (TypeError, ValueError):
        raise ValueError(f"window={window!r}: expected a preset name or (center, width)") from None
    return _check_width(float(center), float(width))


def _check_width(center: float, width: float) -> tuple[float, float]:
    if not width > 0:
        raise ValueError(f"window width must be > 0, got {width}")
    return (center, width)


def resolve_window(window: str | tuple[float, float]) -> tuple[float, float]:
    """Returns (center, width) for a preset name or a (center, width) pair."""
    if isinstance(window, str):
        return WINDOW_PRESETS[window]
    return float(window[0]), float(window[1])


def normalize(
    raw: np.ndarray, meta: Mapping[str, Any], spec: IntensitySpec, path: str = "<array>"
) -> tuple[np.ndarray, dict[str, Any]]:
    """Scales raw values to float32 [0, 1], applies inversion and the channel policy.

    Args:
        raw: Reader output, ``[S, C, H, W]`` of any real dtype.
        meta: Reader metadata (uses 'format', 'window', 'dtype', 'bits_stored', 'invert').
        spec: The normalization recipe.
        path: For error messages.

    Returns:
        ``(array, info)``: float32 ``[S, C', H, W]`` in [0, 1] and a dict describing what
        was done (mode, low, high) for the metadata.
    """
    x = np.asarray(raw)
    if x.ndim != 4:
        raise ReaderError(path, f"reader returned shape {x.shape}; expected [S, C, H, W]")
    x = _select_channels(x, spec, path)
    is_float = x.dtype.kind == "f"
    x = x.astype(np.float32, copy=False)

    finite = None
    if is_float:
        finite_mask = np.isfinite(x)
        if not finite_mask.all():
            bad = int(x.size - finite_mask.sum())
            if spec.nonfinite == "error":
                raise ReaderError(
                    path,
                    f"{bad} of {x.size} pixel values are NaN or Inf (set nonfinite: zero in the "
                    "recipe or --nonfinite zero to set them to 0, or fix the file)",
                )
            finite = finite_mask
    values = x[finite] if finite is not None else x
    if values.size == 0:
        raise ReaderError(path, "no finite pixel values to normalize")

    mode, lo, hi = _resolve_range(values, meta, spec, path)
    per_frame = meta.get("window_frames")
    if mode == "window" and spec.window is None and per_frame and len(per_frame) == x.shape[0]:
        # Enhanced multi-frame: each frame's own VOI window from its functional group.
        cw = np.asarray(per_frame, dtype=np.float32)  # [S, 2] center, width
        low = (cw[:, 0] - cw[:, 1] / 2)[:, None, None, None]
        out = np.subtract(x, low, dtype=np.float32)
        out /= cw[:, 1, None, None, None]
    else:
        scale = np.float32(1.0 / (hi - lo)) if hi > lo else np.float32(0.0)
        out = np.subtract(x, np.float32(lo), dtype=np.float32)
        out *= scale
    np.clip(out, 0.0, 1.0, out=out)
    if meta.get("invert"):
        # MONOCHROME1 / TIFF min-is-white: high stored values are dark.
        np.subtract(np.float32(1.0), out, out=out)
    if finite is not None:
        out[~finite] = 0.0
    out = apply_channel_policy(out, spec.in_chans, path)
    return out, {"mode": mode, "low": float(lo), "high": float(hi)}


def _select_channels(x: np.ndarray, spec: IntensitySpec, path: str) -> np.ndarray:
    c = x.shape[1]
    if spec.channels is not None:
        bad = [i for i in spec.channels if not 0 <= i < c]
        if bad:
            raise ReaderError(path, f"channels={list(spec.channels)} but the file has {c} samples")
        return x[:, list(spec.channels)]
    if c > 3:
        raise ReaderError(
            path,
            f"{c} samples per pixel; choose up to 3 with data.channels: [i, j, k] in the recipe "
            "(`beitdomain data cache --channels i,j,k`; likewise data inspect)",
        )
    return x


def _resolve_range(
    values: np.ndarray, meta: Mapping[str, Any], spec: IntensitySpec, path: str
) -> tuple[str, float, float]:
    mode = spec.normalize
    file_window = meta.get("window")
    if mode == "auto":
        dicom_window = meta.get("format") == "dicom" and file_window is not None
        mode = "window" if spec.window is not None or dicom_window else "percentile"
    if mode == "window":
        if spec.window is not None:
            center, width = resolve_window(spec.window)
        elif file_window is not None:
            center, width = float(file_window[0]), float(file_window[1])
        else:
            raise ReaderError(
                path,
                "normalize: window but no window given and the file has none "
                "(set window: ct-lung or window: {center: 40, width: 400})",
            )
        return "window", center - width / 2.0, center + width / 2.0
    if mode == "percentile":
        lo, hi = np.percentile(values, spec.percentiles)
        return "percentile", float(lo), float(hi)
    # dtype: the full range of what the file could store.
    lo, hi = dtype_range(meta, values)
    return "dtype", lo, hi


def dtype_range(meta: Mapping[str, Any], values: np.ndarray) -> tuple[float, float]:
    """The value range of the stored type: bits stored for integers, [0, 1] for floats."""
    dtype = np.dtype(meta.get("dtype", "float32"))
    if dtype.kind in "ui":
        bits = int(meta.get("bits_stored") or dtype.itemsize * 8)
        if dtype.kind == "u" or not meta.get("signed", dtype.kind == "i"):
            lo, hi = 0.0, float(2**bits - 1)
        else:
            lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
        # Rescale slope/intercept (DICOM) maps the stored range into physical units; with
        # per-frame rescales (Enhanced multi-frame) the range covers every frame's.
        pairs = meta.get("rescale_frames") or [meta.get("rescale", (1.0, 0.0))]
        ends = [v * slope + intercept for slope, intercept in pairs for v in (lo, hi)]
        return min(ends), max(ends)
    if dtype.kind == "b":
        return 0.0, 1.0
    # Float files have no intrinsic range; assume [0, 1] (what float TIFF exports usually mean).
    return 0.0, 1.0


def apply_channel_policy(x: np.ndarray, in_chans: int, path: str = "<array>") -> np.ndarray:
    """Maps ``[S, C, H, W]`` to ``[S, in_chans, H, W]``: luminance for 1, replication for 3."""
    c = x.shape[1]
    if c == in_chans:
        return x
    if in_chans == 1 and c == 3:
        # [S, 3, H, W] -> [S, 1, H, W]
        return np.einsum("schw,c->shw", x, _LUMA, dtype=np.float32)[:, None]
    if c == 1:
        return np.repeat(x, in_chans, axis=1)
    raise ReaderError(
        path,
        f"image has {c} channels but in_chans={in_chans}; pick them with data.channels: [...] "
        "in the recipe (`beitdomain data cache --channels i,j`; likewise data inspect)",
    )
