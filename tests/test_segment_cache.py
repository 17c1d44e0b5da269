"""Masks in the cache (issue 38): `masks.cache_pairs` stores each mask beside its image at the
image's cached size (nearest neighbour), a fine-tune with `data.cache` reads the pairs from it,
and a stale, damaged or foreign cache is refused as the classification path refuses one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from test_segment_job import _recipe, write_discs

from beitdomain.data.cache import CachedImages, CacheError, build_cache, resize_square_labels
from beitdomain.data.index import scan
from beitdomain.data.masks import MaskClasses, MaskError, cache_pairs, segment_data
from beitdomain.engine.segment import finetune_segment
from beitdomain.user import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = MaskClasses(("background", "disc"))


@pytest.fixture
def discs(tmp_path):
    return write_discs(tmp_path / "discs", n=8, size=48)


def _cached(data: Path, cache: Path, *sets: str):
    return _recipe(data, f"data.cache={cache}", *sets)


def test_each_mask_is_stored_beside_its_image_at_the_cached_size(discs, tmp_path):
    r = _recipe(discs)
    cached = cache_pairs(r, tmp_path / "cache", size=40)
    assert cached.images.shape == (8, 1, 40, 40) and cached.masks.shape == (8, 40, 40)
    assert cached.masks.dtype == np.uint8 and cached.reused is False
    for k in range(8):
        image_rel, frame = cached.source(k)
        assert frame == 0 and cached.mask_path(k) == image_rel.replace("img/", "msk/")
        full = np.asarray(Image.open(discs / cached.mask_path(k)), np.int64)
        want = cv2.resize(full.astype(np.int32), (40, 40), interpolation=cv2.INTER_NEAREST_EXACT)
        np.testing.assert_array_equal(cached.mask(k), want)  # nearest: no value in between
    # the images are those a classification cache of the same files holds, bit for bit
    plain = build_cache(scan(discs / "img"), tmp_path / "plain", size=40)
    by_path = {plain.source(k)[0]: plain[k] for k in range(len(plain))}
    for k in range(8):
        np.testing.assert_array_equal(cached[k], by_path[cached.source(k)[0][len("img/") :]])
    assert cache_pairs(r, tmp_path / "cache", size=40).reused is True


@pytest.mark.parametrize("fit", ["squash", "crop", "pad"])
def test_a_mask_takes_its_images_fit(tmp_path, fit):
    """Non-square pairs: the image is the mask's code, so after any fit the cached image must
    still say, pixel by pixel, which class lies under it."""
    root = tmp_path / "d"
    (root / "img").mkdir(parents=True)
    (root / "msk").mkdir()
    mask = np.kron(np.random.default_rng(0).integers(0, 2, (6, 10)), np.ones((8, 8), np.uint8))
    Image.fromarray((mask * 255).astype(np.uint8)).save(root / "img" / "a.png")
    Image.fromarray(mask.astype(np.uint8)).save(root / "msk" / "a.png")
    (root / "labels.csv").write_text("path,mask\nimg/a.png,msk/a.png\n")
    cached = cache_pairs(_recipe(root), tmp_path / "c", size=32, fit=fit)
    np.testing.assert_array_equal(cached.mask(0), resize_square_labels(mask, 32, fit))
    coded = cached[0][0] > 127
    agree = (coded == (cached.mask(0) == 1)).mean()
    assert agree > 0.97, agree  # area-averaged image edges against nearest-neighbour labels


def test_a_fine_tune_reads_the_pairs_from_the_cache(discs, tmp_path):
    cache = tmp_path / "cache"
    cache_pairs(_recipe(discs), cache, size=40)
    with_cache = segment_data(_cached(discs, cache), CLASSES)
    without = segment_data(_recipe(discs), CLASSES)
    # the same pairs, splits and label subset: the cache keeps the labels' order
    assert with_cache.files == without.files and with_cache.subset == without.subset
    assert with_cache.fingerprint.startswith("masks-cache:")
    assert with_cache.fingerprint != without.fingerprint  # other pixels: no resume across
    cached = CachedImages(cache)
    for k in range(len(with_cache.items)):
        image, mask = with_cache.items[k]
        np.testing.assert_array_equal(mask, cached.mask(k))
        # the uncached item's mask at the cached size is the cached mask
        np.testing.assert_array_equal(resize_square_labels(without.items[k][1], 40), mask)
        assert image.dtype == np.uint8 and image.shape == (1, 40, 40)
    # the evaluation views: masks at image_size, values of the classes only
    views = [with_cache.test[i] for i in range(len(with_cache.test))]
    assert all(v["mask"].shape == (32, 32) for v in views)
    assert set(np.unique(np.stack([v["mask"].numpy() for v in views])).tolist()) <= {0, 1}
    # the data.root of the recipe may be left out: the cache knows it
    r = _cached(discs, cache)
    r.data.root, r.data.labels = None, None
    assert segment_data(r, CLASSES).files == without.files


def test_a_segmentation_job_runs_from_the_cache(discs, tmp_path):
    cache = tmp_path / "cache"
    cache_pairs(_recipe(discs), cache, size=40)
    res = finetune_segment(
        _cached(discs, cache, "finetune.train.steps=3"), tmp_path / "run", device="cpu", quiet=True
    )
    plain = finetune_segment(
        _recipe(discs, "finetune.train.steps=3"), tmp_path / "plain", device="cpu", quiet=True
    )
    assert (res["n_train"], res["n_labels"]) == (plain["n_train"], plain["n_labels"])
    assert res["test"]["n_items"] == plain["test"]["n_items"] == 2
    used = (tmp_path / "run" / "labels_used.csv").read_text()
    assert used == (tmp_path / "plain" / "labels_used.csv").read_text()


def test_a_changed_mask_or_image_makes_the_cache_stale(discs, tmp_path):
    cache = tmp_path / "cache"
    cache_pairs(_recipe(discs), cache, size=40)
    mask = discs / "msk" / "03.png"
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(mask)
    with pytest.raises(CacheError, match=r"changed since the cache was built: msk/03.png"):
        segment_data(_cached(discs, cache), CLASSES)
    with pytest.raises(CacheError, match="msk/03.png"):  # the job stops before its folder
        finetune_segment(_cached(discs, cache), tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()
    # build again: the stale cache is rebuilt with the new mask
    again = cache_pairs(_recipe(discs), cache, size=40)
    assert again.reused is False and again.mask(3).max() == 0
    segment_data(_cached(discs, cache), CLASSES)  # fresh again
    os.utime(discs / "img" / "05.png", ns=(1, 1))
    with pytest.raises(CacheError, match="img/05.png: modified"):
        segment_data(_cached(discs, cache), CLASSES)


def test_other_settings_classes_and_labels_are_refused(discs, tmp_path):
    cache = tmp_path / "cache"
    cache_pairs(_recipe(discs), cache, size=40)
    with pytest.raises(CacheError, match="setting changed: normalize"):
        segment_data(_cached(discs, cache, "data.normalize=percentile"), CLASSES)
    three = MaskClasses(("background", "disc", "ring"))
    with pytest.raises(CacheError, match=r"segment.classes: \['background', 'disc'\] in the"):
        segment_data(_cached(discs, cache), three)
    # labels beside the cache must name its pairs (as check_cache_labels for classes)
    rows = (discs / "labels.csv").read_text().splitlines()
    other = discs / "other.csv"
    other.write_text("\n".join([rows[0], *rows[1:-1], "img/07.png,msk/00.png"]) + "\n")
    with pytest.raises(UserError, match=r"do not name the pairs stored in the cache"):
        segment_data(_cached(discs, cache, f"data.labels={other}"), CLASSES)


def test_a_cache_without_masks_or_none_at_all_is_refused(discs, tmp_path):
    with pytest.raises(CacheError, match=r"data.cache .* no cache there"):
        segment_data(_cached(discs, tmp_path / "nothing"), CLASSES)
    build_cache(scan(discs / "img"), tmp_path / "images", size=40)
    with pytest.raises(CacheError, match=r"data.cache .* holds images without their masks"):
        segment_data(_cached(discs, tmp_path / "images"), CLASSES)


def test_a_bad_pair_is_refused_as_it_is_cached_and_nothing_is_left(discs, tmp_path):
    Image.fromarray(np.full((48, 48), 2, np.uint8)).save(discs / "msk" / "04.png")
    out = tmp_path / "cache"
    with pytest.raises(MaskError, match=r"mask .*msk/04.png \(of image .*img/04.png\) holds"):
        cache_pairs(_recipe(discs), out, size=40)
    assert not out.exists()  # a failed build leaves --out as it found it


def test_a_damaged_masks_file_is_refused_as_the_cache_opens(discs, tmp_path):
    cache = tmp_path / "cache"
    cache_pairs(_recipe(discs), cache, size=40)
    record = json.loads((cache / "cache.json").read_text())
    assert record["masks"] == {
        "classes": ["background", "disc"],
        "ignore_index": None,
        "dtype": "uint8",
    }
    masks = np.load(cache / "masks.npy")
    masks[0] = 1 - masks[0]
    np.save(cache / "masks.npy", masks)  # same shape, other labels
    with pytest.raises(CacheError, match=r"masks.npy: the masks of 8 sampled images differ"):
        segment_data(_cached(discs, cache), CLASSES)
    with open(cache / "masks.npy", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CacheError, match=r"masks.npy is cut short"):
        CachedImages(cache)
    assert cache_pairs(_recipe(discs), cache, size=40).reused is False  # rebuilt


def test_volumes_are_cached_slice_by_slice_with_their_masks(tmp_path):
    """A NIfTI volume and its label volume: every slice a row, each mask slice beside its image
    slice; groups and the split the uncached fine-tune draws are kept."""
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    data = tmp_path / "vols"
    data.mkdir()
    xx, yy, zz = np.mgrid[:32, :32, :4]
    rows = ["path,mask,group"]
    for k in range(8):
        c = rng.uniform(10, 22, 3)
        ball = ((xx - c[0]) ** 2 + (yy - c[1]) ** 2 + 4 * (zz - 2) ** 2 < 36).astype(np.uint8)
        scan_ = (ball * 100 + rng.normal(0, 5, ball.shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(scan_, np.eye(4)), data / f"v{k}.nii.gz")
        nib.save(nib.Nifti1Image(ball, np.eye(4)), data / f"v{k}_seg.nii.gz")
        rows.append(f"v{k}.nii.gz,v{k}_seg.nii.gz,patient-{k // 2}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    no_val = "data.val_fraction=0"  # 4 patients: a test split only
    cached = cache_pairs(_recipe(data, no_val), tmp_path / "cache", size=32)
    assert len(cached) == 8 * 4 and cached.masks.shape == (32, 32, 32)
    without = segment_data(_recipe(data, no_val), CLASSES)
    with_cache = segment_data(_cached(data, tmp_path / "cache", no_val), CLASSES)
    assert with_cache.files == without.files and with_cache.subset == without.subset
    np.testing.assert_array_equal(with_cache.item_file, without.item_file)
    for k in range(32):  # 32 px: the cached size is the slices' own, so the masks are equal
        np.testing.assert_array_equal(with_cache.items[k][1], without.items[k][1])
        assert np.abs(with_cache.items[k][0] / 255.0 - without.items[k][0]).max() <= 0.5 / 255


def test_pre_training_from_a_cache_of_pairs_leaves_the_same_test_images_out(discs, tmp_path):
    """Pre-training (and the tokenizer) read a segmentation recipe's cache of pairs: its
    images, without the masks CSV's label-column check, and without the images of the test
    split the fine-tune scores on, as the uncached pre-training leaves them out."""
    from beitdomain.data.unlabeled import unlabeled_dataset

    cache = tmp_path / "cache"
    cache_pairs(_recipe(discs), cache, size=40)

    def files_seen(recipe):
        ds, _, _ = unlabeled_dataset(recipe, "pretrain", progress=False)
        return sorted(ds.source.source(int(i))[0] for i in ds.indices), ds.pretraining_data

    cached, record = files_seen(_cached(discs, cache))
    uncached, _ = files_seen(_recipe(discs))
    test = segment_data(_recipe(discs), CLASSES).files["test"]
    assert record["n_test_excluded"] == len(test) > 0
    assert cached == uncached and not set(cached) & {image for image, _ in test}
    assert len(cached) == 8 - len(test)
    everything, record = files_seen(_cached(discs, cache, "data.transductive=true"))
    assert len(everything) == 8 and record["n_test_excluded"] == 0


def test_data_cache_with_a_segmentation_recipe_caches_the_pairs(tmp_path):
    """`beitdomain data cache DIR --recipe ... --set finetune.task=segment`: the pairs of the
    labels' mask column, which a fine-tune with data.cache then reads (as README says)."""
    from helpers import sets_to_args
    from test_segment_job import SEGMENT_SETS
    from typer.testing import CliRunner

    from beitdomain.cli.app import app

    data = write_discs(tmp_path / "discs", n=8, size=48)
    sets = [*SEGMENT_SETS, "finetune.task=segment", f"data.labels={data / 'labels.csv'}"]
    args = ["cache", str(data), "--out", str(tmp_path / "c"), *sets_to_args(sets)]
    res = CliRunner().invoke(app, ["--quiet", "data", *args])
    assert res.exit_code == 0, res.output
    cached = CachedImages(tmp_path / "c")
    assert cached.masks.shape == (8, 40, 40)  # cache_size_for(32): 5/4 of the crop size
    with_cache = segment_data(_cached(data, tmp_path / "c"), CLASSES)
    assert with_cache.files == segment_data(_recipe(data), CLASSES).files
    skip = CliRunner().invoke(app, ["data", *args, "--on-error", "skip", "--force"])
    assert skip.exit_code != 0 and "--on-error skip" in skip.output
    assert "does not apply to (image, mask) pairs" in " ".join(skip.output.split())
