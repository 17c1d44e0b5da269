"""Reader plugins: the example package is really installed and found through its entry point."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from beitdomain.io import IntensitySpec, ReaderError, ReaderRegistry, load_image, read_raw
from beitdomain.io.load import READERS

PLUGIN_SRC = Path(__file__).resolve().parents[1] / "examples" / "reader_plugin"


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """pip-installs the example plugin into a private folder (not the shared environment)."""
    work = tmp_path_factory.mktemp("plugin")
    src = work / "src_copy"
    # Build from a copy so pip's build/ and egg-info never land in the repository.
    shutil.copytree(PLUGIN_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = work / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*cmd, "--target", str(site), str(src)], check=True, capture_output=True)
    return site


@pytest.fixture
def with_plugin(plugin_site: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_site))
    importlib.invalidate_caches()
    yield
    # Forget the plugin again so other tests see only built-ins.
    READERS._readers.pop("npy", None)
    READERS._sources.pop("npy", None)
    READERS.load_plugins(force=False)


def test_plugin_discovered_through_entry_point(with_plugin):
    registry = ReaderRegistry()
    registry.register(READERS.get("dicom"))
    infos = {i.name: i for i in registry.info()}
    assert infos["npy"].source == "beitdomain-npy-reader" and infos["npy"].status == "ok"


def test_plugin_reads_through_load_image(with_plugin, tmp_path: Path):
    READERS.load_plugins(force=True)
    arr = np.arange(12 * 10, dtype=np.float32).reshape(12, 10) / 119.0
    np.save(tmp_path / "x.npy", arr)
    image, meta = load_image(tmp_path / "x.npy", IntensitySpec(normalize="dtype"))
    assert meta["reader"] == "npy" and image.shape == (1, 12, 10)
    np.testing.assert_allclose(image[0], arr, atol=1e-6)
    # A plugin's own exceptions come back as ReaderError naming the file.
    np.save(tmp_path / "bad.npy", np.zeros(5))
    with pytest.raises(ReaderError, match=r"bad\.npy: npy reader failed: ValueError"):
        read_raw(tmp_path / "bad.npy")


def test_without_plugin_npy_is_unrecognized(tmp_path: Path):
    np.save(tmp_path / "x.npy", np.zeros((4, 4)))
    registry = ReaderRegistry(group="beitdomain.readers.none")
    registry.register(READERS.get("tiff"))
    assert registry.find(str(tmp_path / "x.npy"), (tmp_path / "x.npy").read_bytes()[:64]) is None


def test_broken_plugin_is_reported_not_raised(monkeypatch):
    class FakeEP:
        name = "broken"
        dist = None

        def load(self):
            raise ImportError("No module named 'missing_dep'")

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [FakeEP()])
    registry = ReaderRegistry()
    infos = {i.name: i for i in registry.info()}
    assert infos["broken"].status.startswith("failed: ImportError")


def test_builtin_readers_listed():
    names = {i.name: i for i in READERS.info()}
    assert {"dicom", "tiff", "pillow"} <= set(names)
    assert all(names[n].status == "ok" for n in ("dicom", "tiff", "pillow"))
