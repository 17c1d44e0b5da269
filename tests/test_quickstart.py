"""README's quickstart runs exactly as written, so README and CLI cannot drift apart.

The commands are read from the README's quickstart block; only paths are substituted
(`/data/ct` -> a folder of real DICOMs from pydicom's bundled files, `labels.csv`, `ct-cache`,
`runs/...`, ...), and the run is shortened only through `BEITDOMAIN_SET`, which the README
documents for exactly this. The folder holds MR and secondary-capture files (the labels) and
two broken files, so `--on-error skip` has something to skip.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, cli_env

README = REPO / "README.md"
MARKER = "<!-- quickstart:"
SMOKE = ";".join(
    [
        "data.num_workers=0",
        "tokenizer.train.steps=4",
        "tokenizer.train.batch_size=8",
        "tokenizer.sample_every=1000",
        "pretrain.train.steps=4",
        "pretrain.train.batch_size=8",
        "finetune.train.steps=4",
        "finetune.train.min_steps=0",
        "finetune.train.batch_size=8",
        "curve.fractions=[50%, 100%]",
        "curve.seeds=[0]",
    ]
)


def quickstart_commands(text: str) -> list[str]:
    """The `beitdomain ...` lines of the first bash block after the quickstart marker."""
    start = text.index(MARKER)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert block, "README: no ```bash block after the quickstart marker"
    lines = [ln.split("  #")[0].strip() for ln in block.group(1).splitlines()]
    return [ln for ln in lines if ln.startswith("beitdomain ")]


def test_the_readme_quickstart_is_a_complete_chain():
    cmds = quickstart_commands(README.read_text())
    firsts = [" ".join(c.split()[1:3]) for c in cmds]
    for needed in ("data scan", "data cache", "tokenizer train", "finetune --recipe"):
        assert any(f.startswith(needed.split()[0]) for f in firsts), needed
    for c in cmds[1:]:  # every step after the scan names where its data comes from
        if not c.startswith(("beitdomain data", "beitdomain predict", "beitdomain eval")):
            assert "--cache " in c or "--data " in c, c


def _dicom_folder(dst: Path) -> tuple[Path, Path]:
    """MR and SC files from pydicom's test data (three copies each, renamed), two broken
    files, and labels.csv labelling every readable file by modality."""
    from pydicom.data import DATA_ROOT

    src = Path(DATA_ROOT) / "test_files"
    dst.mkdir(parents=True)
    rows = []
    for f in sorted(src.glob("*.dcm")):
        if not f.name.startswith(("MR_", "SC_")) or "truncated" in f.name:
            continue
        for k in range(3):
            name = f"{f.stem}-{k}.dcm"
            shutil.copy(f, dst / name)
            rows.append((name, f.name[:2].lower()))
    for broken in ("MR_truncated.dcm", "rtplan.dcm"):  # truncated pixels; no pixels at all
        shutil.copy(src / broken, dst / broken)
        rows.append((broken, "mr"))  # listed, as a user's CSV would: the scan skips them
    labels = dst.parent / "labels.csv"
    with open(labels, "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label"), *rows])
    return dst, labels


@pytest.mark.slow
def test_the_readme_quickstart_runs_as_written(tmp_path):
    data, labels = _dicom_folder(tmp_path / "data" / "ct")
    new = tmp_path / "new"
    new.mkdir()
    for f in [data / "MR_small-0.dcm", data / "SC_rgb_rle-0.dcm"]:
        shutil.copy(f, new / f.name)
    subst = {"/data/ct-new": str(new), "/data/ct": str(data), "labels.csv": str(labels)}
    env = cli_env(BEITDOMAIN_SET=SMOKE)
    for cmd in quickstart_commands(README.read_text()):
        args = shlex.split(cmd)[1:]
        args = [subst.get(a, a) for a in args]
        res = subprocess.run(
            [sys.executable, "-m", "beitdomain.cli.app", "--device", "cpu", *args],
            cwd=tmp_path,  # relative outputs (scan.jsonl, ct-cache, runs/...) land here
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    # what each step promised
    assert (tmp_path / "scan.jsonl").is_file()
    errors = (tmp_path / "scan.errors.csv").read_text()
    assert "MR_truncated.dcm" in errors and "rtplan.dcm" in errors
    assert (tmp_path / "sheet.png").is_file()
    assert json.loads((tmp_path / "ct-cache" / "cache.json").read_text())
    assert (tmp_path / "runs" / "tok" / "tokenizer.safetensors").is_file()
    assert (tmp_path / "runs" / "pre" / "backbone.safetensors").is_file()
    assert json.loads((tmp_path / "runs" / "ft" / "results.json").read_text())["test"]
    assert (tmp_path / "runs" / "curve" / "report.md").is_file()
    preds = (tmp_path / "predictions.csv").read_text().splitlines()
    assert preds[0] == "path,frame,predicted,p_mr,p_sc"
    assert {row.split(",")[0] for row in preds[1:]} == {"MR_small-0.dcm", "SC_rgb_rle-0.dcm"}


VOLUMES_MARKER = "<!-- quickstart-volumes:"
# The volumes quickstart's ct-dicom recipe (vit-base at 224 px) made tiny for a CPU test.
VOLUMES_SMOKE = ";".join(
    [
        "data.num_workers=0",
        "data.image_size=64",
        "data.tokenizer_size=32",
        "model.preset=tiny",
        "tokenizer.preset=tiny",
        "tokenizer.train.steps=2",
        "tokenizer.train.batch_size=8",
        "tokenizer.sample_every=1000",
        "pretrain.train.steps=2",
        "pretrain.train.batch_size=8",
    ]
)


def block_steps(text: str, marker: str) -> list[tuple[str, str]]:
    """The first bash block after `marker` as ('run', command) for each `beitdomain` line and
    ('write', 'NAME\\ncontent') for each `cat > NAME <<'EOF'` here-document."""
    block = re.search(r"```bash\n(.*?)```", text[text.index(marker) :], re.S)
    assert block, f"README: no ```bash block after {marker}"
    steps, lines = [], iter(block.group(1).splitlines())
    for line in lines:
        heredoc = re.fullmatch(r"cat > (\S+) <<'EOF'", line.strip())
        if heredoc:
            body = []
            for more in lines:
                if more.strip() == "EOF":
                    break
                body.append(more)
            steps.append(("write", heredoc.group(1) + "\n" + "\n".join(body) + "\n"))
        elif line.strip().startswith("beitdomain "):
            steps.append(("run", line.split("  #")[0].strip()))
    return steps


def _nifti_folder(dst: Path) -> tuple[Path, Path]:
    """nibabel's 3D test images (three copies each, renamed; one holds NaNs, so the scan's
    --on-error skip has something to skip), labelled in two classes, a group per copy."""
    from nibabel.testing import data_path

    dst.mkdir(parents=True)
    rows = []
    for name, label in [
        ("anatomical.nii", "a"),
        ("reoriented_anat_moved.nii", "a"),
        ("standard.nii.gz", "b"),
        ("resampled_anat_moved.nii", "b"),  # NaN voxels: skipped
    ]:
        stem, ext = name.split(".", 1)
        for k in range(3):
            shutil.copy(Path(data_path) / name, dst / f"{stem}-{k}.{ext}")
            rows.append((f"{stem}-{k}.{ext}", label, f"{stem}-{k}"))
    labels = dst.parent / "labels.csv"
    with open(labels, "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "group"), *rows])
    return dst, labels


@pytest.mark.slow
def test_the_readme_volumes_quickstart_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("nibabel")
    pytest.importorskip("monai")
    from typer.testing import CliRunner

    from beitdomain.cli.app import app

    data, labels = _nifti_folder(tmp_path / "data" / "ct-nifti")
    subst = {"/data/ct-nifti": str(data), "labels.csv": str(labels)}
    monkeypatch.chdir(tmp_path)  # relative outputs (scan.jsonl, ct-cache, runs/...) land here
    steps = block_steps(README.read_text(), VOLUMES_MARKER)
    assert [k for k, _ in steps].count("run") >= 5
    for kind, step in steps:
        if kind == "write":
            name, content = step.split("\n", 1)
            (tmp_path / name).write_text(content)
            continue
        args = [subst.get(a, a) for a in shlex.split(step)[1:]]
        res = CliRunner().invoke(
            app, ["--device", "cpu", "--quiet", *args], env={"BEITDOMAIN_SET": VOLUMES_SMOKE}
        )
        assert res.exit_code == 0, f"{step}\n{res.output[-3000:]}"
    assert "resampled_anat_moved-0.nii" in (tmp_path / "scan.errors.csv").read_text()
    cache = json.loads((tmp_path / "ct-cache" / "cache.json").read_text())
    assert "ct-abdomen" in json.dumps(cache)
    assert (tmp_path / "runs" / "tok" / "tokenizer.safetensors").is_file()
    assert (tmp_path / "runs" / "pre" / "backbone.safetensors").is_file()
