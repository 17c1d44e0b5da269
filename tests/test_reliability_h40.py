"""Issue 40, the items left after the first passes: run folders made through `make_dirs`,
`--resume` on other data, CSV manifests (their root, a carriage return in a name), a failed
`data cache` build, a failure between a job's start and its training, and the cosmetic items
(C1-C4)."""

from __future__ import annotations

from pathlib import Path

import pytest

# --------------------------------------------------------------------------------------------
# B11: the run folder itself is made through fileio.make_dirs
# --------------------------------------------------------------------------------------------


def test_a_run_folder_that_cannot_be_made_is_a_write_error_naming_it(tmp_path):
    from beitdomain.engine.run.folder import RunDir
    from beitdomain.fileio import WriteError

    (tmp_path / "f").write_text("a file, not a folder")
    with pytest.raises(WriteError, match="could not create the folder") as e:
        RunDir.open(tmp_path / "f" / "run", kind="pretrain")
    assert str(tmp_path / "f" / "run") in str(e.value)
    assert (tmp_path / "f").read_text() == "a file, not a folder"


# --------------------------------------------------------------------------------------------
# B17: --resume on other data is refused (or, when allowed, recorded beside the first data)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    from helpers import write_separable_set

    return write_separable_set(tmp_path_factory.mktemp("h40") / "stripes", per_class=6, size=32)


def _tok_recipe(root, steps=2):
    from helpers import TOKENIZER_SETS, recipe

    sets = [*TOKENIZER_SETS, f"tokenizer.train.steps={steps}", "tokenizer.train.ckpt_every=1"]
    return recipe(sets, **{"data.root": str(root)})


def test_resume_on_other_data_is_refused_and_when_allowed_keeps_the_first_fingerprint(
    stripes, tmp_path
):
    import json
    import shutil

    from helpers import lose_newest_checkpoint

    from beitdomain.engine.run.folder import OtherDataError
    from beitdomain.engine.tokenizer import train_tokenizer

    out = tmp_path / "tok"
    train_tokenizer(_tok_recipe(stripes), out, device="cpu", quiet=True)
    lose_newest_checkpoint(out, "tokenizer.safetensors")
    first = json.loads((out / "manifest.json").read_text())
    other = shutil.copytree(stripes / "horizontal", tmp_path / "other" / "horizontal")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(OtherDataError) as e:
        train_tokenizer(_tok_recipe(other.parent), out, device="cpu", quiet=True, resume=True)
    assert first["data_fingerprint"][:16] in str(e.value)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    train_tokenizer(
        _tok_recipe(other.parent), out, device="cpu", quiet=True, resume=True,
        resume_other_data=True,
    )  # fmt: skip
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "completed"
    assert m["data_fingerprint"] == first["data_fingerprint"]
    assert m["pretraining_data"] == first["pretraining_data"]
    assert [o["data_fingerprint"] for o in m["other_data"]] != [first["data_fingerprint"]]
    assert len(m["other_data"]) == 1
    assert m["other_data"][0]["pretraining_data"] != first["pretraining_data"]


# --------------------------------------------------------------------------------------------
# B15, B16: a CSV manifest holds any file name and opens from any folder
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_manifest_opens_from_another_folder_with_its_data_root(
    stripes, tmp_path, monkeypatch, suffix
):
    from beitdomain.data.index import Manifest, scan

    monkeypatch.chdir(stripes.parent)  # relative paths, as a user types them
    out = tmp_path / "lists" / f"scan{suffix}"
    scan(stripes.name).save(out)
    monkeypatch.chdir(tmp_path)
    m = Manifest.load(Path("lists") / out.name)
    assert len(m) == 12
    assert all(m.abspath(e).is_file() for e in m.entries)
    assert Path(m.root).resolve() == stripes.resolve()


