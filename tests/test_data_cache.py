"""Decode-once cache: layout, values, frames, invalidation, pickling, privacy."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from helpers import write_dicom_with_phi
from PIL import Image

from beitdomain.data.cache import (
    CachedImages,
    CacheError,
    build_cache,
    check_cache,
    resize_square,
)
from beitdomain.data.index import ScanError, scan
from beitdomain.io import IntensitySpec, load_image


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(
            root / "a" / f"{k}.png"
        )
    stack = rng.integers(0, 4000, (4, 48, 32), dtype=np.uint16)
    tifffile.imwrite(root / "b" / "stack.tif", stack, photometric="minisblack")
    return root


def test_build_and_read(folder: Path, tmp_path: Path):
    spec = IntensitySpec(normalize="dtype")
    cache = build_cache(folder, tmp_path / "cache", size=32, spec=spec)
    assert len(cache) == 3 + 4  # the 4-page TIFF gives one item per page
    item = cache[0]
    assert item.shape == (1, 32, 32) and item.dtype == np.uint8
    assert np.shares_memory(cache[0], cache.images)  # zero-copy view
    expected, _ = load_image(folder / "a" / "0.png", spec)
    np.testing.assert_array_equal(
        item, np.round(resize_square(expected, 32) * 255).astype(np.uint8)
    )
    assert [cache.source(i) for i in range(3, 7)] == [("b/stack.tif", f) for f in range(4)]
    assert cache.labels == ["a"] * 3 + ["b"] * 4 and cache.classes == ["a", "b"]


def test_uint16_and_middle_frame(folder: Path, tmp_path: Path):
    spec = IntensitySpec(frames="middle", normalize="dtype")
    cache = build_cache(folder, tmp_path / "c16", size=16, dtype="uint16", spec=spec)
    assert len(cache) == 4 and cache[3].dtype == np.uint16
    assert cache.source(3) == ("b/stack.tif", 2)


def test_reused_when_fresh_rebuilt_when_settings_change(folder: Path, tmp_path: Path):
    out = tmp_path / "cache"
    assert build_cache(folder, out, size=16).reused is False
    assert build_cache(folder, out, size=16).reused is True
    again = build_cache(folder, out, size=16, spec=IntensitySpec(window=(100, 50)))
    assert again.reused is False and again.spec.window == (100.0, 50.0)


def test_refused_when_a_file_changes(folder: Path, tmp_path: Path):
    out = tmp_path / "cache"
    build_cache(folder, out, size=16)
    CachedImages(out)  # fresh: opens
    target = folder / "a" / "1.png"
    Image.fromarray(np.zeros((41, 40), np.uint8)).save(target)
    with pytest.raises(CacheError) as info:
        CachedImages(out)
    assert "1 file(s) changed" in str(info.value) and "a/1.png: size" in str(info.value)
    assert "beitdomain data cache" in str(info.value)
    # Rebuilding picks the change up.
    assert build_cache(folder, out, size=16).reused is False
    CachedImages(out)


def test_touch_with_hash_is_not_a_change(folder: Path, tmp_path: Path):
    out = tmp_path / "cache"
    build_cache(folder, out, size=16, hash_files=True)
    target = folder / "a" / "2.png"
    later = time.time() + 100
    os.utime(target, (later, later))
    assert check_cache(out) == []
    target.write_bytes(target.read_bytes()[:-1] + b"\x00")  # same size, other content
    assert any("a/2.png: modified" in r for r in check_cache(out))


def test_refused_with_other_settings(folder: Path, tmp_path: Path):
    out = tmp_path / "cache"
    build_cache(folder, out, size=16, spec=IntensitySpec(window="ct-lung"))
    with pytest.raises(CacheError, match="window: 'ct-lung' in the cache, 'ct-bone' requested"):
        CachedImages(out, spec=IntensitySpec(window="ct-bone"))
    with pytest.raises(CacheError, match="size: 16 in the cache, 32 requested"):
        CachedImages(out, size=32)


def test_bad_file_fail_and_skip(folder: Path, tmp_path: Path):
    arr = np.ones((8, 8), np.float32)
    arr[0, 0] = np.nan
    tifffile.imwrite(folder / "a" / "nan.tif", arr)  # scans fine, fails normalization
    with pytest.raises(ScanError, match=r"a/nan.tif: 1 of 64 pixel values are NaN"):
        build_cache(folder, tmp_path / "c", size=16)
    assert not (tmp_path / "c" / "cache.json").exists()
    cache = build_cache(folder, tmp_path / "c", size=16, on_error="skip")
    assert len(cache) == 7 and cache.errors[0][0] == "a/nan.tif"
    assert "a/nan.tif" not in [cache.source(i)[0] for i in range(len(cache))]


def test_pickles_without_data(folder: Path, tmp_path: Path):
    cache = build_cache(folder, tmp_path / "cache", size=64)
    _ = cache[0]
    blob = pickle.dumps(cache)
    assert len(blob) < 64 * 64 * 7 // 2  # the mapped pixels are not in the pickle
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone[5], cache[5])


def test_no_patient_data_in_cache(tmp_path: Path):
    root = tmp_path / "dicoms"
    write_dicom_with_phi(root / "mr.dcm", "Kowalski^Magdalena", "ZX-77", "19580412", "MR_small.dcm")
    out = tmp_path / "cache"
    build_cache(scan(root), out, size=16)
    for f in out.iterdir():
        data = f.read_bytes()
        for secret in (b"Kowalski", b"Magdalena", b"ZX-77"):
            assert secret not in data, f"{secret!r} leaked into {f.name}"


def test_resize_fits():
    img = np.zeros((1, 20, 40), np.float32)
    img[:, :, :20] = 1.0
    assert resize_square(img, 10, "squash").shape == (1, 10, 10)
    crop = resize_square(img, 10, "crop")  # center crop of the 10x20 resize
    np.testing.assert_allclose(crop[0, :, :5], 1.0)
    pad = resize_square(img, 10, "pad")  # 5x10 image centered, zero rows above/below
    assert pad[0, 0].max() == 0.0 and pad[0, 5, 0] == 1.0


def test_labels_csv_beside_a_cache_must_match_it(tmp_path: Path) -> None:
    """A cache keeps its manifest's labels; a different data.labels is refused, not ignored."""
    from helpers import recipe, write_labels_csv, write_separable_set

    from beitdomain.data.labeled import labeled_data
    from beitdomain.user import UserError

    root = write_separable_set(tmp_path / "data", per_class=6, size=32)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    rows = [(f, f.split("/")[0]) for f in files]
    good = write_labels_csv(tmp_path / "labels.csv", rows)
    build_cache(scan(root, good), tmp_path / "cache", size=32)
    r = recipe([], **{"data.cache": str(tmp_path / "cache"), "data.labels": str(good)})
    r.data.root = str(root)
    assert sorted(labeled_data(r, progress=False).classes) == ["horizontal", "vertical"]

    swapped = [(rows[0][0], "vertical"), *rows[1:]]
    r.data.labels = str(write_labels_csv(tmp_path / "other.csv", swapped))
    with pytest.raises(UserError, match=r"does not match.*1 file\(s\) differ") as e:
        labeled_data(r, progress=False)
    assert rows[0][0] in str(e.value) and "beitdomain data scan" in str(e.value)

    # A file the cache quarantined (unreadable, data.on_error=skip) is not a mismatch.
    (root / "horizontal" / "broken.png").write_bytes(b"not a png")
    with_broken = write_labels_csv(tmp_path / "all.csv", [*rows, ("horizontal/broken.png", "h")])
    build_cache(scan(root, with_broken, on_error="skip"), tmp_path / "cache2", size=32)
    assert [p for p, _ in CachedImages(tmp_path / "cache2").errors] == ["horizontal/broken.png"]
    r.data.cache, r.data.labels = str(tmp_path / "cache2"), str(with_broken)
    assert len(labeled_data(r, progress=False).files["train"]) > 0
