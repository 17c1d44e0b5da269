"""The test split's images, as pre-training must leave them out: the same images fine-tuning
scores on, whether the split comes from a split column or from the recipe."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import FINETUNE_SETS, recipe, write_separable_set

from beitdomain.data.heldout import pretraining_items
from beitdomain.data.labeled import items_in_test_split, labeled_data
from beitdomain.data.source import image_source


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_separable_set(tmp_path_factory.mktemp("heldout") / "data", per_class=10)


def _split_csv(root, path):
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    lines = ["path,label,split"]
    for k, f in enumerate(files):
        lines.append(f"{f},{f.split('/')[0]},{('test', 'val', 'train', 'train')[k % 4]}")
    path.write_text("\n".join(lines) + "\n")
    return path, [f for k, f in enumerate(files) if k % 4 == 0]


def test_recipe_split_test_items_are_the_ones_finetuning_scores_on(data):
    r = recipe(FINETUNE_SETS, **{"data.root": str(data)})
    source, _ = image_source(r, progress=False)
    test = items_in_test_split(source, r)
    assert len(test) == 6  # 30% of 20
    assert test.tolist() == sorted(labeled_data(r, progress=False).test.indices.tolist())
    keep, info = pretraining_items(len(source), test)
    assert set(keep.tolist()).isdisjoint(test.tolist()) and len(keep) == 14
    assert info == {"transductive": False, "n_images": 14, "n_test_excluded": 6}
    every, info = pretraining_items(len(source), test, transductive=True)
    assert len(every) == 20 and info["transductive"] and info["n_test_excluded"] == 0


def test_split_column_test_rows_are_left_out(data, tmp_path):
    labels, want = _split_csv(data, tmp_path / "labels.csv")
    r = recipe(FINETUNE_SETS, **{"data.root": str(data), "data.labels": str(labels)})
    source, _ = image_source(r, progress=False)
    test = items_in_test_split(source, r)
    assert sorted(source.source(int(i))[0] for i in test) == want
    assert test.tolist() == sorted(labeled_data(r, progress=False).test.indices.tolist())


def test_unlabelled_images_are_never_test_images(tmp_path):
    from PIL import Image

    for k in range(5):
        Image.fromarray(np.full((16, 16), 40 * k, np.uint8)).save(tmp_path / f"{k}.png")
    r = recipe(FINETUNE_SETS, **{"data.root": str(tmp_path)})
    source, _ = image_source(r, progress=False)
    assert items_in_test_split(source, r).tolist() == []
    assert np.array_equal(pretraining_items(5, items_in_test_split(source, r))[0], np.arange(5))
