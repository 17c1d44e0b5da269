"""Masks as labels: one label-map file per image, read by the project's readers, checked up front.

A mask is a label map the readers understand (PNG or TIFF, a NIfTI label volume sliced like its
image volume): pixel value i is `segment.classes[i]`, and `segment.ignore_index` (when set)
marks pixels no one annotated. Images and masks are paired either by a `mask` column in the
labels CSV (`path,mask[,split[,group]]`, both relative to the data root) or by a folder that
mirrors the data root (`segment.masks`: the same relative path, any image suffix).

Every pair is checked before training: a mask whose size differs from its image's, or that holds
values outside the classes, is a `MaskError` naming both files.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from beitdomain.data.budget import CARVE_FRACTION, FINETUNE_SELECTIONS, carve_validation
from beitdomain.data.cache import CachedImages, CacheError, CacheMasks, build_cache
from beitdomain.data.index import scan
from beitdomain.data.mask_files import (
    MASK_SUFFIXES,
    MaskClasses,
    MaskError,
    MaskPair,
    load_pair,
    load_pairs,
    pairs_from_csv,
    pairs_from_folder,
    read_mask,
)
from beitdomain.data.splits import (
    describe_subset,
    differs_from_asked,
    group_label_subset,
    group_split,
    split_summary,
)
from beitdomain.data.transforms import SegmentTransform, segment_training_transform
from beitdomain.io import IntensitySpec
from beitdomain.labels import parse_labels_spec
from beitdomain.user import UserError

__all__ = [
    "MASK_SUFFIXES",
    "CachedPairs",
    "MaskClasses",
    "MaskDataset",
    "MaskError",
    "MaskPair",
    "SegmentData",
    "cache_pairs",
    "cached_pairs",
    "load_pair",
    "load_pairs",
    "pairs_from_csv",
    "pairs_from_folder",
    "read_mask",
    "recipe_pairs",
    "segment_data",
]

log = logging.getLogger(__name__)


class MaskDataset:
    """(image, mask) items through a `SegmentTransform` (or the user's `UserSegmentAugment`),
    as dicts of tensors:
    ``{'image': [C, S, S] float32, 'mask': [S, S] int64, 'index': int64}``.

    A training item's augmentation comes from a generator of ``(seed, epoch, item)``, as
    `ImageDataset`'s do, so an epoch's batches are the same after a resume and with any number
    of loader workers (`sampler.EpochIndex` carries the epoch to them).

    Args:
        items: every item of the data, ``(image [C, H, W], mask [H, W])``.
        transform: `SegmentTransform` or `UserSegmentAugment` (train=True draws from the
            item's generator).
        seed: base seed of the per-item generators.
        indices: the items of this split (or label subset).
    """

    def __init__(
        self,
        items: Sequence[tuple[np.ndarray, np.ndarray]],
        transform: Any,
        seed: int = 0,
        indices: Sequence[int] | None = None,
    ) -> None:
        self.items = items
        self.transform = transform
        self.seed = int(seed)
        self.indices = np.arange(len(items)) if indices is None else np.asarray(indices)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        src = int(self.indices[i])
        image, mask = self.items[src]
        if getattr(self.transform, "train", False):
            epoch = int(getattr(i, "epoch", self.epoch))
            view, mview = self.transform(
                image, mask, np.random.default_rng([self.seed, epoch, src])
            )
        else:
            view, mview = self.transform(image, mask)
        return {
            "image": torch.from_numpy(view),
            "mask": torch.from_numpy(mview),
            "index": torch.tensor(src, dtype=torch.int64),
        }


@dataclass
class SegmentData:
    """Everything a segmentation fine-tune needs to know about its masks.

    `subset` is `splits.describe_subset` of the label subset (counted in annotated image
    files), with the split summary and the selection mode, for labels.json and results.json.
    `files` maps each split to the ``(image, mask)`` paths it holds (labels_used.csv).
    """

    train: MaskDataset
    val: MaskDataset | None
    test: MaskDataset | None
    fingerprint: str
    subset: dict[str, Any]
    files: dict[str, list[tuple[str, str]]]
    items: Sequence[tuple[np.ndarray, np.ndarray]]  # every item; `item_file[k]` is its pair
    item_file: np.ndarray


def recipe_pairs(recipe: Any) -> list[MaskPair]:
    """The recipe's (image, mask) pairs: `data.labels`'s `mask` column, else `segment.masks`
    mirroring `data.root`.

    Raises:
        UserError: no data root, or neither a labels CSV nor a mask folder.
    """
    d, seg = recipe.data, recipe.segment
    if not d.root:
        raise UserError(
            "finetune.task=segment needs data.root: the folder the labels CSV's "
            "path and mask columns are relative to"
        )
    if d.labels:
        return pairs_from_csv(d.labels, d.root, d.allow_outside_root)
    if seg.masks:
        root, masks = Path(d.root), Path(seg.masks).resolve()
        images = [
            p
            for p in sorted(root.rglob("*"))
            if p.is_file()
            and not p.name.startswith(".")
            and not p.resolve().is_relative_to(masks)
            and p.suffix.lower() not in (".csv", ".json", ".txt", ".md", ".yaml", ".yml")
        ]
        return pairs_from_folder(images, root, masks)
    raise UserError(
        "finetune.task=segment needs masks: a labels CSV with path and mask columns "
        "(data.labels) or segment.masks, a folder mirroring data.root"
    )


def split_pairs(recipe: Any, pairs: Sequence[MaskPair]) -> dict[str, np.ndarray]:
    """The train / val / test positions of `pairs`, by image file with groups kept together
    (`splits.group_split`; a split column used as given): the split a segmentation fine-tune
    scores on, and what pre-training on the same images leaves out (`split_labels_csv`)."""
    d = recipe.data
    given = [p.split for p in pairs]
    if any(s is not None for s in given) and any(s is None for s in given):
        missing = [_rel(p.image, Path(d.root)) for p in pairs if p.split is None][:5]
        raise UserError(
            f"the labels give a split for some images but not for {missing}; give a split for "
            "every image or for none"
        )
    return group_split(
        ["annotated"] * len(pairs),  # one stratum: a fraction counts annotated images
        [p.group for p in pairs],
        d.val_fraction,
        d.test_fraction,
        d.split_seed,
        given if given and given[0] is not None else None,
    )


def split_labels_csv(recipe: Any, out: Path) -> Path:
    """Writes `out`, a `path,label,split,group` CSV of the masks' images (label `annotated`)
    with the split the segmentation fine-tune will use, and returns it: the tokenizer and
    pre-training read it like any labels CSV, so they see only the images (not the mask files
    beside them) and leave the test split's out."""
    pairs = recipe_pairs(recipe)
    split = split_pairs(recipe, pairs)
    of = {int(i): name for name, idx in split.items() for i in idx}
    root = Path(recipe.data.root)
    rows = [["path", "label", "split", "group"]]
    for k, pair in enumerate(pairs):
        rows.append([_rel(pair.image, root), "annotated", of.get(k, "train"), pair.group or ""])
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return out


def _fingerprint(pairs: Sequence[MaskPair], root: Path, classes: MaskClasses) -> str:
    h = hashlib.sha256(repr((classes.names, classes.ignore_index)).encode())
    for p in pairs:
        for f in (p.image, p.mask):
            st = f.stat()
            h.update(f"{_rel(f, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        h.update(f"{p.split}\0{p.group}\n".encode())
    return "masks:" + h.hexdigest()


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------
# Pairs in a cache: decoded once, each mask beside its image at the cached size
# --------------------------------------------------------------------------------------------


def cache_pairs(
    recipe: Any,
    out_dir: str | os.PathLike,
    size: int,
    dtype: str = "uint8",
    fit: str = "squash",
    workers: int = 0,
    hash_files: bool = False,
    progress: bool = False,
    force: bool = False,
) -> Any:
    """`beitdomain data cache --recipe` for a segmentation recipe: the recipe's (image, mask)
    pairs decoded once into `out_dir`, each mask beside its image at the image's cached size
    (nearest neighbour), every pair read and checked as the fine-tune checks it. A fine-tune
    with ``data.cache: out_dir`` then reads the pairs from it (`segment_data`).

    The cache's files are the pairs' images in the labels' order, label ``annotated``, with
    the split and group the labels give (none: the fine-tune draws the split, as without a
    cache), so the splits and label subsets are those of the uncached fine-tune.

    Args:
        recipe: a recipe with `finetune.task: segment` (its data and segment sections).
        out_dir: the cache folder.
        size: the working resolution (the CLI's `cache_size_for(data.image_size)`).
        dtype, fit, workers, hash_files, progress, force: as for `cache.build_cache`.

    Returns:
        The opened cache (`CachedImages`, with `.masks`).

    Raises:
        MaskError / UserError: a bad pair, no pairs; CacheError: --out is not a cache folder.
    """
    d = recipe.data
    classes = MaskClasses.from_config(recipe.segment)
    pairs = recipe_pairs(recipe)
    root = Path(d.root)
    spec = IntensitySpec.from_config(d)
    with tempfile.TemporaryDirectory(prefix="beitdomain-masks-") as tmp:
        listed = Path(tmp) / "images.csv"
        with open(listed, "w", newline="") as f:
            rows = [[_rel(p.image, root), "annotated", p.split or "", p.group or ""] for p in pairs]
            csv.writer(f).writerows([["path", "label", "split", "group"], *rows])
        manifest = scan(
            root,
            listed,
            on_error="fail",
            allow_outside_root=d.allow_outside_root,
            workers=workers,
            progress=progress,
            spec=spec,
            patient_groups=False,  # the labels' groups only, as the uncached fine-tune has
            dicom_series=d.dicom_series,
        )
    order = {p.image.resolve(): k for k, p in enumerate(pairs)}  # a split depends on order
    manifest.entries.sort(key=lambda e: order[manifest.abspath(e).resolve()])
    masks = CacheMasks({p.image: p.mask for p in pairs}, classes.names, classes.ignore_index)
    return build_cache(
        manifest,
        out_dir,
        size=size,
        dtype=dtype,
        spec=spec,
        fit=fit,
        workers=workers,
        hash_files=hash_files,
        on_error="fail",
        progress=progress,
        force=force,
        masks=masks,
    )


class CachedPairs(Sequence):
    """A cache's items as ``(image [C, size, size], mask [size, size])`` in its dtypes (the
    transforms scale a uint8 / uint16 image to [0, 1]); pickles without the mapped arrays."""

    def __init__(self, cached: Any) -> None:
        self.cached = cached

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, k: Any) -> tuple[np.ndarray, np.ndarray]:
        return self.cached[k], self.cached.mask(k)


def cached_pairs(recipe: Any, classes: MaskClasses) -> tuple[Any, list[MaskPair]]:
    """Opens `data.cache` for a segmentation fine-tune: the cache and its pairs, in its order.

    The rules of the classification path (`source.image_source`): a cache whose files (images
    and masks) or normalization changed since it was built is refused, naming what changed;
    the labels beside it (`data.labels` / `segment.masks`), when given, must name the pairs,
    splits and groups it holds, and the recipe's classes must be those it was checked with.

    Raises:
        CacheError: no cache of pairs at `data.cache`, a stale or damaged one, other classes.
        UserError: labels that do not match the cache's pairs.
    """
    d = recipe.data
    rebuild = f"beitdomain data cache --recipe RECIPE --out {d.cache}"
    if not (Path(d.cache) / "cache.json").is_file():
        raise CacheError(
            f"data.cache ({d.cache}): no cache there, and a cache of images without their masks "
            f"would not do; build one of this recipe's pairs: {rebuild}"
        )
    cached = CachedImages(d.cache, spec=IntensitySpec.from_config(d))
    record = cached.mask_record
    if record is None:
        raise CacheError(
            f"data.cache ({d.cache}) holds images without their masks; a segmentation "
            f"fine-tune needs a cache of its pairs: {rebuild}"
        )
    differ = [
        f"segment.{key}: {record.get(key)!r} in the cache, {want!r} in the recipe"
        for key, want in (("classes", list(classes.names)), ("ignore_index", classes.ignore_index))
        if record.get(key) != want
    ]
    if differ:
        raise CacheError(
            f"{d.cache}: cache cannot be used: its masks were checked with other classes ("
            + "; ".join(differ)
            + f"). Rebuild it with: {rebuild}"
        )
    root = Path(cached.root)
    pairs = [
        MaskPair(root / f["path"], root / f["mask"]["path"], f.get("split"), f.get("group"))
        for f in cached.files
    ]
    if d.labels or recipe.segment.masks:
        given = recipe_pairs(replace(recipe, data=replace(d, root=d.root or cached.root)))

        def key(p: MaskPair) -> tuple[str, str, str | None, str | None]:
            return (str(p.image.resolve()), str(p.mask.resolve()), p.split, p.group)

        if [key(p) for p in given] != [key(p) for p in pairs]:
            have = {key(p)[0]: key(p) for p in pairs}
            shown = [
                f"{_rel(p.image, root)}: cache has {have.get(key(p)[0], '-')}, labels have {key(p)}"
                for p in given
                if have.get(key(p)[0]) != key(p)
            ][:5] or ["the same pairs in another order"]
            raise UserError(
                f"the labels ({d.labels or recipe.segment.masks}) do not name the pairs stored in "
                f"the cache {d.cache}: first differences:\n  "
                + "\n  ".join(shown)
                + f"\nRebuild the cache with these labels: {rebuild}"
            )
    return cached, pairs


def _cache_fingerprint(cache_dir: Path, classes: MaskClasses) -> str:
    """The data of a fine-tune from a cache: its record (every file's size and mtime, the
    settings) and the classes; another than the uncached one's, as its pixels differ."""
    h = hashlib.sha256((cache_dir / "cache.json").read_bytes())
    h.update(repr((classes.names, classes.ignore_index)).encode())
    return "masks-cache:" + h.hexdigest()


def segment_data(recipe: Any, classes: MaskClasses, seed: int | None = None) -> SegmentData:
    """Train (the label subset), val and test datasets of the recipe's (image, mask) pairs.

    Every pair is read and checked first (`load_pair`: readable, its image's grid, values of
    the classes), so a bad mask stops the job before its run folder exists; with `data.cache`
    the pairs come from a cache of them (`cache_pairs`: checked as they were cached, each
    mask at its image's cached size), refused when stale (`cached_pairs`). Splits are by image
    file (the slices of a volume stay together) and keep groups together, as for
    classification (`splits.group_split`, a split column used as given); `finetune.labels`
    counts annotated image files (`splits.group_label_subset`, nested for a seed), and
    `finetune.selection` carves validation out of the subset, uses the split's own, or none
    (`budget.carve_validation`). Images are not stratified by what their masks hold: every
    file counts as one annotated image.

    Raises:
        MaskError / UserError: a bad pair, impossible splits or label amounts.
    """

    d, ft = recipe.data, recipe.finetune
    seed = recipe.seed if seed is None else seed
    if d.manifest:
        raise UserError(
            f"data.manifest ({d.manifest}) holds images without their masks; a segmentation "
            "fine-tune reads data.root and its labels CSV, or a cache of the pairs (data.cache "
            "from `beitdomain data cache --recipe`) (unset data.manifest)"
        )
    # data.augment (the user's pipeline, image and mask together) or the built-in one; built
    # first, so a pipeline that cannot be loaded stops the job before every pair is read
    augment = segment_training_transform(d, d.image_size, classes)
    spec = IntensitySpec.from_config(d)
    items: Sequence[tuple[np.ndarray, np.ndarray]]
    if d.cache:  # decoded once, checked as it was cached; refused when stale
        cached, pairs = cached_pairs(recipe, classes)
        recipe = replace(recipe, data=replace(d, root=d.root or cached.root))
        d = recipe.data
        items = CachedPairs(cached)
        files = np.asarray(cached.items[:, 1], dtype=np.int64)  # file k is pair k
        fingerprint = _cache_fingerprint(Path(d.cache), classes)
    else:
        pairs = recipe_pairs(recipe)
        loaded: list[tuple[np.ndarray, np.ndarray]] = []
        item_file: list[int] = []
        for k, pair in enumerate(pairs):  # every pair checked before anything is written
            image, mask = load_pair(pair, spec, classes)
            loaded.extend(zip(image, mask))
            item_file.extend([k] * len(image))
        items, files = loaded, np.asarray(item_file, dtype=np.int64)
        fingerprint = _fingerprint(pairs, Path(d.root), classes)
    root = Path(d.root)
    flabels = ["annotated"] * len(pairs)  # one stratum: a fraction counts annotated images
    groups = [p.group for p in pairs]
    split = split_pairs(recipe, pairs)
    train = split["train"]
    chosen = group_label_subset(
        [flabels[i] for i in train], [groups[i] for i in train], ft.labels, seed
    )
    subset = describe_subset([flabels[i] for i in train], chosen, ft.labels, seed)
    per_file = np.bincount(files, minlength=len(pairs))
    subset["splits"] = split_summary(split, groups, per_file)
    subset["splits"]["subset"] = split_summary({"train": train[chosen]}, groups, per_file)["train"]
    asked = parse_labels_spec(ft.labels).fraction
    if differs_from_asked(asked, subset["fraction"]):  # the classification fine-tune's rule
        log.warning(
            "labels: asked %s, got %.1f%% (%d of %d annotated images): %s",
            ft.labels,
            100 * subset["fraction"],
            subset["n_labels"],
            subset["n_train"],
            "whole groups are kept together"
            if subset["splits"]["subset"]["groups"] < subset["n_labels"]
            else "a subset is whole images",
        )
    mode = ft.selection
    if mode not in FINETUNE_SELECTIONS:
        raise UserError(f"finetune.selection {mode!r}: use one of {', '.join(FINETUNE_SELECTIONS)}")
    fit, val_files = train[chosen], np.empty(0, dtype=np.int64)
    if mode == "carve":
        sel = carve_validation(
            train[chosen], [flabels[i] for i in train[chosen]], CARVE_FRACTION, seed
        )
        fit, val_files = sel.fit, sel.val
    elif mode == "outside":
        val_files = split["val"]
    subset["selection"] = mode
    subset["n_fit"] = len(fit)
    subset["n_selection"] = len(val_files)

    def items_of(which: np.ndarray) -> np.ndarray:
        return np.flatnonzero(np.isin(files, which))

    size = d.image_size
    plain = SegmentTransform(train=False, image_size=size)

    def dataset(which: np.ndarray, transform: Any) -> MaskDataset | None:
        idx = items_of(which)
        return MaskDataset(items, transform, seed, idx) if len(idx) else None

    train_ds = dataset(fit, augment)
    assert train_ds is not None  # a label subset holds at least one image

    def named(which: np.ndarray) -> list[tuple[str, str]]:
        return [(_rel(pairs[i].image, root), _rel(pairs[i].mask, root)) for i in sorted(which)]

    return SegmentData(
        train=train_ds,
        val=dataset(val_files, plain),
        test=dataset(split["test"], plain),
        fingerprint=fingerprint,
        subset=subset,
        files={"train": named(fit), "val": named(val_files), "test": named(split["test"])},
        items=items,
        item_file=files,
    )


def _axial_of(slices: np.ndarray, axis: str) -> np.ndarray:
    """Undoes `io.volume.reslice` for label slices ``[S, H, W]`` (no channel axis): the axial
    ``[Z, Y', X']`` they were cut from."""
    if axis == "axial":
        return slices
    if axis == "coronal":  # [Y, Z', X'] <- axial [Z, Y', X'].transpose(1, 0, 2)[::-1, ::-1]
        return slices[::-1, ::-1, :].transpose(1, 0, 2)
    if axis == "sagittal":  # [X, Z', Y'] <- axial.transpose(2, 0, 1)[::-1, ::-1]
        return slices[::-1, ::-1, :].transpose(1, 2, 0)
    raise ValueError(f"slice_axis={axis!r}")


def write_nifti_mask(
    image_path: str | os.PathLike, slices: np.ndarray, slice_axis: str, out: str | os.PathLike
) -> Path:
    """Writes label slices ``[S, H, W]`` of the NIfTI volume `image_path` (cut along
    `slice_axis` by the readers, every slice) as a label volume on the image's own voxel grid,
    with its affine: the inverse of what `io.volume.read_volume` and `reslice` did.

    Raises:
        MaskError: the slices do not cover the volume's grid.
    """
    import nibabel as nib
    from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

    img = nib.load(str(image_path))
    shape = img.shape[:3] if len(img.shape) >= 3 else (*img.shape[:2], 1)
    ornt = io_orientation(img.affine)
    axial = _axial_of(np.asarray(slices), slice_axis)  # [Z, Y', X']
    ras = axial[:, ::-1, ::-1].transpose(2, 1, 0)  # [X, Y, Z] in RAS+ (read_volume's flips)
    identity = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    grid = apply_orientation(ras, ornt_transform(identity, ornt))  # the file's own axis order
    if grid.shape != tuple(shape):
        raise MaskError(
            f"{len(slices)} predicted slices of {list(np.asarray(slices).shape[1:])} do not "
            f"cover the grid {list(shape)} of {image_path}"
        )
    dtype = np.uint8 if grid.max(initial=0) < 256 else np.uint16
    labels = nib.Nifti1Image(np.ascontiguousarray(grid).astype(dtype), img.affine)
    labels.set_qform(img.affine, code=1)
    labels.set_sform(img.affine, code=1)
    nib.save(labels, str(out))
    return Path(out)
