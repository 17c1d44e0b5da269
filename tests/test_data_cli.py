"""``beitdomain data ...`` and ``readers list`` through Typer's CliRunner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import said
from PIL import Image
from typer.testing import CliRunner

from beitdomain.cli.data import app, readers_app
from beitdomain.data.cache import CachedImages
from beitdomain.data.index import Manifest

runner = CliRunner()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for label in ("ok", "bad"):
        (root / label).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((24, 24), 50 * k, np.uint8)).save(root / label / f"{k}.png")
    return root


def test_scan_writes_manifest_and_summary(folder: Path, tmp_path: Path):
    out = tmp_path / "m.jsonl"
    result = runner.invoke(app, ["scan", str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "4 images" in result.output and "by label" in result.output
    assert len(Manifest.load(out)) == 4


def test_scan_fails_listing_bad_files_then_skip(folder: Path, tmp_path: Path):
    (folder / "ok" / "zero.png").write_bytes(b"")
    result = runner.invoke(app, ["scan", str(folder)])
    assert result.exit_code == 2
    assert "ok/zero.png" in result.output and "file is empty" in result.output
    out = tmp_path / "m.jsonl"
    result = runner.invoke(app, ["scan", str(folder), "--on-error", "skip", "-o", str(out)])
    assert result.exit_code == 0 and said(result.output, "1 unreadable")  # rich wraps lines
    assert (tmp_path / "m.errors.csv").read_text().count("zero.png") == 1


def test_cache_then_inspect(folder: Path, tmp_path: Path):
    cache_dir = tmp_path / "cache"
    args = ["cache", str(folder), "--out", str(cache_dir), "--size", "16", "--window", "100,50"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "cache written" in result.output
    assert CachedImages(cache_dir).settings["spec"]["window"] == [100.0, 50.0]
    result = runner.invoke(app, args)
    assert "cache up to date" in result.output
    sheet = tmp_path / "sheet.png"
    result = runner.invoke(app, ["inspect", str(cache_dir), "--out", str(sheet), "--n", "2"])
    assert result.exit_code == 0, result.output
    assert sheet.stat().st_size > 1000


def test_bad_option_values(folder: Path, tmp_path: Path):
    result = runner.invoke(app, ["cache", str(folder), "-o", str(tmp_path / "c"), "--window", "x"])
    assert result.exit_code != 0 and "neither a preset" in result.output


def test_readers_list():
    result = runner.invoke(readers_app, ["list"])
    assert result.exit_code == 0
    for name in ("dicom", "tiff", "pillow", "built-in"):
        assert name in result.output


def test_help_has_examples():
    for cmd in ("scan", "cache", "inspect"):
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0 and "beitdomain data" in result.output


def _bands(root: Path, n: int = 3, bands: int = 4, nan_in: int | None = None) -> Path:
    """Four-band float TIFFs (RGBN-like); one optionally holding a NaN."""
    import tifffile

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        arr = rng.random((bands, 20, 20)).astype(np.float32)
        if k == nan_in:
            arr[1, 3, 3] = np.nan
        tifffile.imwrite(
            root / f"scene{k}.tif", arr, photometric="minisblack", planarconfig="separate"
        )
    return root


def test_scan_flags_what_cache_would_reject(tmp_path: Path):
    """Non-finite values and channel counts fail in `data scan`, with the cache's options."""
    root = _bands(tmp_path / "scenes", nan_in=1)
    result = runner.invoke(app, ["scan", str(root)])
    assert result.exit_code == 2
    # Every file has 4 bands: one message per file, naming the option that fixes it.
    assert result.output.count("4 samples per pixel") == 3, result.output
    result = runner.invoke(app, ["scan", str(root), "--channels", "0,1,3"])
    assert result.exit_code == 2
    assert "scene1.tif" in result.output and "NaN or Inf" in result.output
    assert "scene0.tif" not in result.output.split("could not be used")[1]
    result = runner.invoke(app, ["scan", str(root), "--channels", "0,1,3", "--nonfinite", "zero"])
    assert result.exit_code == 0, result.output
    assert "3 images" in result.output


def test_channels_on_cache_and_inspect(tmp_path: Path):
    root = _bands(tmp_path / "scenes")
    cache_dir = tmp_path / "cache"
    args = ["cache", str(root), "-o", str(cache_dir), "--size", "16", "--channels", "3,0,1"]
    result = runner.invoke(app, [*args, "--in-chans", "3"])
    assert result.exit_code == 0, result.output
    cached = CachedImages(cache_dir)
    assert cached.settings["spec"]["channels"] == [3, 0, 1] and cached.images.shape[1] == 3
    sheet = tmp_path / "sheet.png"
    result = runner.invoke(
        app, ["inspect", str(root), "-o", str(sheet), "--n", "2", "--channels", "2"]
    )
    assert result.exit_code == 0, result.output
    assert sheet.is_file()
    result = runner.invoke(app, ["scan", str(root), "--channels", "0,x"])
    assert result.exit_code == 2 and "--channels" in result.output
    result = runner.invoke(app, ["scan", str(root), "--channels", "7"])
    assert result.exit_code == 2 and "channels=[7] but the file has 4 samples" in result.output
