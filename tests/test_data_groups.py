"""Splits by patient / wafer / slide: a group never spans two splits, label subsets take whole
groups and stay nested; groups from a CSV column and from DICOM PatientIDs (never written)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import write_dicom_with_phi
from hypothesis import given, settings
from hypothesis import strategies as st

from beitdomain.data.index import Manifest, scan
from beitdomain.data.splits import (
    LabelSubsetError,
    _group_labels,
    canonical_groups,
    group_label_subset,
    group_split,
    label_subset,
    split_summary,
    stratified_split,
)

# Data sets: per group a label and a size (labels may mix inside a group, as for a patient
# with one normal and one abnormal image).


@st.composite
def grouped(draw, min_groups: int = 12):
    n_classes = draw(st.integers(2, 3))
    n_groups = draw(st.integers(min_groups, 40))
    labels, groups = [], []
    for g in range(n_groups):
        y = g % n_classes  # every class has several groups
        for _ in range(draw(st.integers(1, 4))):
            mixed = draw(st.integers(0, 9)) == 0
            labels.append(f"c{(y + 1) % n_classes if mixed else y}")
            groups.append(f"patient-{g}")
    order = draw(st.permutations(range(len(labels))))  # files arrive in any order
    return [labels[i] for i in order], [groups[i] for i in order]


@settings(max_examples=60, deadline=None)
@given(data=grouped(), seed=st.integers(0, 2**16), test=st.sampled_from([0.2, 0.25, 0.34]))
def test_no_group_in_two_splits(data, seed, test):
    labels, groups = data
    try:
        split = group_split(labels, groups, 0.1, test, seed)
    except LabelSubsetError as e:
        # Allowed only when the groups truly cannot give the split; the message says why.
        assert "groups" in str(e)
        return
    seen: dict[str, str] = {}
    for name, idx in split.items():
        for i in idx:
            assert seen.setdefault(groups[i], name) == name, f"{groups[i]} in two splits"
    together = np.sort(np.concatenate(list(split.values())))
    np.testing.assert_array_equal(together, np.arange(len(labels)))
    classes = set(labels)
    assert {labels[i] for i in split["train"]} == classes
    assert {labels[i] for i in split["test"]} == classes
    # The same data and seed give the same split, whatever the groups are called.
    renamed = [f"other-{g[::-1]}" for g in groups]
    again = group_split(labels, renamed, 0.1, test, seed)
    for name in split:
        np.testing.assert_array_equal(split[name], again[name])


@settings(max_examples=60, deadline=None)
@given(data=grouped(min_groups=6), seed=st.integers(0, 2**16))
def test_group_subsets_are_nested_and_whole_groups(data, seed):
    labels, groups = data
    specs = ["1/class", "10%", "25%", "50%", "100%"]
    subsets = []
    for spec in specs:
        try:
            subsets.append(set(group_label_subset(labels, groups, spec, seed).tolist()))
        except LabelSubsetError:
            subsets.append(None)  # fewer images than classes at this fraction
    kept = [s for s in subsets[1:] if s is not None]
    for small, large in itertools.pairwise(kept):
        assert small <= large
    assert kept[-1] == set(range(len(labels)))
    for s in subsets:
        if s is None:
            continue
        chosen_groups = {groups[i] for i in s}
        assert s == {i for i, g in enumerate(groups) if g in chosen_groups}  # whole groups
    per_class = subsets[0]
    assert per_class is not None
    majority = set(_group_labels(labels, canonical_groups(groups)))
    assert {labels[i] for i in per_class} >= majority  # a group of every class


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(3, 15), min_size=2, max_size=4),
    seed=st.integers(0, 1000),
    spec=st.sampled_from(["10%", "3/class", "20", "100%"]),
)
def test_singleton_groups_are_the_image_level_split(sizes, seed, spec):
    labels = [f"c{k}" for k, n in enumerate(sizes) for _ in range(n)]
    none_groups = [None] * len(labels)
    own = [f"file-{i}" for i in range(len(labels))]
    for groups in (none_groups, own):
        split = group_split(labels, groups, 0.1, 0.2, seed)
        ref = stratified_split(labels, 0.1, 0.2, seed)
        for name in ref:
            np.testing.assert_array_equal(split[name], ref[name])
        try:
            ref_subset = label_subset(labels, spec, seed)
        except LabelSubsetError:
            with pytest.raises(LabelSubsetError):
                group_label_subset(labels, groups, spec, seed)
            continue
        np.testing.assert_array_equal(group_label_subset(labels, groups, spec, seed), ref_subset)


def test_split_column_that_splits_a_group_is_refused():
    labels = ["a", "b", "a", "b"]
    groups = ["p1", "p1", "p2", "p3"]
    with pytest.raises(LabelSubsetError, match="group 'p1' in test and train"):
        group_split(labels, groups, 0.1, 0.2, 0, split_column=["train", "test", "train", "train"])
    ok = group_split(labels, groups, 0.1, 0.2, 0, split_column=["train", "train", "test", "test"])
    assert ok["test"].tolist() == [2, 3]


def test_too_few_groups_is_a_clear_error():
    labels = ["a"] * 6 + ["b"] * 6
    groups = ["p1"] * 6 + ["p2"] * 6
    with pytest.raises(LabelSubsetError, match="2 groups cannot give a test split"):
        group_split(labels, groups, 0.0, 0.2, 0)
    groups = ["p1"] * 6 + [f"q{i}" for i in range(6)]  # class a: one patient only
    with pytest.raises(LabelSubsetError, match=r"a \(1 group\)"):
        group_split(labels, groups, 0.0, 0.2, 0)


def test_canonical_groups_and_summary():
    gid = canonical_groups(["x", None, "y", "x", None, ""])
    assert gid.tolist() == [0, 1, 2, 0, 3, 4]
    summary = split_summary(
        {"train": np.array([0, 2, 3]), "val": np.array([], int), "test": np.array([1])},
        ["x", None, "y", "x"],
        items_per_file=[1, 5, 1, 2],
    )
    assert summary["train"] == {"images": 3, "groups": 2, "items": 4}
    assert summary["test"] == {"images": 1, "groups": 1, "items": 5}
    assert summary["val"] == {"images": 0, "groups": 0, "items": 0}


# --------------------------------------------------------------------------------------------
# Where groups come from
# --------------------------------------------------------------------------------------------


def test_group_column_in_labels_csv(tmp_path: Path):
    from PIL import Image

    root = tmp_path / "data"
    root.mkdir()
    for k in range(4):
        Image.fromarray(np.full((16, 16), 40 * k, np.uint8)).save(root / f"{k}.png")
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "path,label,wafer\n0.png,ok,W1\n1.png,ok,W1\n2.png,bad,W2\n3.png,bad,\n", newline=""
    )
    manifest = scan(root, labels_csv=csv, group_column="wafer")
    assert [e.group for e in manifest.entries] == ["W1", "W1", "W2", None]
    positional = tmp_path / "positional.csv"
    positional.write_text("0.png,ok,,W1\n1.png,ok,train,W1\n2.png,bad\n")
    manifest = scan(root, labels_csv=positional)
    assert [(e.split, e.group) for e in manifest.entries] == [
        (None, "W1"),
        ("train", "W1"),
        (None, None),
    ]
    short_header = tmp_path / "short.csv"  # header names two columns; split keeps its place
    short_header.write_text("path,label\n0.png,ok,test\n2.png,bad,train,W9\n")
    manifest_short = scan(root, labels_csv=short_header)
    assert [(e.split, e.group) for e in manifest_short.entries] == [("test", None), ("train", "W9")]
    for suffix in (".jsonl", ".csv"):  # groups survive the manifest round trip
        out = tmp_path / f"m{suffix}"
        manifest.save(out)
        assert [e.group for e in Manifest.load(out).entries] == ["W1", "W1", None]


def test_dicom_patients_grouped_without_writing_the_id(tmp_path: Path):
    root = tmp_path / "ct"
    # Letters around the digits: a bare "0042" turned up by chance inside a file's mtime_ns.
    ids = ["MRN-QX0042", "MRN-QX0042", "MRN-7", "MRN-QX0042", ""]
    for k, pid in enumerate(ids):
        write_dicom_with_phi(root / f"img{k}.dcm", "Doe^Jane", pid, "19700101", seed=k)
    manifest = scan(root)
    groups = [e.group for e in manifest.entries]
    assert groups == ["patient-1", "patient-1", "patient-2", "patient-1", None]
    out = tmp_path / "m.jsonl"
    manifest.save(out)
    text = out.read_text()
    assert "MRN" not in text and "QX0042" not in text
    # Neither the ID nor any hash of it: the group values are patient-<n>.
    assert {json.loads(line).get("group") for line in text.splitlines()[1:]} == {
        "patient-1",
        "patient-2",
        None,
    }
    # Scanning again gives the same grouping (the salt changes, the numbering does not).
    assert [e.group for e in scan(root).entries] == groups
    assert all(e.group is None for e in scan(root, patient_groups=False).entries)


def test_finetune_data_keeps_patients_apart(tmp_path: Path):
    """labeled_data: no patient in two splits; labels.json-style summary counts groups."""
    from helpers import recipe

    from beitdomain.data.labeled import labeled_data

    root = tmp_path / "ct"
    for p in range(10):
        for k in range(3):
            label = "a" if p % 2 else "b"
            write_dicom_with_phi(
                root / label / f"p{p}-{k}.dcm", "X^Y", f"ID{p}", "19700101", seed=k
            )
    r = recipe(
        ["data.val_fraction=0.2", "data.test_fraction=0.2", "data.image_size=32"],
        **{"data.root": str(root)},
    )
    data = labeled_data(r, labels="100%", progress=False)
    patient_of = {e: e.split("/")[1].split("-")[0] for s in data.files.values() for e in s}
    sides = {}
    for name, files in data.files.items():
        for f in files:
            assert sides.setdefault(patient_of[f], name) == name
    splits = data.subset["splits"]
    assert sum(splits[s]["images"] for s in ("train", "val", "test")) == 30
    assert sum(splits[s]["groups"] for s in ("train", "val", "test")) == 10
    assert all(splits[s]["images"] == 3 * splits[s]["groups"] for s in ("train", "val", "test"))


def test_one_patient_id_for_every_file_is_no_grouping(tmp_path: Path):
    """An anonymizer's constant PatientID (or a phantom) says nothing about patients."""
    root = tmp_path / "ct"
    for k in range(4):
        write_dicom_with_phi(root / f"img{k}.dcm", "ANON", "ANONYMOUS", "19000101", seed=k)
    assert all(e.group is None for e in scan(root).entries)


