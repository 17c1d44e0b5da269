"""Segmentation metrics (issue 38 item d): Dice and IoU against hand-computed counts and MONAI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from beitdomain.eval.segment_metrics import (
    SegmentationMeter,
    confusion_matrix,
    segmentation_metrics,
)

TARGET = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 2, 2], [255, 0, 2, 2]])
PRED = np.array([[0, 1, 1, 1], [0, 0, 1, 0], [0, 0, 2, 0], [2, 0, 0, 2]])
NAMES = ["background", "cell", "nucleus", "never"]


def test_hand_computed_dice_and_iou_with_an_ignored_pixel_and_an_absent_class():
    m = segmentation_metrics(confusion_matrix(PRED, TARGET, 4, ignore_index=255), NAMES)
    # cell: TP 3, FP 1, FN 1; nucleus: TP 2, FP 0, FN 2 (the ignored pixel's 2 counts nowhere);
    # background: TP 6, FP 3, FN 1
    assert m["dice"]["cell"] == pytest.approx(6 / 8)
    assert m["iou"]["cell"] == pytest.approx(3 / 5)
    assert m["dice"]["nucleus"] == pytest.approx(4 / 6)
    assert m["iou"]["nucleus"] == pytest.approx(2 / 4)
    assert m["dice"]["background"] == pytest.approx(12 / 16)
    assert math.isnan(m["dice"]["never"]) and math.isnan(m["iou"]["never"])
    assert m["mean_dice"] == pytest.approx((6 / 8 + 4 / 6) / 2)  # foreground, 'never' skipped
    assert m["mean_iou"] == pytest.approx((3 / 5 + 2 / 4) / 2)
    assert m["pixel_accuracy"] == pytest.approx(11 / 15)


def test_the_meter_pools_batches_and_takes_logits():
    meter = SegmentationMeter(NAMES, ignore_index=255)
    logits = torch.nn.functional.one_hot(torch.as_tensor(PRED), 4).permute(2, 0, 1).float()
    meter.update(logits[None, :, :2], torch.as_tensor(TARGET)[None, :2])
    meter.update(torch.as_tensor(PRED)[None, 2:], torch.as_tensor(TARGET)[None, 2:])
    want = confusion_matrix(PRED, TARGET, 4, ignore_index=255)
    assert np.array_equal(meter.confusion, want)
    assert meter.compute()["mean_dice"] == pytest.approx((6 / 8 + 4 / 6) / 2)


def test_values_outside_the_classes_are_refused():
    with pytest.raises(ValueError, match="target holds values outside 0..3"):
        confusion_matrix(PRED, TARGET, 4)


def test_one_image_agrees_with_monai():
    metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, (16, 16))
    pred = np.where(rng.random((16, 16)) < 0.7, target, rng.integers(0, 3, (16, 16)))
    ours = segmentation_metrics(confusion_matrix(pred, target, 3), ["bg", "a", "b"])

    def onehot(x):
        return torch.nn.functional.one_hot(torch.as_tensor(x), 3).permute(2, 0, 1)[None].float()

    dice = metrics.compute_dice(onehot(pred), onehot(target), include_background=True)[0]
    iou = metrics.compute_iou(onehot(pred), onehot(target), include_background=True)[0]
    assert list(ours["dice"].values()) == pytest.approx(dice.tolist())
    assert list(ours["iou"].values()) == pytest.approx(iou.tolist())
