"""Transforms: shapes, ranges, shared crop between views, explicit-rng determinism."""

from __future__ import annotations

import numpy as np
import pytest

from beitdomain.data.transforms import (
    FinetuneTransform,
    IntensityJitter,
    PretrainTransform,
    random_resized_crop_box,
)


def _image(dtype=np.uint8, c: int = 1, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    top = {np.uint8: 255, np.uint16: 65535}.get(dtype, 1.0)
    return (rng.random((c, size, size)) * top).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float16, np.float32])
@pytest.mark.parametrize("channels", [1, 3])
def test_pretrain_views(dtype, channels):
    t = PretrainTransform(image_size=32, tokenizer_size=16)
    view, tok = t(_image(dtype, channels), np.random.default_rng(1))
    assert view.shape == (channels, 32, 32) and tok.shape == (channels, 16, 16)
    assert view.dtype == tok.dtype == np.float32
    assert view.min() >= 0.0 and view.max() <= 1.0 and tok.min() >= 0.0 and tok.max() <= 1.0


def test_same_rng_same_output_other_rng_differs():
    t = PretrainTransform(image_size=32, tokenizer_size=16)
    img = _image()
    a = t(img, np.random.default_rng([0, 3, 7]))
    b = t(img, np.random.default_rng([0, 3, 7]))
    c = t(img, np.random.default_rng([0, 4, 7]))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_tokenizer_view_shows_the_same_crop():
    # A left-half-bright image: whatever the crop, both views agree on where the edge is.
    img = np.zeros((1, 64, 64), np.uint8)
    img[:, :, :32] = 200
    t = PretrainTransform(image_size=32, tokenizer_size=16, intensity=0.0)
    for seed in range(20):
        view, tok = t(img, np.random.default_rng(seed))
        down = view[0].reshape(16, 2, 16, 2).mean(axis=(1, 3))
        np.testing.assert_allclose(tok[0], down, atol=1 / 255)  # uint8 rounding


def test_no_jitter_no_flip_full_crop_is_a_resize():
    img = _image(size=32)
    t = PretrainTransform(32, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, intensity=0.0)
    view, _ = t(img, np.random.default_rng(0))
    np.testing.assert_allclose(view, img / 255.0, atol=1e-6)


def test_hflip_always():
    img = np.zeros((1, 32, 32), np.uint8)
    img[:, :, :4] = 255
    t = PretrainTransform(32, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0, intensity=0.0)
    view, _ = t(img, np.random.default_rng(0))
    assert view[0, :, -1].mean() == 1.0 and view[0, :, 0].mean() == 0.0


def test_jitter_is_monotone_and_bounded():
    rng = np.random.default_rng(0)
    jitter = IntensityJitter(0.3)
    grid = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for _ in range(20):
        out = IntensityJitter.apply(grid, jitter.sample(rng)).ravel()
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert np.all(np.diff(out) >= 0)  # order of intensities is preserved
    with pytest.raises(ValueError, match="jitter strength"):
        IntensityJitter(1.5)


def test_crop_box_within_bounds_and_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(50, 80, rng, (0.2, 1.0))
        assert top >= 0 and top + h <= 50 and left >= 0 and left + w <= 80
        assert h * w >= 0.15 * 50 * 80


def test_finetune_train_and_eval():
    img = _image(size=48)
    train = FinetuneTransform(train=True, image_size=32)
    a = train(img, np.random.default_rng(5))
    assert a.shape == (1, 32, 32) and a.dtype == np.float32
    np.testing.assert_array_equal(a, train(img, np.random.default_rng(5)))
    with pytest.raises(ValueError, match="needs rng"):
        train(img)
    ev = FinetuneTransform(train=False, image_size=32)
    e1, e2 = ev(img), ev(img, np.random.default_rng(9))
    np.testing.assert_array_equal(e1, e2)  # evaluation ignores randomness
    assert e1.shape == (1, 32, 32) and e1.min() >= 0 and e1.max() <= 1


@pytest.mark.parametrize("channels", [1, 3])
def test_transpose_always_swaps_rows_and_columns(channels):
    img = _image(np.uint8, channels, size=32)
    full = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, intensity=0.0)
    plain = FinetuneTransform(train=True, image_size=32, **full)(img, np.random.default_rng(0))
    t = FinetuneTransform(train=True, image_size=32, transpose=1.0, **full)
    view = t(img, np.random.default_rng(0))
    np.testing.assert_array_equal(view, plain.transpose(0, 2, 1))
    pre, tok = PretrainTransform(32, 16, transpose=1.0, **full)(img, np.random.default_rng(0))
    np.testing.assert_array_equal(pre, view)
    assert tok.shape == (channels, 16, 16)


def test_flips_and_transpose_draw_all_eight_symmetries_evenly():
    img = np.arange(16 * 16, dtype=np.float32).reshape(1, 16, 16) / 256
    t = FinetuneTransform(
        train=True,
        image_size=16,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        hflip=0.5,
        vflip=0.5,
        intensity=0.0,
        transpose=0.5,
    )
    corners = {}
    for seed in range(800):
        v = t(img, np.random.default_rng(seed))[0]
        key = (round(float(v[0, 0]), 3), round(float(v[0, -1]), 3))  # fixes the symmetry
        corners[key] = corners.get(key, 0) + 1
    assert len(corners) == 8, corners
    assert min(corners.values()) > 60, corners  # 100 expected each


def test_transpose_off_leaves_the_random_stream_as_it_was():
    # recipes without transpose draw exactly what they drew before it existed
    img = _image(size=40)
    kw = dict(image_size=32, hflip=0.5, vflip=0.5, intensity=0.2)
    for seed in range(5):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        FinetuneTransform(train=True, **kw)(img, a)
        FinetuneTransform(train=True, transpose=0.0, **kw)(img, b)
        c = np.random.default_rng(seed)
        FinetuneTransform(train=True, transpose=0.5, **kw)(img, c)
        after_a, after_b, after_c = a.random(), b.random(), c.random()
        assert after_a == after_b
        assert after_c != after_a  # one more draw when it is on
