"""`data.augment` for masks (issue 38): the user's albumentations pipeline moves image and mask
together (the mask target), reseeded per (seed, epoch, item) as for classification, so a
resumed segmentation fine-tune ends bitwise equal."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_same_tensors, load_tensors, lose_newest_checkpoint
from test_segment_job import _recipe, write_discs

A = pytest.importorskip("albumentations")

from beitdomain.data.masks import MaskClasses, MaskDataset  # noqa: E402
from beitdomain.data.transforms import (  # noqa: E402
    AugmentError,
    SegmentTransform,
    UserAugment,
    UserSegmentAugment,
    segment_training_transform,
)
from beitdomain.engine.run.checkpoint import CheckpointManager  # noqa: E402
from beitdomain.engine.run.metrics_log import read_metrics  # noqa: E402
from beitdomain.engine.segment import finetune_segment  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TWO = MaskClasses(("background", "disc"))
THREE = MaskClasses(("background", "a", "b"))


def _save(tmp_path, *transforms, name="pipeline.json"):
    path = tmp_path / name
    A.save(A.Compose(list(transforms)), str(path), data_format="json")
    return str(path)


def _coded_pair(size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A mask of 3 classes in random blocks and an image that is the mask's code (class k ->
    intensity k / 4) plus a unique offset per pixel row and column: every image pixel says
    which mask value lay under it, and where it came from."""
    rng = np.random.default_rng(seed)
    mask = np.kron(rng.integers(0, 3, (size // 4, size // 4)), np.ones((4, 4), np.int64))
    yy, xx = np.mgrid[:size, :size]
    image = (mask / 4 + (yy * size + xx) / (8 * size * size)).astype(np.float32)[None]
    return image, mask


def _decode(view: np.ndarray) -> np.ndarray:
    """The mask value an image pixel of `_coded_pair` carries (its code, offset dropped)."""
    return np.floor(view[0] * 4 + 1e-4).astype(np.int64)


@pytest.mark.parametrize(
    "transforms",
    [
        [A.HorizontalFlip(p=1.0)],
        [A.VerticalFlip(p=1.0), A.RandomRotate90(p=1.0)],
        [A.Transpose(p=1.0), A.HorizontalFlip(p=0.5)],
    ],
    ids=["hflip", "vflip+rot90", "transpose+flip"],
)
def test_flips_and_rotations_move_image_and_mask_identically(tmp_path, transforms):
    aug = UserSegmentAugment(_save(tmp_path, *transforms), image_size=32, classes=THREE)
    image, mask = _coded_pair()
    moved = 0
    for item in range(6):
        view, mview = aug(image, mask, np.random.default_rng([0, 0, item]))
        assert view.shape == (1, 32, 32) and mview.shape == (32, 32) and mview.dtype == np.int64
        # every pixel: the mask value under it is the one its image pixel was coded with
        np.testing.assert_array_equal(_decode(view), mview)
        moved += not np.array_equal(mview, mask)
    assert moved == 6  # each of these pipelines changes the layout (not an identity)


def test_a_rotation_keeps_mask_values_within_the_classes(tmp_path):
    spec = _save(tmp_path, A.Rotate(limit=40, p=1.0), A.RandomResizedCrop(size=(40, 40)))
    aug = UserSegmentAugment(spec, image_size=32, classes=THREE)
    image, mask = _coded_pair()
    for item in range(8):
        view, mview = aug(image, mask, np.random.default_rng([0, 0, item]))
        assert set(np.unique(mview).tolist()) <= {0, 1, 2}  # nearest neighbour: no blends
        assert view.shape == (1, 32, 32) and view.min() >= 0 and view.max() <= 1


def test_pixel_level_transforms_touch_the_image_only(tmp_path):
    spec = _save(tmp_path, A.RandomBrightnessContrast(p=1.0), A.GaussNoise(p=1.0))
    aug = UserSegmentAugment(spec, image_size=32, classes=THREE)
    image, mask = _coded_pair()
    view, mview = aug(image, mask, np.random.default_rng([0, 0, 1]))
    np.testing.assert_array_equal(mview, mask)
    assert not np.allclose(view, image, atol=1e-3)


def test_an_item_is_a_pure_function_of_seed_epoch_and_index(tmp_path):
    spec = _save(tmp_path, A.Rotate(limit=30, p=1.0), A.RandomBrightnessContrast(p=1.0))
    aug = UserSegmentAugment(spec, image_size=24, classes=THREE)
    image, mask = _coded_pair()
    items = [_coded_pair(seed=k) for k in range(4)]
    ds = MaskDataset(items, aug, seed=5)
    first = [ds[i] for i in range(4)]
    again = MaskDataset(items, UserSegmentAugment(spec, 24, THREE), seed=5)
    for i in reversed(range(4)):  # another pipeline object, another order: the same items
        item = again[i]
        assert np.array_equal(item["image"].numpy(), first[i]["image"].numpy())
        assert np.array_equal(item["mask"].numpy(), first[i]["mask"].numpy())
    ds.set_epoch(1)
    assert not np.array_equal(ds[0]["image"].numpy(), first[0]["image"].numpy())
    # the classification path's seeding: the image view is UserAugment's for the same rng
    solo = UserAugment(spec, image_size=24)
    view, _ = aug(image, mask, np.random.default_rng([5, 0, 2]))
    np.testing.assert_array_equal(view, solo(image, np.random.default_rng([5, 0, 2])))


def test_a_blending_pipeline_and_an_image_only_transform_are_refused(tmp_path):
    blend = _save(tmp_path, A.Rotate(limit=45, p=1.0, mask_interpolation=1), name="b.json")
    aug = UserSegmentAugment(blend, image_size=32, classes=TWO)
    mask = np.zeros((32, 32), np.int64)
    mask[8:24, 8:24] = 1
    with pytest.raises(AugmentError, match=r"b.json\) made mask values .* outside the classes"):
        # values 0..1 blended to ints stay 0/1; with 255 (ignore) next to 1 blends appear
        UserSegmentAugment(blend, 32, MaskClasses(TWO.names, 255))(
            np.zeros((1, 32, 32), np.float32),
            np.where(mask == 1, 255, 1),
            np.random.default_rng(0),
        )
    aug(np.zeros((1, 32, 32), np.float32), mask, np.random.default_rng(0))  # 0/1: passes
    with pytest.raises(AugmentError, match="transform of images only"):
        UserSegmentAugment("augment_chain:build", 32, TWO)


def test_the_recipe_picks_the_users_pipeline_or_the_built_in_one(tmp_path):
    spec = _save(tmp_path, A.HorizontalFlip(p=1.0))
    data = write_discs(tmp_path / "discs", n=4)
    r = _recipe(data, f"data.augment={spec}")
    assert isinstance(segment_training_transform(r.data, 32, TWO), UserSegmentAugment)
    plain = segment_training_transform(_recipe(data).data, 32, TWO)
    assert isinstance(plain, SegmentTransform) and plain.train


def test_a_resumed_fine_tune_with_data_augment_ends_equal(tmp_path):
    spec = _save(
        tmp_path,
        A.RandomResizedCrop(size=(32, 32), scale=(0.5, 1.0)),
        A.Rotate(limit=20, p=0.7),
        A.HorizontalFlip(p=0.5),
        A.RandomBrightnessContrast(p=0.8),
    )
    data = write_discs(tmp_path / "discs", n=12)
    r = _recipe(
        data,
        f"data.augment={spec}",
        "finetune.train.steps=6",
        "finetune.train.deterministic=true",
        "finetune.selection=outside",
        "finetune.train.eval_every=2",
    )
    run = tmp_path / "run"
    first_res = finetune_segment(r, run, device="cpu", quiet=True)
    first = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    mgr = CheckpointManager(run / "checkpoints")
    final = mgr.load_latest()[1]["model"]
    best = load_tensors(run / "best.safetensors")
    lose_newest_checkpoint(run, "results.json")  # steps 4-6 run again, from step 3's state
    again_res = finetune_segment(r, run, device="cpu", quiet=True, resume=True)
    again = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert [(m["step"], m["loss"]) for m in again] == [(m["step"], m["loss"]) for m in first]
    assert_same_tensors(mgr.load_latest()[1]["model"], final, "final weights")
    assert_same_tensors(load_tensors(run / "best.safetensors"), best, "best weights")
    assert again_res["test"] == first_res["test"]
    # and the pipeline is what trained: without it the losses differ
    plain = finetune_segment(
        _recipe(
            data,
            "finetune.train.steps=6",
            "finetune.train.deterministic=true",
            "finetune.selection=outside",
            "finetune.train.eval_every=2",
        ),
        tmp_path / "plain",
        device="cpu",
        quiet=True,
    )
    losses = [m["loss"] for m in read_metrics(tmp_path / "plain" / "metrics.jsonl") if "loss" in m]
    assert losses != [m["loss"] for m in first] and plain["test"] != first_res["test"]


def test_a_cached_uint8_image_is_augmented_as_its_values_in_0_1(tmp_path):
    """A cache holds uint8: the pipeline saw 0..255 as floats before, clipped to a white view
    (classification's UserAugment too: the same call serves both)."""
    spec = _save(tmp_path, A.HorizontalFlip(p=1.0))
    image, mask = _coded_pair()
    as_uint8 = np.round(image * 255).astype(np.uint8)
    view, _ = UserSegmentAugment(spec, 32, THREE)(as_uint8, mask, np.random.default_rng(0))
    np.testing.assert_allclose(view[0], as_uint8[0, :, ::-1] / 255.0, atol=1e-6)
    solo = UserAugment(spec, image_size=32)(as_uint8, np.random.default_rng(0))
    np.testing.assert_array_equal(solo, view)
