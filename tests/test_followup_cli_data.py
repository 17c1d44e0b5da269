"""Follow-ups on issues 39 and 40: --resume-other-data on the command line, label subsets that
hold every class, one label-budget warning rule, the --on-error hint, and a label CSV whose paths
repeat the data folder's name."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    from helpers import write_separable_set

    return write_separable_set(tmp_path_factory.mktemp("fu") / "stripes", per_class=6, size=32)


# --------------------------------------------------------------------------------------------
# --resume on other data: the refusal names --resume-other-data, which lets it go on
# --------------------------------------------------------------------------------------------


def test_resume_on_other_data_names_the_flag_and_the_flag_goes_on_with_a_warning(stripes, tmp_path):
    import json
    import shutil

    from helpers import TOKENIZER_SETS, cli, lose_newest_checkpoint, said, sets_to_args

    out = tmp_path / "tok"
    sets = sets_to_args(
        [*TOKENIZER_SETS, "tokenizer.train.steps=2", "tokenizer.train.ckpt_every=1"]
    )
    res = cli("tokenizer", "train", "--data", str(stripes), "--out", str(out), *sets)
    assert res.exit_code == 0, res.output
    lose_newest_checkpoint(out, "tokenizer.safetensors")
    first = json.loads((out / "manifest.json").read_text())["data_fingerprint"]
    other = shutil.copytree(stripes / "horizontal", tmp_path / "other" / "horizontal").parent
    again = ["tokenizer", "train", "--data", str(other), "--out", str(out), "--resume", *sets]

    res = cli(*again)
    assert res.exit_code != 0
    assert said(res.output, "--resume-other-data"), res.output
    assert "Traceback" not in res.output

    res = cli(*again, "--resume-other-data")
    assert res.exit_code == 0, res.output
    assert said(res.output, "resuming on other data"), res.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "completed"
    assert m["data_fingerprint"] == first
    assert len(m["other_data"]) == 1


def test_resume_other_data_without_resume_is_refused(stripes, tmp_path):
    from helpers import cli, said

    res = cli("finetune", "--data", str(stripes), "--out", str(tmp_path / "ft"),
              "--resume-other-data")  # fmt: skip
    assert res.exit_code != 0
    assert said(res.output, "--resume-other-data applies only with --resume"), res.output
    assert not (tmp_path / "ft").exists()


# --------------------------------------------------------------------------------------------
# Whole-group label subsets hold an image of every class (or are refused, naming the class)
# --------------------------------------------------------------------------------------------


def _grouped(tmp_path, per_group: int, train_groups: int):
    """Two classes in groups of `per_group` images, `train_groups` groups of them in the train
    split (a split column) and one group per class in test."""
    import numpy as np
    from helpers import FINETUNE_SETS, recipe
    from PIL import Image

    root = tmp_path / "data"
    root.mkdir(parents=True)
    rows = ["path,label,group,split"]
    for g in range(train_groups + 2):
        for k in range(per_group):
            name = f"p{g}-{k}.png"
            Image.fromarray(np.full((16, 16), 10 * g + k, np.uint8)).save(root / name)
            split = "train" if g < train_groups else "test"
            rows.append(f"{name},{'horizontal' if g % 2 else 'vertical'},P{g},{split}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return recipe(
        [*FINETUNE_SETS, "data.val_fraction=0.0"],
        **{"data.root": str(root), "data.labels": str(tmp_path / "labels.csv")},
    )


def test_a_label_subset_by_whole_groups_holds_every_class(tmp_path, caplog):
    import logging

    from beitdomain.data.labeled import labeled_data
    from beitdomain.data.splits import group_label_subset

    labels = ["horizontal"] * 10 + ["vertical"] * 10
    groups = [f"g{i // 5}" for i in range(20)]
    for seed in range(5):
        got = group_label_subset(labels, groups, "15%", seed)  # 3 labels, groups of 5
        assert {labels[i] for i in got} == {"horizontal", "vertical"}
        assert len(got) == 10
    r = _grouped(tmp_path, per_group=5, train_groups=4)  # 20 train images, as in the issue
    with caplog.at_level(logging.WARNING, logger="beitdomain"):
        ld = labeled_data(r, labels="15%", seed=0)
    assert ld.subset["per_class"] == {"horizontal": 5, "vertical": 5}
    said = " ".join(rec.getMessage() for rec in caplog.records)
    assert "asked 15%, got 50.0%" in said


def test_a_subset_only_all_groups_can_fill_is_refused_and_the_curve_names_what_works(tmp_path):
    from beitdomain.config import load_recipe
    from beitdomain.data.labeled import labeled_data
    from beitdomain.engine.curve.grid import parse_grid
    from beitdomain.engine.curve.run import check_cells
    from beitdomain.labels import LabelSubsetError
    from beitdomain.user import UserError

    r = _grouped(tmp_path, per_group=5, train_groups=2)  # one group per class in train
    with pytest.raises(LabelSubsetError, match=r"labels 30% .*class '\w+'.*100% of the\s+labels"):
        labeled_data(r, labels="30%", seed=0)
    assert labeled_data(r, labels="100%", seed=0).subset["n_labels"] == 10

    def check(fractions):
        c = load_recipe(None, {}, [f"curve.fractions={fractions}", "curve.seeds=[0]"]).curve
        return check_cells({"scratch": r}, parse_grid(c, {"scratch": None}))

    with pytest.raises(UserError, match=r"this data holds \['100%'\]: run with --fractions 100%"):
        check("[30%, 100%]")
    r = _grouped(tmp_path / "four", per_group=5, train_groups=4)
    subsets = check("[15%, 100%]")  # the curve's own check: every class in every subset
    assert all(min(s["per_class"].values()) > 0 for s in subsets.values())


# --------------------------------------------------------------------------------------------
# One rule for "the subset is not what was asked": a job's warning and the curve's agree
# --------------------------------------------------------------------------------------------


def test_a_job_and_the_curve_warn_about_the_same_label_amounts(tmp_path, caplog):
    import logging

    from helpers import FINETUNE_SETS, recipe, write_separable_set

    from beitdomain.data.labeled import labeled_data
    from beitdomain.engine.curve.report import subset_warnings

    data = write_separable_set(tmp_path / "d", per_class=12, size=16)  # 24 images, no groups
    r = recipe(
        [*FINETUNE_SETS, "data.val_fraction=0.0", "data.test_fraction=0.0"],
        **{"data.root": str(data)},
    )
    said = {}
    for amount, warned in (("15%", True), ("50%", False)):  # 4 of 24 is 16.7%; 12 is 50%
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="beitdomain"):
            ld = labeled_data(r, labels=amount, seed=0)
        job = [m for m in caplog.messages if m.startswith("labels: asked")]
        curve = [w for w in subset_warnings(amount, ld.subset) if w.startswith("labels: asked")]
        assert bool(job) == bool(curve) == warned, (amount, job, curve)
        said[amount] = " ".join(job)
    assert "asked 15%, got 16.7% (4 of 24 images" in said["15%"]
    assert "a subset is whole images, so the subset is larger than asked" in said["15%"]


# --------------------------------------------------------------------------------------------
# "--on-error skip" is advised where it applies: once when a scan stops, never in a skip report
# --------------------------------------------------------------------------------------------


def test_the_on_error_hint_appears_only_where_the_scan_stopped(tmp_path):
    import numpy as np
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file

    from beitdomain.data.index import ScanError, scan

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    del ds.PixelData  # a DICOM without an image (a report, a structure set)
    ds.save_as(tmp_path / "nopix.dcm")
    for i in range(2):
        Image.fromarray(np.full((16, 16), 50 * i, np.uint8)).save(tmp_path / f"ok{i}.png")
    ((name, reason),) = scan(tmp_path, on_error="skip").errors
    assert name == "nopix.dcm" and "no pixel data" in reason
    assert "on-error" not in reason  # the user passed --on-error skip already
    with pytest.raises(ScanError) as e:
        scan(tmp_path, on_error="fail")
    assert str(e.value).count("--on-error skip") == 1


# --------------------------------------------------------------------------------------------
# A label CSV whose paths repeat the data folder's name: one hint, not a line per file
# --------------------------------------------------------------------------------------------


def test_csv_paths_that_repeat_the_folder_name_get_one_hint(stripes, tmp_path):
    from helpers import cli, said

    files = sorted(p.relative_to(stripes.parent).as_posix() for p in stripes.rglob("*.png"))
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\n" + "".join(f"{f},{f.split('/')[1]}\n" for f in files))
    assert len(files) == 12 and files[0].startswith("stripes/")
    res = cli("data", "scan", str(stripes), "--labels-csv", str(csv_path),
              "--out", str(tmp_path / "m.jsonl"))  # fmt: skip
    assert res.exit_code != 0
    fixed = files[0].removeprefix("stripes/")
    assert said(res.output, f"'{files[0]}' should read '{fixed}'"), res.output
    assert "does not exist" not in res.output  # not one line per file
    assert not (tmp_path / "m.jsonl").exists()
