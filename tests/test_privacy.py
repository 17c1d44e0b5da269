"""No patient-identifying DICOM attribute leaves the input files.

DICOMs carrying a PatientName, PatientID and PatientBirthDate go through every command that
reads them (data scan, data cache, data inspect, tokenizer train, pretrain from the cache,
finetune, predict); then every file those commands wrote, text or binary, and everything they
printed, is searched for those values.
"""

from __future__ import annotations

import pytest
from helpers import (
    FINETUNE_SETS,
    PRETRAIN_SETS,
    TOKENIZER_SETS,
    sets_to_args,
    write_dicom_with_phi,
)
from typer.testing import CliRunner

from beitdomain.cli.app import app

runner = CliRunner()
NAME, FAMILY, GIVEN = "Zqxonly^Quixote", "Zqxonly", "Quixote"
PATIENT_ID = "PID7731942"
BIRTH = "19470312"
SECRETS = [NAME, FAMILY, GIVEN, PATIENT_ID, BIRTH, "1947-03-12", "12.03.1947"]


def _leaks(data: bytes) -> list[str]:
    """The secrets found in `data`: as ASCII/UTF-8 or UTF-16, in any letter case."""
    low = data.lower()
    return [
        s
        for s in SECRETS
        if any(s.lower().encode(enc) in low for enc in ("utf-8", "utf-16-le", "utf-16-be"))
    ]


@pytest.fixture(scope="module")
def dicom_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("phi")
    root = tmp / "dicoms"
    for label, source in (("a", "CT_small.dcm"), ("b", "CT_small.dcm")):
        for i in range(6):
            seed = i + (100 if label == "b" else 0)
            write_dicom_with_phi(
                root / label / f"img{i:02d}.dcm", NAME, PATIENT_ID, BIRTH, source=source, seed=seed
            )
    out = tmp / "out"
    outputs: list[str] = []

    def run(*args: str) -> None:
        res = runner.invoke(app, ["--device", "cpu", *args])
        outputs.append(res.output)
        assert res.exit_code == 0, f"{args[:2]}: {res.output}"

    run("data", "scan", str(root), "--out", str(out / "manifest.jsonl"))
    run("data", "cache", str(root), "--out", str(out / "cache"), "--size", "72")
    run("data", "inspect", str(root), "--out", str(out / "sheet.png"), "--n", "4")
    run(
        "tokenizer",
        "train",
        "--data",
        str(root),
        "--out",
        str(out / "tok"),
        *sets_to_args([*TOKENIZER_SETS, "tokenizer.train.steps=3", "tokenizer.train.ckpt_every=2"]),
    )
    run(
        "pretrain",
        "--cache",
        str(out / "cache"),
        "--tokenizer",
        str(out / "tok"),
        "--out",
        str(out / "pre"),
        *sets_to_args([*PRETRAIN_SETS, "pretrain.train.steps=3", "pretrain.train.ckpt_every=2"]),
    )
    run(
        "finetune",
        "--data",
        str(root),
        "--init",
        str(out / "pre"),
        "--out",
        str(out / "ft"),
        *sets_to_args([*FINETUNE_SETS, "finetune.train.steps=2", "finetune.train.ckpt_every=1"]),
    )
    run("predict", str(out / "ft"), str(root), "--out", str(out / "predictions.csv"))
    return tmp, root, outputs


def test_inputs_do_carry_the_identifiers(dicom_runs):
    """The search would find them: the inputs hold them in the clear."""
    _, root, _ = dicom_runs
    first = next(root.rglob("*.dcm")).read_bytes()
    assert {NAME, PATIENT_ID, BIRTH} <= set(_leaks(first))


def test_no_written_file_contains_an_identifier(dicom_runs):
    tmp, root, _ = dicom_runs
    written = [p for p in tmp.rglob("*") if p.is_file() and root not in p.parents]
    kinds = {p.suffix for p in written}
    # the search covered what the runs write: weights, checkpoints, cache, tables, logs, plots
    assert {".safetensors", ".pt", ".jsonl", ".csv", ".png", ".yaml"} <= kinds, kinds
    assert any(p.parent.name == "cache" for p in written)
    assert len(written) > 30
    leaks = {str(p.relative_to(tmp)): found for p in written if (found := _leaks(p.read_bytes()))}
    assert leaks == {}


def test_no_output_on_the_console_contains_an_identifier(dicom_runs):
    _, _, outputs = dicom_runs
    assert len(outputs) == 7
    for text in outputs:
        assert _leaks(text.encode()) == [], text


def test_the_search_finds_utf16_and_any_case(tmp_path):
    probe = tmp_path / "probe.bin"
    probe.write_bytes(b"\x00\x01" + PATIENT_ID.encode("utf-16-le") + b"\x00" + b"zqxonly")
    assert set(_leaks(probe.read_bytes())) == {PATIENT_ID, FAMILY}
