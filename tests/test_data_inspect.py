"""Contact sheets from a folder's manifest, a path list and a cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file

from beitdomain.data.cache import build_cache
from beitdomain.data.index import scan
from beitdomain.data.inspect import contact_sheet
from beitdomain.io import IntensitySpec


def test_contact_sheet_sources(tmp_path: Path):
    root = tmp_path / "data"
    root.mkdir()
    for k in range(5):
        Image.fromarray(np.full((20, 20), 40 * k, np.uint8)).save(root / f"{k}.png")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "Secretname^Person"
    ds.save_as(root / "ct.dcm")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nxx")
    manifest = scan(root, on_error="skip")
    out = contact_sheet(manifest, IntensitySpec(window="ct-lung"), tmp_path / "m.png", n=4)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 200
    paths = sorted(str(p) for p in root.iterdir())
    contact_sheet(paths, None, tmp_path / "p.png", n=16)  # includes the unreadable file
    cache = build_cache(manifest, tmp_path / "cache", size=16)
    contact_sheet(cache, None, tmp_path / "c.png", n=3)
    for name in ("m.png", "p.png", "c.png"):
        assert b"Secretname" not in (tmp_path / name).read_bytes()