def test_a_carriage_return_in_a_file_name_survives_a_csv_manifest(stripes, tmp_path):
    import shutil

    from beitdomain.data.index import Manifest, scan

    root = shutil.copytree(stripes, tmp_path / "d")
    shutil.copy(root / "horizontal" / "horizontal_000.png", root / "horizontal" / "x\ry.png")
    (root / "vertical" / "vertical_000.png").write_bytes(b"not an image")
    (root / "vertical" / "vertical_000.png").rename(root / "vertical" / "bad\r.png")
    m = scan(root, on_error="skip")
    m.save(tmp_path / "scan.csv")
    back = Manifest.load(tmp_path / "scan.csv")
    assert [e.path for e in back.entries] == [e.path for e in m.entries]
    assert "horizontal/x\ry.png" in {e.path for e in back.entries}
    assert [p for p, _ in back.errors] == ["vertical/bad\r.png"]


# --------------------------------------------------------------------------------------------
# A failed `data cache` leaves --out as it found it
# --------------------------------------------------------------------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_a_failed_cache_build_leaves_no_folder_marker_or_lock_behind(stripes, tmp_path):
    import shutil

    from beitdomain.data.cache import build_cache
    from beitdomain.data.index import ScanError

    root = shutil.copytree(stripes, tmp_path / "d")
    (root / "vertical" / "vertical_000.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    with pytest.raises(ScanError):
        build_cache(root, tmp_path / "new" / "c", size=16)
    assert not (tmp_path / "new").exists()

    (tmp_path / "empty").mkdir()
    with pytest.raises(ScanError):
        build_cache(root, tmp_path / "empty", size=16)
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_failed_rebuild_keeps_the_old_cache_whole(stripes, tmp_path):
    import shutil

    from beitdomain.data.cache import CachedImages, build_cache
    from beitdomain.data.index import ScanError, scan

    root = shutil.copytree(stripes, tmp_path / "d")
    build_cache(root, tmp_path / "c", size=16)
    before = _tree(tmp_path / "c")
    listed = scan(root)  # the file breaks after the scan: the build fails while decoding
    (root / "vertical" / "vertical_000.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    with pytest.raises(ScanError):
        build_cache(listed, tmp_path / "c", size=24, on_error="fail")
    assert _tree(tmp_path / "c") == before
    assert len(CachedImages(tmp_path / "c", verify=False)) == 12  # its source changed since


# --------------------------------------------------------------------------------------------
# A failure after a job's start and before its training is recorded (or comes before the start)
# --------------------------------------------------------------------------------------------


def test_a_knn_check_without_labels_is_refused_before_the_run_starts(stripes, tmp_path):
    import shutil

    from helpers import PRETRAIN_SETS, recipe

    from beitdomain.engine.pretrain import pretrain
    from beitdomain.user import UserError

    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted(stripes.rglob("*.png"))):
        shutil.copy(f, flat / f"{i}.png")  # no subfolders: no labels
    sets = [*PRETRAIN_SETS, "model.target=pixels", "pretrain.knn_every=1", "pretrain.train.steps=1"]
    r = recipe(sets, **{"data.root": str(flat), "data.image_size": 32})
    with pytest.raises(UserError, match="needs labelled images"):
        pretrain(r, tmp_path / "pre", device="cpu", quiet=True)
    assert not (tmp_path / "pre").exists()


def test_a_job_failing_between_its_start_and_its_training_is_marked_failed(
    stripes, tmp_path, monkeypatch
):
    import json

    import beitdomain.engine.job as job_mod
    from beitdomain.engine.job import Job
    from beitdomain.user import UserError

    def refuse(*args, **kwargs):
        raise UserError("the plan cannot be made")

    monkeypatch.setattr(job_mod, "plan_run", refuse)
    job = Job.open("tokenizer", _tok_recipe(stripes), tmp_path / "t", device="cpu", quiet=True)
    job.start("f" * 64)
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["status"] == "running"
    with pytest.raises(UserError):
        job.plan([])
    m = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert m["status"] == "failed"
    assert m["error"] == "UserError: the plan cannot be made"


# --------------------------------------------------------------------------------------------
# C2: a run resumed to the end does not keep the error of the start that stopped
# --------------------------------------------------------------------------------------------


def test_a_run_resumed_to_completion_keeps_its_old_error_only_as_history(tmp_path):
    import json

    from beitdomain.engine.run.folder import RunDir

    run = RunDir.open(tmp_path / "r", kind="pretrain")
    run.start("pretrain", None, "cpu", data_fingerprint="a" * 64)
    with pytest.raises(KeyboardInterrupt), run.recording_failures():
        raise KeyboardInterrupt("interrupted at step 11 (SIGTERM)")
    again = RunDir.open(tmp_path / "r", kind="pretrain", resume=True)
    again.start("pretrain", None, "cpu", data_fingerprint="a" * 64)
    again.finish(result={"steps": 20})
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert m["status"] == "completed"
    assert "error" not in m
    assert [(s["status"], s["error"]) for s in m["stops"]] == [
        ("interrupted", "interrupted at step 11 (SIGTERM)")
    ]


# --------------------------------------------------------------------------------------------
# C3: '~' in --out is the home folder, as in the protected paths, never a folder named '~'
# --------------------------------------------------------------------------------------------


def test_a_quoted_tilde_in_out_means_the_home_folder(stripes, tmp_path, monkeypatch):
    from beitdomain.data.cache import build_cache
    from beitdomain.engine.run.folder import RunDir
    from beitdomain.engine.run.guard import RunDirError

    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    (home / "notes" / "thesis.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunDirError):
        RunDir.check("~", kind="pretrain")  # the home folder holds files the run did not write
    run = RunDir.open("~/runs/p", kind="pretrain")
    assert run.path == home / "runs" / "p" and run.path.is_dir()
    run.close()
    assert build_cache(stripes, "~/c", size=16).cache_dir == home / "c"
    assert not (tmp_path / "~").exists()


# --------------------------------------------------------------------------------------------
# CSV outputs: a cell a spreadsheet would run as a formula is written as text (OWASP)
# --------------------------------------------------------------------------------------------


def test_spreadsheet_text_neutralises_formulas_and_round_trips():
    from beitdomain.fileio import from_spreadsheet_text, spreadsheet_text

    for text in ('=HYPERLINK("http://x")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "\tx", "'q"):
        assert spreadsheet_text(text).startswith("'")
        assert from_spreadsheet_text(spreadsheet_text(text)) == text
    assert spreadsheet_text("cls_a/000.png") == "cls_a/000.png"


def test_a_csv_manifest_writes_formula_labels_as_text_and_reads_them_back(stripes, tmp_path):
    import shutil

    from beitdomain.data.index import Manifest, scan

    root = tmp_path / "d"
    shutil.copytree(stripes / "horizontal", root / "=HYPERLINK(1)")
    shutil.copytree(stripes / "vertical", root / "@SUM(A1)")
    m = scan(root)
    m.save(tmp_path / "scan.csv")
    text = (tmp_path / "scan.csv").read_text()
    assert "\n=" not in text and ",=" not in text and ",@" not in text
    assert ",'=HYPERLINK(1)," in text
    back = Manifest.load(tmp_path / "scan.csv")
    assert back.classes == ["=HYPERLINK(1)", "@SUM(A1)"]
    assert [e.path for e in back.entries] == [e.path for e in m.entries]


# --------------------------------------------------------------------------------------------
# A cache's pixels carry a sampled checksum: a zeroed images.npy is refused as it opens
# --------------------------------------------------------------------------------------------


def test_a_zeroed_cache_images_file_is_refused_as_it_opens(stripes, tmp_path):
    import numpy as np

    from beitdomain.data.cache import CachedImages, CacheError, build_cache

    c = build_cache(stripes, tmp_path / "c", size=16).cache_dir
    assert len(CachedImages(c)) == 12
    images = np.load(c / "images.npy", mmap_mode="r+")
    images[:] = 0  # what a bad disk leaves: the header intact, the pixels gone
    images.flush()
    del images
    with pytest.raises(CacheError, match="sampled images differ"):
        CachedImages(c, verify=False)
