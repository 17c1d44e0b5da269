"""Fuzzing the readers with mutated real files: every call ends, and it either returns a finite
float32 image in [0, 1] or raises `ReaderError`; no other exception, no hang.

Calls run in one worker process with a timeout, so a hang inside a C decoder fails the test
instead of freezing the suite (hypothesis' own deadline cannot interrupt a call).
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
from helpers import bundled_dicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TIMEOUT_S = 30


def _load_and_check(path: str) -> tuple[str, str]:
    """Runs in the worker: ('ok', shape) | ('reader_error', reason) | ('bad', description)."""
    import traceback

    from beitdomain.io import ReaderError, load_image

    try:
        image, meta = load_image(path)
    except ReaderError as e:
        return "reader_error", e.reason
    except BaseException as e:
        return "bad", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
    if not isinstance(image, np.ndarray) or image.dtype != np.float32:
        return "bad", f"returned {type(image).__name__} {getattr(image, 'dtype', '')}"
    if image.ndim not in (3, 4) or image.size == 0:
        return "bad", f"returned shape {image.shape}"
    if not np.isfinite(image).all():
        return "bad", "returned non-finite values"
    if image.min() < 0.0 or image.max() > 1.0:
        return "bad", f"returned values in [{image.min()}, {image.max()}]"
    if not isinstance(meta, dict):
        return "bad", f"meta is {type(meta).__name__}"
    return "ok", str(image.shape)


@pytest.fixture(scope="module")
def worker():
    pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
    yield pool
    for proc in list(getattr(pool, "_processes", {}).values()):  # a hung decoder: stop it
        proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def _seeds(tmp: Path) -> dict[str, bytes]:
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(0)
    tif = io.BytesIO()
    tifffile.imwrite(tif, rng.integers(0, 4096, (40, 48), dtype=np.uint16))
    tif_deflate = io.BytesIO()
    tifffile.imwrite(tif_deflate, rng.random((24, 24), dtype=np.float32), compression="zlib")
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(png, format="PNG")
    return {
        "dicom": bundled_dicom("CT_small.dcm").read_bytes(),
        "tiff": tif.getvalue(),
        "tiff-deflate": tif_deflate.getvalue(),
        "png": png.getvalue(),
    }


@st.composite
def mutations(draw, size: int):
    """Byte edits biased towards headers, plus optional truncation and insertion."""
    head = min(size - 1, 1024)
    pos = st.one_of(st.integers(0, head), st.integers(0, size - 1))
    edits = draw(st.lists(st.tuples(pos, st.integers(0, 255)), min_size=0, max_size=24))
    cut = draw(st.one_of(st.none(), st.integers(1, size)))
    insert = draw(st.one_of(st.none(), st.tuples(pos, st.binary(min_size=1, max_size=64))))
    return edits, cut, insert


def _mutate(data: bytes, edits, cut, insert) -> bytes:
    buf = bytearray(data)
    for i, b in edits:
        buf[i] = b
    if insert is not None:
        i, blob = insert
        buf[i:i] = blob
    if cut is not None:
        buf = buf[:cut]
    return bytes(buf)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return _seeds(tmp_path_factory.mktemp("seeds"))


def test_unmutated_seeds_load(worker, seeds, tmp_path):
    """The seeds are valid files, so the mutations start from real, decodable content."""
    for fmt, data in seeds.items():
        path = tmp_path / f"seed-{fmt}"
        path.write_bytes(data)
        status, detail = worker.submit(_load_and_check, str(path)).result(timeout=TIMEOUT_S)
        assert status == "ok", (fmt, detail)


@pytest.mark.parametrize("fmt", ["dicom", "tiff", "tiff-deflate", "png"])
def test_mutated_files_load_or_raise_reader_error(fmt, worker, seeds, tmp_path_factory):
    data = seeds[fmt]
    folder = tmp_path_factory.mktemp(f"fuzz-{fmt}")
    outcomes: dict[str, int] = {"ok": 0, "reader_error": 0}

    @settings(
        max_examples=60,
        deadline=None,  # the worker's timeout bounds each call instead
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(mutations(len(data)))
    def check(m):
        path = folder / f"case.{fmt}"
        path.write_bytes(_mutate(data, *m))
        future = worker.submit(_load_and_check, str(path))
        try:
            status, detail = future.result(timeout=TIMEOUT_S)
        except cf.TimeoutError:
            pytest.fail(f"load_image hung for > {TIMEOUT_S} s on a mutated {fmt} ({m})")
        assert status != "bad", detail
        outcomes[status] += 1

    check()
    # both outcomes occur: the mutations reach the decoders, not only the format sniffing
    assert outcomes["reader_error"] > 0, outcomes
