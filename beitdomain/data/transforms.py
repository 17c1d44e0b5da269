"""Augmentations: one random resized crop, two views (pre-training), or one view (fine-tuning).

Every call takes an explicit ``rng: np.random.Generator``. The dataset derives it from
``(seed, epoch, index)``, so an item's augmentation does not depend on the number of loader
workers, their order, or any process-global random state; resuming a run reproduces the
exact same tensors.

Why cv2/numpy instead of an albumentations ``Compose``: albumentations 2.x seeds a pipeline
through ``Compose(..., seed=...)`` / ``Compose.set_random_seed(seed)``, which we would have to
call before every item. Measured on this machine (one core, 256 -> 224 uint8, crop + flip +
brightness/contrast + gamma): 3,826 img/s without reseeding, 2,156 img/s with
``set_random_seed`` per call, for a single view; two views from one crop would also need a
replayed second pipeline. The handful of ops written here produce both views at well above
that (see benchmarks/data_loading.py), and take their randomness only from ``rng``.

Intensity jitter is domain-safe: brightness, contrast and gamma, the same for every channel;
no hue or saturation changes that would invent colours in grayscale modalities. For uint8
input it is one 256-entry lookup table that also converts to float32 (``cv2.LUT``).

A recipe may instead name its own pipeline (``data.augment``: an albumentations file or a MONAI
transform's import path); ``UserAugment`` reseeds it per item from the same ``rng``, so the
promises above hold for it too, at its own speed (BENCHMARKS.md).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from beitdomain.data.mask_files import MaskClasses
from beitdomain.user import UserError
from beitdomain.view import CROP_PCT, EvalView

# Deterministic regardless of cv2's thread count, but a loader worker should not spawn a
# thread pool per process on top of the DataLoader's own parallelism.
cv2.setNumThreads(1)


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Samples a crop ``(top, left, h, w)`` covering ``scale`` of the area with aspect ``ratio``.

    The same algorithm as torchvision's RandomResizedCrop: 10 tries, then a center crop.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    # All draws in one call: per-call overhead of Generator methods dominates at this size.
    u = rng.random(40).tolist()
    for k in range(0, 40, 4):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[k])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[k + 1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[k + 2] * (height - h + 1)), height - h)
            left = min(int(u[k + 3] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _hwc(image: np.ndarray) -> np.ndarray:
    """``[C, H, W]`` -> cv2 layout: ``[H, W]`` for one channel, else ``[H, W, C]``."""
    if image.dtype == np.float16:
        image = image.astype(np.float32)
    if image.shape[0] == 1:
        return image[0]
    return np.ascontiguousarray(image.transpose(1, 2, 0))


def _chw(image: np.ndarray) -> np.ndarray:
    return image[None] if image.ndim == 2 else np.ascontiguousarray(image.transpose(2, 0, 1))


def _scale_of(dtype: np.dtype) -> float:
    return {np.dtype(np.uint8): 1 / 255.0, np.dtype(np.uint16): 1 / 65535.0}.get(dtype, 1.0)


class IntensityJitter:
    """Brightness, contrast and gamma jitter of strength ``s``; output float32 in [0, 1].

    Factors: gamma ``exp(U(-s, s))``, contrast ``1 + U(-s, s)`` around 0.5, brightness
    ``U(-s, s)``: ``y = clip((x ** gamma - 0.5) * contrast + 0.5 + brightness, 0, 1)``.
    """

    def __init__(self, strength: float = 0.1) -> None:
        if not 0 <= strength < 1:
            raise ValueError(f"intensity jitter strength {strength}; use 0 (off) up to ~0.3")
        self.strength = strength

    def sample(self, rng: np.random.Generator) -> tuple[float, float, float] | None:
        """Draws (gamma, contrast, brightness); None when jitter is off."""
        s = self.strength
        if s == 0:
            return None
        g, c, b = (s * (2.0 * x - 1.0) for x in rng.random(3).tolist())
        return math.exp(g), 1.0 + c, b

    @staticmethod
    def uint8_table(params: tuple[float, float, float] | None) -> np.ndarray:
        """The jitter as a 256-entry float32 lookup table for uint8 images."""
        lut = _UINT8_GRID if params is None else _curve(_UINT8_GRID.copy(), params)
        return lut.reshape(256, 1)

    @staticmethod
    def apply(
        image: np.ndarray,
        params: tuple[float, float, float] | None,
        table: np.ndarray | None = None,
    ) -> np.ndarray:
        """Applies jitter to an image in cv2 layout of any cached dtype; float32 out.

        ``table`` (from ``uint8_table(params)``) saves rebuilding it for a second view.
        """
        if image.dtype == np.uint8:
            table = IntensityJitter.uint8_table(params) if table is None else table
            # One pass: lookup + convert to float32 (cv2.LUT keeps the table's depth).
            return cv2.LUT(image, table).reshape(image.shape)
        x = image.astype(np.float32) * np.float32(_scale_of(image.dtype))
        return x if params is None else _curve(x, params)


_UINT8_GRID = np.arange(256, dtype=np.float32) / np.float32(255.0)


def _curve(x: np.ndarray, params: tuple[float, float, float]) -> np.ndarray:
    gamma, contrast, brightness = params
    # np.maximum/np.minimum instead of np.clip: same result, less Python overhead per call.
    y = np.power(np.maximum(x, 0.0, out=x), np.float32(gamma), out=x)
    y *= np.float32(contrast)
    y += np.float32(0.5 - 0.5 * contrast + brightness)  # (y - 0.5) * c + 0.5 + b
    np.maximum(y, 0.0, out=y)
    return np.minimum(y, 1.0, out=y)


class _RandomView:
    """What both training views share: a random resized crop, bicubic to ``image_size``, random
    flips, and the intensity jitter (sampled by the caller, after the flips).

    ``transpose`` swaps the view's rows and columns (a reflection across the diagonal). With
    ``hflip`` and ``vflip`` at 0.5 and ``transpose`` at 0.5 every one of the square's eight
    symmetries (rotations by 90 degrees included) is equally likely. Its draw is taken only
    when ``transpose`` > 0, so recipes without it see the same random stream as before."""

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        hflip: float,
        vflip: float,
        intensity: float,
        transpose: float = 0.0,
    ) -> None:
        self.image_size = image_size
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.hflip, self.vflip, self.transpose = hflip, vflip, transpose
        self.jitter = IntensityJitter(intensity)

    def _crop_flip(
        self, image: np.ndarray, rng: np.random.Generator, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """image [C, H, W] -> the cropped, resized and flipped view [size, size(, C)] (cv2),
        and `mask` [H, W] (int32) through the same crop and flips, nearest neighbour (a class
        index is never blended), or None. The draws do not depend on the mask: box, flips."""
        _, height, width = image.shape
        top, left, h, w = random_resized_crop_box(height, width, rng, self.scale, self.ratio)
        crop = _hwc(image[:, top : top + h, left : left + w])
        size = self.image_size
        view = cv2.resize(crop, (size, size), interpolation=cv2.INTER_CUBIC)
        mview = None
        if mask is not None:
            mview = cv2.resize(
                np.ascontiguousarray(mask[top : top + h, left : left + w]),
                (size, size),
                interpolation=cv2.INTER_NEAREST_EXACT,
            )
        flip_h = rng.random() < self.hflip
        flip_v = rng.random() < self.vflip
        if flip_h or flip_v:
            code = -1 if (flip_h and flip_v) else (1 if flip_h else 0)
            view = cv2.flip(view, code)
            mview = None if mview is None else cv2.flip(mview, code)
        if self.transpose > 0 and rng.random() < self.transpose:
            view = np.ascontiguousarray(np.swapaxes(view, 0, 1))
            mview = None if mview is None else np.ascontiguousarray(mview.T)
        return view, mview


class PretrainTransform(_RandomView):
    """One random resized crop -> backbone view and tokenizer view of the same content.

    ``transform(image [C, H, W], rng) -> (view [C, image_size, image_size],
    tok_view [C, tokenizer_size, tokenizer_size])``, both float32 in [0, 1]. The crop, flips
    and intensity jitter are shared, so the tokens describe exactly what the backbone sees.
    The backbone view is bicubic (as in BEiT); the tokenizer view is an area-average of it
    (anti-aliased; cheap when ``image_size`` is a multiple of ``tokenizer_size``).
    """

    def __init__(
        self,
        image_size: int = 224,
        tokenizer_size: int = 112,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        vflip: float = 0.0,
        intensity: float = 0.1,
        transpose: float = 0.0,
    ) -> None:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale {scale}; need 0 < low <= high <= 1")
        super().__init__(image_size, scale, ratio, hflip, vflip, intensity, transpose)
        self.tokenizer_size = tokenizer_size

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        view, _ = self._crop_flip(image, rng)
        tok = cv2.resize(view, (self.tokenizer_size,) * 2, interpolation=cv2.INTER_AREA)
        params = self.jitter.sample(rng)
        table = IntensityJitter.uint8_table(params) if view.dtype == np.uint8 else None
        view = IntensityJitter.apply(view, params, table)
        tok = IntensityJitter.apply(tok, params, table)
        if view.dtype != np.uint8 and params is None:
            np.clip(view, 0.0, 1.0, out=view)  # bicubic overshoot on float input
            np.clip(tok, 0.0, 1.0, out=tok)
        return _chw(view), _chw(tok)


class FinetuneTransform(_RandomView):
    """Fine-tuning / evaluation view: ``transform(image [C, H, W], rng) -> [C, size, size]``.

    Training: random resized crop, flips and intensity jitter as in pre-training. Evaluation
    (``train=False``): `beitdomain.view.EvalView`, the shorter side resized to
    ``round(image_size / crop_pct)`` and a centred square cut out (timm's convention), no
    randomness.
    """

    def __init__(
        self,
        train: bool,
        image_size: int = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        vflip: float = 0.0,
        intensity: float = 0.1,
        crop_pct: float = CROP_PCT,
        transpose: float = 0.0,
    ) -> None:
        super().__init__(image_size, scale, ratio, hflip, vflip, intensity, transpose)
        self.train = train
        self.crop_pct = crop_pct

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        size = self.image_size
        if not self.train:
            _, h, w = image.shape
            ev = EvalView(size, self.crop_pct)  # the exports describe this same view
            nh, nw = ev.resized_shape(h, w)
            hwc = _hwc(image)
            interp = cv2.INTER_AREA if nh < h else cv2.INTER_CUBIC
            resized = cv2.resize(hwc, (nw, nh), interpolation=interp)
            y, x = ev.crop_origin(nh, nw)
            view = np.ascontiguousarray(resized[y : y + size, x : x + size])
            out = IntensityJitter.apply(view, None)
            return _chw(np.clip(out, 0.0, 1.0, out=out))
        if rng is None:
            raise ValueError("a training transform needs rng (np.random.default_rng(...))")
        view, _ = self._crop_flip(image, rng)
        out = IntensityJitter.apply(view, self.jitter.sample(rng))
        return _chw(np.clip(out, 0.0, 1.0, out=out))


class SegmentTransform(_RandomView):
    """Segmentation view: ``transform(image [C, H, W], mask [H, W], rng) -> (view [C, size,
    size] float32, mask view [size, size] int64)``.

    Training: the crop box and flips of ``FinetuneTransform`` (the same draws from ``rng``, so
    the image view is exactly the classification one), applied to the mask too, nearest
    neighbour (a class index is never blended); the intensity jitter touches the image only.
    Evaluation (``train=False``): image and mask resized whole to ``size x size``, so every
    annotated pixel is scored (no center crop).
    """

    def __init__(
        self,
        train: bool,
        image_size: int = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        vflip: float = 0.0,
        intensity: float = 0.1,
        transpose: float = 0.0,
    ) -> None:
        super().__init__(image_size, scale, ratio, hflip, vflip, intensity, transpose)
        self.train = train

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if mask.shape != image.shape[1:]:
            raise ValueError(f"mask {list(mask.shape)} does not match image {list(image.shape)}")
        _, height, width = image.shape
        size = self.image_size
        labels = mask.astype(np.int32, copy=False)  # cv2 resizes and flips int32, not int64
        if not self.train:
            interp = cv2.INTER_AREA if size < min(height, width) else cv2.INTER_CUBIC
            view = cv2.resize(_hwc(image), (size, size), interpolation=interp)
            mview = cv2.resize(labels, (size, size), interpolation=cv2.INTER_NEAREST_EXACT)
            out = IntensityJitter.apply(view, None)
            return _chw(np.clip(out, 0.0, 1.0, out=out)), mview.astype(np.int64)
        if rng is None:
            raise ValueError("a training transform needs rng (np.random.default_rng(...))")
        view, mview = self._crop_flip(image, rng, labels)  # the classification view's draws
        assert mview is not None
        out = IntensityJitter.apply(view, self.jitter.sample(rng))
        return _chw(np.clip(out, 0.0, 1.0, out=out)), mview.astype(np.int64)


# --------------------------------------------------------------------------------------------
# The user's own pipelines: albumentations (serialized) or MONAI (an import path)
# --------------------------------------------------------------------------------------------

_ALBU_SUFFIXES = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}


class AugmentError(UserError):
    """`data.augment` names something that cannot be loaded; says what and what would work."""


def load_user_pipeline(spec: str) -> tuple[str, Any]:
    """Loads `data.augment`: ('albumentations', Compose) or ('callable', transform).

    Args:
        spec: A file saved with ``albumentations.save(pipeline, path)`` (.json / .yaml), or
            ``'package.module:name'``: an importable object that either is a transform (has
            ``__call__`` and is not a class or function) or builds one when called with no
            arguments (e.g. a function returning a ``monai.transforms.Compose``). Importing
            it runs that module's code, like any plugin: name only code you trust.

    Raises:
        AugmentError: a missing file, a package that is not installed, a bad import path.
    """
    path = Path(spec)
    if path.suffix.lower() in _ALBU_SUFFIXES:
        if not path.is_file():
            raise AugmentError(f"data.augment: {spec}: file not found")
        try:
            import albumentations as A
        except ImportError:
            raise AugmentError(
                f"data.augment: {spec} is an albumentations pipeline, and albumentations is not "
                "installed: pip install 'beitdomain[augment]'"
            ) from None
        try:
            pipeline = A.load(str(path), data_format=_ALBU_SUFFIXES[path.suffix.lower()])
        except Exception as e:
            raise AugmentError(
                f"data.augment: {spec} is not an albumentations pipeline saved with "
                f"albumentations.save: {type(e).__name__}: {e}"
            ) from None
        return "albumentations", pipeline
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise AugmentError(
            f"data.augment = {spec!r}: give an albumentations pipeline file (.json, .yaml) or "
            "an import path 'package.module:name' of a transform or a function that builds one"
        )
    import importlib
    import inspect

    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise AugmentError(f"data.augment = {spec!r}: cannot import it: {e}") from None
    if inspect.isclass(obj) or inspect.isfunction(obj):
        obj = obj()  # a factory: builds the transform
    if not callable(obj):
        raise AugmentError(f"data.augment = {spec!r} is a {type(obj).__name__}, not a transform")
    return "callable", obj


def _seed_pipeline(kind: str, pipeline: Any, seed: int) -> None:
    if kind == "albumentations":
        pipeline.set_random_seed(seed)
    elif hasattr(pipeline, "set_random_state"):  # MONAI Randomizable / Compose
        pipeline.set_random_state(seed=seed)


def _as_chw(out: Any, channels: int, kind: str) -> np.ndarray:
    """A pipeline's output as float32 ``[C, H, W]`` in [0, 1]."""
    if isinstance(out, dict):  # albumentations returns {'image': ...}
        out = out["image"]
    if hasattr(out, "detach"):  # torch tensor / MONAI MetaTensor
        out = out.detach().cpu().numpy()
    x = np.asarray(out, dtype=np.float32)
    if kind == "albumentations":  # [H, W] or [H, W, C]
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    if x.ndim != 3 or x.shape[0] != channels:
        raise AugmentError(
            f"data.augment returned shape {list(x.shape)}; expected [{channels}, H, W] "
            "(MONAI, channel first) or [H, W(, C)] (albumentations)"
        )
    return np.ascontiguousarray(np.clip(x, 0.0, 1.0))


class UserAugment:
    """The user's pipeline in place of the built-in augmentations, reproducibly.

    ``transform(image [C, H, W] float32, rng)`` reseeds the pipeline from ``rng`` (the
    dataset's generator for (seed, epoch, index)), so every item is a pure function of those
    three: any number of workers and a resumed run see the same batches. The pipeline runs
    once per item; in pre-training the backbone view is its output resized to ``image_size``
    and the tokenizer view an area-average of that view, so both come from one crop.

    Args:
        spec: `data.augment` (see ``load_user_pipeline``).
        image_size: backbone view size.
        tokenizer_size: tokenizer view size; None for fine-tuning (one view).
    """

    def __init__(self, spec: str, image_size: int, tokenizer_size: int | None = None) -> None:
        self.spec = spec
        self.kind, self.pipeline = load_user_pipeline(spec)
        self.image_size = image_size
        self.tokenizer_size = tokenizer_size

    def _run(
        self, image: np.ndarray, rng: np.random.Generator | None, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, Any]:
        """The pipeline reseeded from `rng` on `image` (and `mask`, albumentations' mask
        target): (the augmented image in cv2 layout, float32; the pipeline's raw output)."""
        if rng is None:
            raise ValueError("a training transform needs rng (np.random.default_rng(...))")
        _seed_pipeline(self.kind, self.pipeline, int(rng.integers(2**31 - 1)))
        # [0, 1] whatever the source holds: a cache's uint8 / uint16 values are scaled back
        x = image.astype(np.float32, copy=False)
        if image.dtype in (np.uint8, np.uint16):
            x = x * np.float32(_scale_of(image.dtype))
        if self.kind == "albumentations":
            targets = {"image": np.ascontiguousarray(_hwc(x))}
            if mask is not None:
                targets["mask"] = mask
            out = self.pipeline(**targets)
        else:
            out = self.pipeline(np.array(x))  # a copy: MONAI may work in place
        return _hwc(_as_chw(out, image.shape[0], self.kind)), out

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> Any:
        aug, _ = self._run(image, rng)
        size = self.image_size
        view = cv2.resize(aug, (size, size), interpolation=cv2.INTER_CUBIC)
        np.clip(view, 0.0, 1.0, out=view)
        if self.tokenizer_size is None:
            return _chw(view)
        tok = cv2.resize(view, (self.tokenizer_size,) * 2, interpolation=cv2.INTER_AREA)
        return _chw(view), _chw(tok)


def _label_dtype(mask: np.ndarray) -> type:
    """The narrowest of uint8, uint16, int32 that holds `mask`'s values: albumentations' (cv2's)
    transforms take uint8 and uint16 with every interpolation, int32 with nearest only."""
    lo, hi = (int(mask.min()), int(mask.max())) if mask.size else (0, 0)
    if lo >= 0 and hi < 2**8:
        return np.uint8
    return np.uint16 if lo >= 0 and hi < 2**16 else np.int32


class UserSegmentAugment(UserAugment):
    """The user's albumentations pipeline on an image and its mask together, reproducibly.

    ``transform(image [C, H, W], mask [H, W], rng) -> (view [C, size, size] float32, mask view
    [size, size] int64)``. The mask goes in as albumentations' ``mask`` target, so geometric
    transforms move it with the image (nearest neighbour: albumentations' default
    ``mask_interpolation``) and pixel-level ones leave it alone; the pipeline is reseeded from
    ``rng`` as `UserAugment` does for classification, so an item is a pure function of
    (seed, epoch, index) and a resumed fine-tune sees the same batches. The output is resized
    to ``image_size`` (image bicubic, mask nearest neighbour).

    Args:
        spec: `data.augment`: an albumentations pipeline file (a MONAI transform or other
            callable sees only the image, so it is refused).
        image_size: view size.
        classes: the values a mask may hold (`masks.MaskClasses`): its classes and the
            ignore index.

    Raises:
        AugmentError: `spec` is not an albumentations pipeline.
    """

    train = True  # MaskDataset hands it the item's generator

    def __init__(self, spec: str, image_size: int, classes: MaskClasses) -> None:
        super().__init__(spec, image_size)
        if self.kind != "albumentations":
            raise AugmentError(
                f"data.augment = {spec!r} is a transform of images only, which would move an "
                "image away from its mask; for segmentation give an albumentations pipeline "
                "file (.json / .yaml from albumentations.save): its geometric transforms move "
                "the mask with the image"
            )
        self.classes = classes

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if mask.shape != image.shape[1:]:
            raise ValueError(f"mask {list(mask.shape)} does not match image {list(image.shape)}")
        labels = np.ascontiguousarray(mask, dtype=_label_dtype(mask))
        aug, out = self._run(image, rng, labels)
        mout = np.asarray(out["mask"])
        if mout.ndim == 3 and mout.shape[-1] == 1:
            mout = mout[..., 0]
        if mout.shape != aug.shape[:2]:
            raise AugmentError(
                f"data.augment ({self.spec}) returned a mask of {list(mout.shape)} for an image "
                f"of {list(aug.shape[:2])}; a mask must keep its image's grid"
            )
        bad = self.classes.outside(mout)
        if bad:  # a blending mask_interpolation, or borders filled with a value of no class
            raise AugmentError(
                f"data.augment ({self.spec}) made mask values {bad}, outside the classes "
                f"{self.classes.allowed}: masks must move with nearest neighbour "
                "(mask_interpolation=0) and borders be filled with a class or the ignore index "
                "(fill_mask)"
            )
        size = self.image_size
        view = cv2.resize(aug, (size, size), interpolation=cv2.INTER_CUBIC)
        np.clip(view, 0.0, 1.0, out=view)
        mview = cv2.resize(
            mout.astype(np.int32, copy=False), (size, size), interpolation=cv2.INTER_NEAREST_EXACT
        )
        return _chw(view), mview.astype(np.int64)


def training_transform(d: Any, image_size: int, tokenizer_size: int | None = None) -> Any:
    """The training views a recipe's `data` section asks for: its own `data.augment` pipeline,
    or the built-in crop, flips and intensity jitter.

    Args:
        d: the recipe's `data` section (any object with its field names).
        image_size: backbone view size.
        tokenizer_size: tokenizer view size for pre-training's (view, tokenizer view) pair;
            None for fine-tuning's one view.
    """
    if d.augment:
        return UserAugment(d.augment, image_size, tokenizer_size)
    augment: dict[str, Any] = {
        "scale": tuple(d.crop_scale),
        "hflip": d.hflip,
        "vflip": d.vflip,
        "intensity": d.intensity_jitter,
        "transpose": d.transpose,
    }
    if tokenizer_size is None:
        return FinetuneTransform(train=True, image_size=image_size, **augment)
    return PretrainTransform(image_size=image_size, tokenizer_size=tokenizer_size, **augment)


def segment_training_transform(d: Any, image_size: int, classes: MaskClasses) -> Any:
    """The training view of an (image, mask) pair a recipe's `data` section asks for: its own
    `data.augment` albumentations pipeline (`UserSegmentAugment`), or the built-in crop, flips
    and intensity jitter (`SegmentTransform`).

    Args:
        d: the recipe's `data` section (any object with its field names).
        image_size: view size.
        classes: the values a mask may hold (its classes, the ignore index).
    """
    if d.augment:
        return UserSegmentAugment(d.augment, image_size, classes)
    return SegmentTransform(
        train=True,
        image_size=image_size,
        scale=tuple(d.crop_scale),
        hflip=d.hflip,
        vflip=d.vflip,
        intensity=d.intensity_jitter,
        transpose=d.transpose,
    )
