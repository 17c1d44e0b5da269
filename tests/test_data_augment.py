"""The user's own augmentations (`data.augment`): an albumentations pipeline file and a MONAI
transform chain, reseeded per item from (seed, epoch, index); pre-training resumes exactly."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from helpers import (
    PRETRAIN_SETS,
    assert_same_tensors,
    checkpointed_sets,
    load_tensors,
    lose_newest_checkpoint,
    recipe,
    write_elpv_subset,
    write_tiny_tokenizer,
)

A = pytest.importorskip("albumentations")
pytest.importorskip("monai")

from beitdomain.data.dataset import ImageDataset  # noqa: E402
from beitdomain.data.transforms import AugmentError, UserAugment  # noqa: E402
from beitdomain.engine.pretrain import pretrain  # noqa: E402
from beitdomain.engine.run.checkpoint import CheckpointManager  # noqa: E402
from beitdomain.engine.run.metrics_log import read_metrics  # noqa: E402

MONAI_CHAIN = "augment_chain:build"


@pytest.fixture(scope="module")
def albu_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("albu") / "pipeline.json"
    pipeline = A.Compose(
        [
            A.RandomResizedCrop(size=(48, 48), scale=(0.3, 1.0)),
            A.HorizontalFlip(p=0.5),
            A.RandomBrightnessContrast(p=0.8),
        ]
    )
    A.save(pipeline, str(path), data_format="json")
    return path


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 60, 70), dtype=np.float32)


@pytest.mark.parametrize("which", ["albumentations", "monai"])
def test_views_are_a_pure_function_of_the_rng_and_share_one_crop(which, albu_file):
    spec = str(albu_file) if which == "albumentations" else MONAI_CHAIN
    aug = UserAugment(spec, image_size=32, tokenizer_size=16)
    image = _image()
    view, tok = aug(image, np.random.default_rng([0, 1, 5]))
    assert view.shape == (1, 32, 32) and tok.shape == (1, 16, 16)
    assert view.dtype == np.float32 and view.min() >= 0 and view.max() <= 1
    # The tokenizer view is the backbone view area-averaged: both from one crop.
    np.testing.assert_allclose(
        tok[0], cv2.resize(view[0], (16, 16), interpolation=cv2.INTER_AREA), atol=1e-6
    )
    again = aug(image, np.random.default_rng([0, 1, 5]))
    np.testing.assert_array_equal(again[0], view)
    other = aug(image, np.random.default_rng([0, 2, 5]))  # next epoch: another augmentation
    assert not np.array_equal(other[0], view)
    assert np.array_equal(image, _image())  # the input is untouched


def test_dataset_items_do_not_depend_on_order(albu_file):
    images = [_image(k) for k in range(6)]

    class Source:
        classes = ()

        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i]

        def label(self, i):
            return None

    ds = ImageDataset(Source(), UserAugment(str(albu_file), 32, 16), seed=3)
    forward = [ds[i]["image"] for i in range(6)]
    backward = [ds[i]["image"] for i in reversed(range(6))][::-1]
    for a, b in zip(forward, backward):
        assert torch.equal(a, b)


def test_bad_augment_values_are_user_errors(tmp_path):
    with pytest.raises(AugmentError, match="file not found"):
        UserAugment(str(tmp_path / "missing.json"), 32)
    (tmp_path / "bad.yaml").write_text("just: text\n")
    with pytest.raises(AugmentError, match="not an albumentations pipeline"):
        UserAugment(str(tmp_path / "bad.yaml"), 32)
    with pytest.raises(AugmentError, match="import path 'package.module:name'"):
        UserAugment("no_colon_here", 32)
    with pytest.raises(AugmentError, match="cannot import"):
        UserAugment("surely_not_a_module_xyz:build", 32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aug")
    return write_elpv_subset(tmp / "data", per_class=8), write_tiny_tokenizer(tmp / "tok")


@pytest.mark.parametrize("which", ["albumentations", "monai"])
def test_pretrain_with_user_augment_resumes_to_the_same_batches(which, data, albu_file, tmp_path):
    """Lose the newest checkpoint and resume: the re-run steps see the same batches (same
    losses) and the final weights equal the uninterrupted run's."""
    root, tok = data
    spec = str(albu_file) if which == "albumentations" else MONAI_CHAIN
    r = recipe(
        [*PRETRAIN_SETS, *checkpointed_sets("pretrain", 6, 3)],
        **{"data.root": str(root), "tokenizer.path": str(tok), "data.augment": spec},
    )
    run = tmp_path / "run"
    pretrain(r, run, device="cpu", quiet=True)
    first = read_metrics(run / "metrics.jsonl")
    final = load_tensors(run / "mim.safetensors")
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"
    mgr = CheckpointManager(run / "checkpoints")
    assert mgr.steps() == [3, 6]
    lose_newest_checkpoint(run, "mim.safetensors", "backbone.safetensors")
    pretrain(r, run, device="cpu", quiet=True, resume=True)
    again = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in again] == list(range(1, 7))
    for a, b in zip(first, again):
        assert a["loss"] == b["loss"], (a, b)
    assert_same_tensors(load_tensors(run / "mim.safetensors"), final, "resumed run")
