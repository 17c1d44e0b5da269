"""Shared test fixtures: small real-looking images on disk, a fast CPU torch."""

from __future__ import annotations

import os

import pytest

# Two cores: keep torch from oversubscribing when pytest and loaders share them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(2)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny models gain nothing from intra-op threads, and on a shared 2-core machine their
    spin-waiting made training tests ~10x slower. Restores the setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
