"""The inspection commands a new user runs first (issue 39 items 5 and 7): `data inspect`
takes the recipe training takes (-r/--set) and warns when a flag shows something else;
`tokenizer inspect` reads a cache or a folder with --on-error, writes nothing outside --out,
and its inspect.json holds numbers, not the table's display strings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import write_separable_set, write_tiny_tokenizer
from typer.testing import CliRunner

from beitdomain.cli.app import app


def invoke(*args: str):
    return CliRunner().invoke(app, ["--device", "cpu", "--quiet", *args], env={"COLUMNS": "2000"})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("inspect")
    data = write_separable_set(tmp / "data", per_class=4, size=32)
    corrupt = write_separable_set(tmp / "corrupt", per_class=4, size=32)
    cut = corrupt / "horizontal" / "horizontal_000.png"
    cut.write_bytes(cut.read_bytes()[:60])  # a truncated PNG
    return {"data": data, "corrupt": corrupt, "tok": write_tiny_tokenizer(tmp / "tok"), "tmp": tmp}


def test_data_inspect_takes_the_recipe_and_warns_when_a_flag_differs(files):
    out = files["tmp"] / "sheet.png"
    res = invoke("data", "inspect", str(files["data"]), "-r", "cpu-dicom", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert out.is_file() and "WARNING" not in res.output, res.output
    res = invoke(
        "data", "inspect", str(files["data"]), "-r", "cpu-dicom", "--normalize", "dtype",
        "--out", str(out),
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    said = [line for line in res.output.splitlines() if "WARNING" in line]
    assert len(said) == 1, res.output
    assert "--normalize dtype differs from the recipe cpu-dicom (normalize: auto)" in said[0]


def test_tokenizer_inspect_skips_unreadable_files_into_out_and_writes_numbers(files):
    out = files["tmp"] / "tok-check"
    res = invoke(
        "tokenizer", "inspect", str(files["tok"]), "--data", str(files["corrupt"]),
        "--on-error", "skip", "--n", "4", "--out", str(out),
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "horizontal_000.png" in (out / "quarantine.csv").read_text()
    assert sorted(p.name for p in files["corrupt"].parent.iterdir() if p.suffix == ".csv") == []
    report = json.loads((out / "inspect.json").read_text())
    assert report["vocabulary"] == 64 and report["images"] == 4
    assert isinstance(report["parameters"], int) and isinstance(report["psnr"], float)


def test_tokenizer_inspect_reads_a_cache(files):
    cache = files["tmp"] / "cache"
    res = invoke("data", "cache", str(files["data"]), "--size", "32", "--out", str(cache))
    assert res.exit_code == 0, res.output
    out = files["tmp"] / "tok-cache"
    res = invoke(
        "tokenizer", "inspect", str(files["tok"]), "--cache", str(cache), "--n", "4",
        "--out", str(out),
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((out / "inspect.json").read_text())["images"] == 4


def test_data_inspect_says_which_files_it_left_out(files):
    out = files["tmp"] / "corrupt-sheet.png"
    res = invoke("data", "inspect", str(files["corrupt"]), "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "1 unreadable file left out, e.g. horizontal/horizontal_000.png" in res.output
