"""A fine-tune at a small label budget looks at no label outside its subset: not to train, not to
pick a checkpoint or a learning rate, not to fit its probe head. Only the test split is scored."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import FINETUNE_SETS, recipe, write_separable_set

from beitdomain.data.dataset import ImageDataset
from beitdomain.data.labeled import labeled_data
from beitdomain.data.source import image_source
from beitdomain.engine.finetune import finetune
from beitdomain.user import UserError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_separable_set(tmp_path_factory.mktemp("budget") / "data", per_class=20)


def _seen(monkeypatch) -> list[int]:
    """Every labelled item any dataset hands out, in order (source indices)."""
    seen: list[int] = []
    real = ImageDataset.__getitem__

    def spy(self, i):
        item = real(self, i)
        if "label" in item and int(item["label"]) >= 0:
            seen.append(int(item["index"]))
        return item

    monkeypatch.setattr(ImageDataset, "__getitem__", spy)
    return seen


@pytest.mark.parametrize(
    ("selection", "extra"),
    [
        ("none", ["finetune.head_init=probe"]),
        ("carve", ["finetune.lr_grid=[1.0e-3, 3.0e-3]"]),
    ],
)
def test_a_small_budget_cell_touches_no_label_outside_its_subset(
    data, tmp_path, monkeypatch, selection, extra
):
    sets = [*FINETUNE_SETS, "finetune.train.steps=4", "finetune.train.eval_every=2", *extra]
    r = recipe(
        [*sets, f"finetune.selection={selection}", "finetune.labels=10"],
        **{"data.root": str(data)},
    )
    subset = set(labeled_data(r, selection="none", progress=False).train_items.tolist())
    test = set(labeled_data(r, progress=False).test.indices.tolist())
    assert len(subset) == 10
    seen = _seen(monkeypatch)
    res = finetune(r, tmp_path / "run", device="cpu", quiet=True)
    outside = sorted(set(seen) - subset - test)
    assert outside == [], f"labels outside the 10-label subset were read: {outside}"
    assert subset & set(seen)  # training read the subset
    assert res["n_labels"] == 10  # the budget
    used = json.loads((tmp_path / "run" / "labels.json").read_text())
    assert used["selection"] == selection
    assert (used["n_fit"], used["n_selection"]) == ((10, 0) if selection == "none" else (8, 2))


def test_outside_selection_is_the_split_validation_and_says_so(data):
    r = recipe([*FINETUNE_SETS, "finetune.labels=10"], **{"data.root": str(data)})
    inside = labeled_data(r, selection="carve", progress=False)
    outside = labeled_data(r, selection="outside", progress=False)
    none = labeled_data(r, progress=False)
    assert none.val is None and none.subset["selection"] == "none"  # the default
    assert set(inside.val.indices) <= set(none.train_items)
    assert set(inside.train_items) | set(inside.val.indices) == set(none.train_items)
    assert set(outside.val.indices).isdisjoint(none.train_items)
    assert len(outside.val.indices) == 6  # 15% of 40
    with pytest.raises(UserError, match="finetune.selection 'kfold'"):
        labeled_data(r, selection="kfold", progress=False)


def test_no_test_image_reaches_pretraining_by_default(data):
    from beitdomain.data.unlabeled import unlabeled_dataset

    r = recipe(FINETUNE_SETS, **{"data.root": str(data)})
    test = set(labeled_data(r, progress=False).test.indices.tolist())
    assert len(test) == 12  # 30% of 40
    for kind, holdout in (("pretrain", False), ("tokenizer", True)):
        train, held, _ = unlabeled_dataset(r, kind, holdout=holdout, progress=False)
        used = set(train.indices.tolist()) | (set(held.indices.tolist()) if held else set())
        assert used.isdisjoint(test) and len(used) == 28
        assert train.pretraining_data == {
            "transductive": False,
            "n_images": 28,
            "n_test_excluded": 12,
        }
    r = recipe([*FINETUNE_SETS, "data.transductive=true"], **{"data.root": str(data)})
    train, _, _ = unlabeled_dataset(r, "pretrain", progress=False)
    assert len(train) == 40 and train.pretraining_data["transductive"]
    source, _ = image_source(r, progress=False)
    assert np.array_equal(np.sort(train.indices), np.arange(len(source)))
