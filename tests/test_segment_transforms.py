"""The joint image + mask augmentation (issue 38 item b): the mask follows the image's seeded crop
and flips, nearest neighbour; the classification path is untouched."""

from __future__ import annotations

import numpy as np
import pytest

from beitdomain.data.transforms import FinetuneTransform, SegmentTransform


def _quadrants(size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((size, size), np.int64)
    mask[: size // 2, size // 2 :] = 1
    mask[size // 2 :, : size // 2] = 2
    mask[size // 2 :, size // 2 :] = 3
    image = (mask / 3.0).astype(np.float32)[None]  # the image shows its own mask
    return image, mask


def test_the_image_view_is_the_classification_view():
    image = np.random.default_rng(0).random((1, 40, 52)).astype(np.float32)
    mask = np.zeros((40, 52), np.int64)
    kw = dict(image_size=32, hflip=0.5, vflip=0.5, intensity=0.2)
    for seed in range(5):
        want = FinetuneTransform(train=True, **kw)(image, np.random.default_rng(seed))
        got, _ = SegmentTransform(train=True, **kw)(image, mask, np.random.default_rng(seed))
        assert np.array_equal(got, want)


def test_the_mask_follows_crop_and_flips_without_blending_classes():
    image, mask = _quadrants()
    t = SegmentTransform(train=True, image_size=32, hflip=0.5, vflip=0.5, intensity=0.0)
    for seed in range(8):
        view, mview = t(image, mask, np.random.default_rng(seed))
        assert view.shape == (1, 32, 32) and mview.shape == (32, 32) and mview.dtype == np.int64
        assert set(np.unique(mview)) <= {0, 1, 2, 3}
        # away from edges between quadrants the image still shows the mask's class
        agree = np.mean(np.rint(view[0] * 3) == mview)
        assert agree > 0.9, (seed, agree)
    again = t(image, mask, np.random.default_rng(3))
    assert np.array_equal(again[1], t(image, mask, np.random.default_rng(3))[1])


def test_a_full_crop_with_both_flips_flips_the_mask_exactly():
    image, mask = _quadrants(32)
    t = SegmentTransform(
        train=True, image_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1, vflip=1
    )
    _, mview = t(image, mask, np.random.default_rng(0))
    assert np.array_equal(mview, mask[::-1, ::-1])


def test_evaluation_resizes_the_whole_image_and_mask():
    image, mask = _quadrants(64)
    view, mview = SegmentTransform(train=False, image_size=32)(image, mask)
    assert view.shape == (1, 32, 32)
    assert np.array_equal(mview, mask[::2, ::2])
    with pytest.raises(ValueError, match="does not match"):
        SegmentTransform(train=False, image_size=32)(image, mask[:10])


def test_transpose_moves_the_mask_with_the_image():
    image, mask = _quadrants(32)
    t = SegmentTransform(
        train=True,
        image_size=32,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        hflip=0,
        vflip=0,
        intensity=0.0,
        transpose=1.0,
    )
    view, mview = t(image, mask, np.random.default_rng(0))
    assert np.array_equal(mview, mask.T)
    assert np.mean(np.rint(view[0] * 3) == mview) > 0.9
