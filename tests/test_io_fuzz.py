"""Fuzzing readers with mutated real files: a result in [0, 1] or a ReaderError, nothing else."""

from __future__ import annotations

import tempfile
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file

from beitdomain.io import IntensitySpec, ReaderError, load_image


def _seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (24, 24), dtype=np.uint8)
    png, tif = BytesIO(), BytesIO()
    Image.fromarray(arr).save(png, format="PNG")
    tifffile.imwrite(tif, arr.astype(np.uint16) * 100, compression="zlib")
    return {
        "dcm": Path(get_testdata_file("MR_small.dcm")).read_bytes(),
        "png": png.getvalue(),
        "tif": tif.getvalue(),
    }


SEEDS = _seeds()
mutations = st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=8)


@pytest.mark.parametrize("kind", sorted(SEEDS))
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(edits=mutations, cut=st.one_of(st.none(), st.integers(0, 10**9)))
def test_mutated_files(kind: str, edits: list[tuple[int, int]], cut: int | None):
    data = bytearray(SEEDS[kind])
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzz.{kind}"
        path.write_bytes(bytes(data))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image, _ = load_image(path, IntensitySpec(nonfinite="zero"))
        except ReaderError as e:
            assert e.path == str(path)
            return
        assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
