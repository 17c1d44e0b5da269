"""TIFF reader on generated edge cases: bit depths, pages, tiles+LZW, planar, NaN, samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from beitdomain.io import IntensitySpec, ReaderError, load_image, read_raw


def _ramp(h: int = 32, w: int = 48, dtype=np.uint16, top: float = 4000) -> np.ndarray:
    return (np.linspace(0, top, h * w).reshape(h, w)).astype(dtype)


def test_16bit_dtype_range_keeps_precision(tmp_path: Path):
    arr = _ramp()
    tifffile.imwrite(tmp_path / "a.tif", arr)
    raw, _ = read_raw(tmp_path / "a.tif")
    assert raw.dtype == np.uint16 and raw.shape == (1, 1, 32, 48)
    np.testing.assert_array_equal(raw[0, 0], arr)
    image, _meta = load_image(tmp_path / "a.tif", IntensitySpec(normalize="dtype"))
    np.testing.assert_allclose(image[0], arr / 65535.0, atol=1e-6)
    # Percentile (default) stretches the used range to [0, 1].
    image, _ = load_image(tmp_path / "a.tif")
    assert image.min() == 0.0 and image.max() == 1.0


def test_multipage_stack(tmp_path: Path):
    stack = np.stack([_ramp(dtype=np.uint8, top=200) + i for i in range(5)])
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    image, meta = load_image(tmp_path / "stack.tif", IntensitySpec(normalize="dtype"))
    assert image.shape == (5, 1, 32, 48) and meta["frames"] == 5
    np.testing.assert_allclose(image[3, 0], (stack[3] / 255.0), atol=1e-6)
    first, _ = load_image(tmp_path / "stack.tif", IntensitySpec(normalize="dtype", frames="first"))
    np.testing.assert_allclose(first[0], stack[0] / 255.0, atol=1e-6)


def test_tiled_lzw_and_deflate(tmp_path: Path):
    arr = _ramp(64, 64)
    for comp in ("lzw", "zlib"):
        path = tmp_path / f"tiled_{comp}.tif"
        tifffile.imwrite(path, arr, tile=(32, 32), compression=comp)
        raw, meta = read_raw(path)
        np.testing.assert_array_equal(raw[0, 0], arr)
        assert meta["compression"] in ("LZW", "ADOBE_DEFLATE", "DEFLATE")


def test_rgb_planar_and_contig(tmp_path: Path):
    rgb = np.random.default_rng(0).integers(0, 255, (3, 16, 20), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "planar.tif", rgb, photometric="rgb", planarconfig="separate")
    tifffile.imwrite(
        tmp_path / "contig.tif", np.moveaxis(rgb, 0, -1), photometric="rgb", planarconfig="contig"
    )
    a, _ = read_raw(tmp_path / "planar.tif")
    b, _ = read_raw(tmp_path / "contig.tif")
    assert a.shape == b.shape == (1, 3, 16, 20)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[0], rgb)
    gray, _ = load_image(tmp_path / "planar.tif", IntensitySpec(normalize="dtype"))
    luma = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255.0
    np.testing.assert_allclose(gray[0], luma, atol=1e-5)


def test_more_than_three_samples_needs_channel_choice(tmp_path: Path):
    arr = np.random.default_rng(1).integers(0, 1000, (16, 16, 5), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "ms.tif", arr, photometric="minisblack", planarconfig="contig")
    raw, _ = read_raw(tmp_path / "ms.tif")
    assert raw.shape == (1, 5, 16, 16)
    with pytest.raises(ReaderError, match=r"ms\.tif: 5 samples .*channels"):
        load_image(tmp_path / "ms.tif")
    image, _ = load_image(
        tmp_path / "ms.tif", IntensitySpec(channels=(4, 0, 2), in_chans=3, normalize="dtype")
    )
    np.testing.assert_allclose(image[0], arr[..., 4] / 65535.0, atol=1e-6)
    with pytest.raises(ReaderError, match="has 5 samples"):
        load_image(tmp_path / "ms.tif", IntensitySpec(channels=(7,)))


def test_float_with_nan_error_and_zero_policy(tmp_path: Path):
    arr = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    arr[2, 3] = np.nan
    arr[5, 5] = np.inf
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, arr)
    with pytest.raises(ReaderError, match=r"float\.tif: 2 of 64 pixel values are NaN or Inf"):
        load_image(path)
    image, _ = load_image(path, IntensitySpec(nonfinite="zero", normalize="dtype"))
    assert np.isfinite(image).all()
    assert image[0, 2, 3] == 0.0 and image[0, 5, 5] == 0.0
    np.testing.assert_allclose(image[0, 7, 7], 1.0)


def test_minisWhite_inverted(tmp_path: Path):
    arr = _ramp(dtype=np.uint8, top=255)
    tifffile.imwrite(tmp_path / "w.tif", arr, photometric="miniswhite")
    image, meta = load_image(tmp_path / "w.tif", IntensitySpec(normalize="dtype"))
    assert meta["invert"] is True
    np.testing.assert_allclose(image[0], 1.0 - arr / 255.0, atol=1e-6)


def test_bigtiff_and_ome(tmp_path: Path):
    arr = _ramp()
    tifffile.imwrite(tmp_path / "big.tif", arr, bigtiff=True)
    raw, _ = read_raw(tmp_path / "big.tif")
    np.testing.assert_array_equal(raw[0, 0], arr)
    vol = np.stack([arr, arr // 2, arr // 3])  # Z, Y, X
    tifffile.imwrite(tmp_path / "x.ome.tif", vol, metadata={"axes": "ZYX"})
    raw, meta = read_raw(tmp_path / "x.ome.tif")
    assert meta["ome"] is True and raw.shape == (3, 1, 32, 48)
    np.testing.assert_array_equal(raw[1, 0], arr // 2)
