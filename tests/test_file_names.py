"""File names that are not UTF-8, label CSVs from Excel or in Latin-1, and predict on bad files.

Exported medical and legacy drives hold names like ``bad\\xff\\xfe.png``; on Linux Python sees
them as surrogates (PEP 383). Every command must take them through to its outputs and back.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FINETUNE_SETS, PRETRAIN_SETS, cli, sets_to_args, write_separable_set

from beitdomain.data.cache import CachedImages
from beitdomain.data.index import Manifest, ScanError, read_labels_csv, scan

BAD = os.fsdecode(b"bad\xff\xfe.png")  # 'bad\udcff\udcfe.png'


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_separable_set(tmp_path_factory.mktemp("names") / "stripes", per_class=8)
    good = root / "horizontal" / "horizontal_000.png"
    (root / "horizontal" / BAD).write_bytes(good.read_bytes())
    assert os.fsencode(BAD) in os.listdir(os.fsencode(root / "horizontal"))
    return root


def test_the_file_system_holds_a_non_utf8_name(data):
    with pytest.raises(UnicodeEncodeError):
        BAD.encode("utf-8")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_scan_writes_and_reads_back_a_non_utf8_name(data, tmp_path, suffix):
    out = tmp_path / f"manifest{suffix}"
    res = cli("data", "scan", str(data), "--out", str(out))
    assert res.exit_code == 0, res.output
    m = Manifest.load(out, root=data)
    bad = [e for e in m.entries if e.path.endswith(BAD)]
    assert len(bad) == 1 and m.abspath(bad[0]).is_file()
    assert m.fingerprint() == scan(data).fingerprint()


def test_cache_and_inspect_take_a_non_utf8_name(data, tmp_path):
    res = cli("data", "cache", str(data), "--out", str(tmp_path / "c"), "--size", "32")
    assert res.exit_code == 0, res.output
    cached = CachedImages(tmp_path / "c")
    assert any(cached.source(i)[0].endswith(BAD) for i in range(len(cached)))
    res = cli("data", "inspect", str(data), "--out", str(tmp_path / "sheet.png"), "--n", "17")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "sheet.png").stat().st_size > 0


def test_pretrain_finetune_and_predict_take_a_non_utf8_name(data, tmp_path):
    pre = [*PRETRAIN_SETS, "pretrain.train.steps=1", "model.target=pixels"]
    res = cli("pretrain", "--data", str(data), "--out", str(tmp_path / "pre"), *sets_to_args(pre))
    assert res.exit_code == 0, res.output
    ft = [*FINETUNE_SETS, "finetune.train.steps=1"]
    ft_out = tmp_path / "ft"
    res = cli(
        "finetune",
        "--data",
        str(data),
        "--init",
        "scratch",
        "--out",
        str(ft_out),
        *sets_to_args(ft),
    )
    assert res.exit_code == 0, res.output
    preds = tmp_path / "preds.csv"
    res = cli("predict", str(ft_out), str(data / "horizontal"), "--out", str(preds))
    assert res.exit_code == 0, res.output
    with open(preds, newline="", encoding="utf-8", errors="surrogateescape") as f:
        names = [Path(r["path"]).name for r in csv.DictReader(f)]
    assert BAD in names and len(names) == 9


# --------------------------------------------------------------------------------------------
# label CSVs
# --------------------------------------------------------------------------------------------


def _labels(root: Path) -> list[tuple[str, str]]:
    return [
        (p.relative_to(root).as_posix(), p.parent.name)
        for p in sorted(root.rglob("*.png"))
        if p.name.isascii()
    ]


def test_label_csv_with_an_excel_byte_order_mark(data, tmp_path):
    rows = _labels(data)
    text = "path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows)
    (tmp_path / "labels.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    got, missing = read_labels_csv(tmp_path / "labels.csv", data)
    assert len(got) == len(rows) and missing == []
    assert sorted({row[1] for row in got}) == ["horizontal", "vertical"]


def test_latin1_label_csv_is_a_clear_error_naming_file_and_encoding(data, tmp_path):
    rows = _labels(data)
    text = "path,label\n" + "".join(
        f"{p},{'défaut' if i == 2 else lab}\n" for i, (p, lab) in enumerate(rows)
    )
    (tmp_path / "latin.csv").write_bytes(text.encode("latin-1"))
    with pytest.raises(ScanError) as e:
        read_labels_csv(tmp_path / "latin.csv", data)
    msg = str(e.value)
    assert "latin.csv" in msg and "line 4" in msg and "not UTF-8" in msg and "d\\xe9faut" in msg
    res = cli("data", "scan", str(data), "--labels", str(tmp_path / "latin.csv"))
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "CSV UTF-8" in res.text


def test_a_label_csv_can_name_a_non_utf8_file(data, tmp_path):
    (tmp_path / "l.csv").write_bytes(b"path,label\nhorizontal/bad\xff\xfe.png,horizontal\n")
    got, missing = read_labels_csv(tmp_path / "l.csv", data)
    assert [row[0].name for row in got] == [BAD] and missing == []


# --------------------------------------------------------------------------------------------
# predict among bad files
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ft_run(data, tmp_path_factory):
    from helpers import recipe

    from beitdomain.engine.finetune import finetune

    out = tmp_path_factory.mktemp("ft") / "run"
    torch.manual_seed(0)
    r = recipe([*FINETUNE_SETS, "finetune.train.steps=1"], **{"data.root": str(data)})
    finetune(r, out, device="cpu", quiet=True)
    return out


def test_predict_skips_a_nan_tiff_and_writes_the_others(ft_run, data, tmp_path):
    import tifffile

    arr = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    arr[3, 5] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", arr)
    good = sorted(str(p) for p in (data / "vertical").glob("*.png"))[:3]
    preds = tmp_path / "p.csv"
    res = cli(
        "predict", str(ft_run), good[0], str(tmp_path / "nan.tif"), *good[1:], "-o", str(preds)
    )
    assert res.exit_code == 0, res.output
    with open(preds, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == good
    errors = (tmp_path / "p.errors.csv").read_text()
    assert "nan.tif" in errors and ("NaN" in errors or "non-finite" in errors)
    assert "skipped 1 file" in res.text
    res = cli(
        "predict", str(ft_run), str(tmp_path / "nan.tif"), "-o", str(preds), "--on-error", "fail"
    )
    assert res.exit_code == 2 and "nan.tif" in res.text
    res = cli(
        "predict", str(ft_run), str(tmp_path / "nan.tif"), "-o", str(preds), "--nonfinite", "zero"
    )
    assert res.exit_code == 0, res.output
    assert preds.read_text().count("nan.tif") == 1
    assert json.loads((ft_run / "results.json").read_text())["classes"]


def test_predict_names_every_skipped_file_of_a_folder_one_way(ft_run, data, tmp_path):
    """C4: a file the scan could not read and one that failed to load are both named from
    inside the folder, as the predictions name its files."""
    import shutil

    import tifffile

    folder = shutil.copytree(data / "vertical", tmp_path / "in" / "vertical")
    arr = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    arr[3, 5] = np.nan
    tifffile.imwrite(folder / "nan.tif", arr)  # scans, then fails to load (non-finite)
    (folder / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")  # fails the scan
    preds = tmp_path / "p.csv"
    res = cli("predict", str(ft_run), str(tmp_path / "in"), "-o", str(preds))
    assert res.exit_code == 0, res.output
    with open(preds, newline="") as f:
        assert all(r["path"].startswith("vertical/") for r in csv.DictReader(f))
    with open(tmp_path / "p.errors.csv", newline="") as f:
        named = sorted(r["path"] for r in csv.DictReader(f))
    assert named == ["vertical/cut.png", "vertical/nan.tif"]


def test_tokenizer_encode_never_replaces_a_file_it_did_not_write(tmp_path):
    # Two inputs named x.png wrote one x.npy (the first map lost), and a user's own x.npy in
    # --out was replaced.
    from PIL import Image

    from beitdomain.engine.tokenizer import encode_files
    from beitdomain.tokenizer import create_tokenizer
    from beitdomain.user import UserError

    torch.manual_seed(0)
    tok = create_tokenizer("tiny", in_chans=1, input_size=32)
    rng = np.random.default_rng(0)
    inputs = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        inputs.append(tmp_path / folder / "x.png")
        Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(inputs[-1])
    out = tmp_path / "tm"
    written = encode_files(tok, inputs, out)
    assert [p.name for p in written] == ["a-x.npy", "b-x.npy"]
    maps = [np.load(p) for p in written]
    assert not np.array_equal(maps[0], maps[1])
    encode_files(tok, inputs, out)  # its own files: a re-run replaces them
    assert np.array_equal(np.load(written[0]), maps[0])
    (tmp_path / "mine").mkdir()
    np.save(tmp_path / "mine" / "x.npy", np.arange(3))
    with pytest.raises(UserError, match="not written by 'tokenizer encode'"):
        encode_files(tok, [inputs[0]], tmp_path / "mine")
    assert np.array_equal(np.load(tmp_path / "mine" / "x.npy"), np.arange(3))


def test_predict_never_writes_over_its_input_or_a_file_it_did_not_write(ft_run, data, tmp_path):
    # 'predict RUN in.png --out in.png' replaced the image with a CSV.
    img = tmp_path / "in.png"
    img.write_bytes(sorted((data / "vertical").glob("*.png"))[0].read_bytes())
    before = img.read_bytes()
    res = cli("predict", str(ft_run), str(img), "-o", str(img))
    assert res.exit_code != 0 and "one of the images to predict" in res.text
    assert img.read_bytes() == before
    notes = tmp_path / "notes.csv"
    notes.write_text("my,own\n1,2\n")
    res = cli("predict", str(ft_run), str(img), "-o", str(notes))
    assert res.exit_code != 0 and "not a predictions CSV" in res.text
    assert notes.read_text() == "my,own\n1,2\n"
    preds = tmp_path / "p.csv"
    for _ in range(2):  # its own predictions: a second run replaces them
        assert cli("predict", str(ft_run), str(img), "-o", str(preds)).exit_code == 0
    assert preds.read_text().startswith("path,frame,predicted,")
