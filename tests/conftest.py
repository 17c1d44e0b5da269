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