def test_too_few_patients_fall_back_to_files_with_a_warning(tmp_path: Path, caplog):
    """Patients found by the scan (not a user's column) that cannot give the split: a warning
    and a split by file, as before patient grouping."""
    from helpers import recipe

    from beitdomain.data.labeled import labeled_data

    root = tmp_path / "ct"
    for k in range(8):
        label = "a" if k % 2 else "b"
        pid = "P1" if k < 4 else "P2"  # two patients, each with both classes
        write_dicom_with_phi(root / label / f"img{k}.dcm", "X^Y", pid, "19700101", seed=k)
    r = recipe(
        ["data.val_fraction=0.0", "data.test_fraction=0.25", "data.image_size=32"],
        **{"data.root": str(root)},
    )
    with caplog.at_level("WARNING"):
        data = labeled_data(r, labels="100%", progress=False)
    assert "splitting by file, not by patient" in caplog.text
    assert len(data.files["test"]) == 2


def test_a_label_budget_that_whole_groups_overshoot_is_said_not_hidden(tmp_path: Path, caplog):
    # '--labels 10%' on 28 images in a few patients silently trained on 28.6% of them.
    import logging

    from helpers import FINETUNE_SETS, recipe
    from PIL import Image

    from beitdomain.data.labeled import labeled_data

    root = tmp_path / "data"
    root.mkdir()
    rows = ["path,label,group"]
    for g in range(8):  # 8 patients of 5 images, 4 per class
        for k in range(5):
            name = f"p{g}-{k}.png"
            Image.fromarray(np.full((16, 16), 10 * g + k, np.uint8)).save(root / name)
            rows.append(f"{name},{'a' if g % 2 else 'b'},P{g}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    r = recipe(
        [*FINETUNE_SETS, "data.val_fraction=0.0", "data.test_fraction=0.25"],
        **{"data.root": str(root), "data.labels": str(tmp_path / "labels.csv")},
    )
    with caplog.at_level(logging.WARNING, logger="beitdomain"):
        ld = labeled_data(r, labels="10%", seed=0)
    said = " ".join(rec.getMessage() for rec in caplog.records)
    got = ld.subset["fraction"]
    assert got > 0.15  # a whole patient is 5 of the 30 train images
    assert f"asked 10%, got {100 * got:.1f}%" in said and "whole groups" in said
    assert "the test split holds 10 images from only 2 groups" in said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="beitdomain"):
        labeled_data(r, labels="10%", seed=0, progress=False)  # the curve's quiet calls
    assert not caplog.records
