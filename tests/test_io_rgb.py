"""Pillow reader: alpha, 16-bit PNG, EXIF orientation, palette, JPEG, BMP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beitdomain.io import IntensitySpec, load_image, read_raw

DTYPE = IntensitySpec(normalize="dtype", in_chans=3)


def test_rgba_png_drops_alpha(tmp_path: Path):
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 7  # nearly transparent: alpha must not leak into intensities
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    raw, _meta = read_raw(tmp_path / "a.png")
    assert raw.shape == (1, 3, 10, 12)
    image, _ = load_image(tmp_path / "a.png", DTYPE)
    np.testing.assert_allclose(image[0], 200 / 255, atol=1e-6)
    np.testing.assert_allclose(image[1:], 0.0)
    gray, _ = load_image(tmp_path / "a.png", IntensitySpec(normalize="dtype"))
    np.testing.assert_allclose(gray, 0.299 * 200 / 255, atol=1e-5)


def test_la_png(tmp_path: Path):
    la = np.dstack([np.full((8, 8), 90, np.uint8), np.full((8, 8), 255, np.uint8)])
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    raw, _ = read_raw(tmp_path / "la.png")
    assert raw.shape == (1, 1, 8, 8) and int(raw.max()) == 90


def test_16bit_png_preserved(tmp_path: Path):
    arr = np.arange(0, 64 * 1000, 1000, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(arr).save(tmp_path / "d.png")
    raw, meta = read_raw(tmp_path / "d.png")
    assert raw.dtype == np.uint16 and meta["bits_stored"] == 16
    np.testing.assert_array_equal(raw[0, 0], arr)
    image, _ = load_image(tmp_path / "d.png", IntensitySpec(normalize="dtype"))
    np.testing.assert_allclose(image[0], arr / 65535.0, atol=1e-6)


def test_exif_orientation_applied(tmp_path: Path):
    arr = np.zeros((10, 20), np.uint8)
    arr[0, :5] = 255  # bright mark top-left of the stored pixels
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise to display
    im.save(tmp_path / "o.jpg", exif=exif, quality=100)
    raw, _ = read_raw(tmp_path / "o.jpg")
    assert raw.shape == (1, 1, 20, 10)  # width and height swapped
    # After a 90 degree clockwise turn the stored top row becomes the right column.
    assert raw[0, 0, :5, -1].mean() > 200 and raw[0, 0, :5, 0].mean() < 50


def test_palette_png(tmp_path: Path):
    idx = np.array([[0, 1], [1, 0]], np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    im.save(tmp_path / "p.png")
    image, meta = load_image(tmp_path / "p.png", DTYPE)
    assert meta["mode"] == "P"
    np.testing.assert_allclose(image[:, 0, 0], [1, 0, 0])
    np.testing.assert_allclose(image[:, 0, 1], [0, 0, 1])


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "PNG"])
def test_rgb_formats(tmp_path: Path, fmt: str):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    path = tmp_path / "x.img"  # suffix deliberately unhelpful: detection is by content
    Image.fromarray(arr).save(path, format=fmt)
    image, meta = load_image(path, DTYPE)
    assert image.shape == (3, 16, 16) and meta["format"] == fmt.lower()
    if fmt != "JPEG":
        np.testing.assert_allclose(image, np.moveaxis(arr, -1, 0) / 255.0, atol=1e-6)
    gray, _ = load_image(path)
    assert gray.shape == (1, 16, 16)
