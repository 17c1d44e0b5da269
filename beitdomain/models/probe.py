"""A classifier's head fitted as a linear probe on frozen features (LP-FT's first step).

LP-FT (Kumar et al., ICLR 2022): fine-tuning from a head fitted on the frozen backbone's
features, rather than from a random head, keeps the first gradients from distorting the
pre-trained features.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from beitdomain.models.classifier import BeitClassifier


@torch.no_grad()
def eval_outputs(
    forward: Callable[[torch.Tensor], torch.Tensor],
    model: nn.Module,
    dataset: Any,
    device: torch.device,
    batch_size: int,
    amp_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """`forward(images)` over a dataset in eval mode, in order: (outputs, labels, source index).

    Items are `{'image', 'label', 'index'}`; `amp_dtype` (e.g. bf16) autocasts the forward pass.
    """
    was = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=0
    )
    cast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    outs, labels, index = [], [], []
    for b in loader:
        with cast:
            outs.append(forward(b["image"].to(device, non_blocking=True)).float().cpu())
        labels.append(b["label"])
        index.append(b["index"])
    model.train(was)
    return torch.cat(outs), torch.cat(labels).numpy(), torch.cat(index).numpy()


def pooled_features(
    model: BeitClassifier,
    dataset: Any,
    device: torch.device,
    batch_size: int = 64,
    amp_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The head's inputs (pooled, normalized features) for a dataset in eval mode: (X [N, D], y)."""
    feats, labels, _ = eval_outputs(
        model.forward_features, model, dataset, device, batch_size, amp_dtype
    )
    return feats.numpy().astype(np.float64), labels


def fit_probe_head(
    model: BeitClassifier,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    c: float = 0.1,
    balanced: bool = False,
) -> dict[str, Any]:
    """Sets the head to an L2-regularized logistic regression fitted on frozen features.

    The features are standardized for the fit and the standardization is folded into the
    head's weights, so `head(x) = w . (x - mu) / sigma + b` exactly. With two classes, the
    binary model's logit `z` becomes the logits `(-z/2, z/2)`, the same softmax. Returns what
    was fitted (accuracy on the features it was fitted on); leaves the head untouched, with a
    reason, when the labels hold a single class.
    """
    from sklearn.linear_model import LogisticRegression

    classes = np.unique(labels)
    if len(classes) < 2:
        return {"fitted": False, "reason": f"one class only in {len(labels)} labels"}
    mu = features.mean(0)
    sigma = features.std(0) + 1e-6
    z = (features - mu) / sigma
    clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced" if balanced else None).fit(
        z, labels
    )
    k = model.num_classes
    coef = np.zeros((k, features.shape[1]))
    bias = np.full(k, -30.0)  # a class with no training label starts (almost) never predicted
    if clf.coef_.shape[0] == 1:  # binary: one logit for classes_[1] against classes_[0]
        coef[classes[1]], bias[classes[1]] = clf.coef_[0] / 2, clf.intercept_[0] / 2
        coef[classes[0]], bias[classes[0]] = -clf.coef_[0] / 2, -clf.intercept_[0] / 2
    else:
        coef[classes], bias[classes] = clf.coef_, clf.intercept_
    weight = coef / sigma
    bias = bias - weight @ mu
    head = model.head
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
    return {"fitted": True, "c": c, "n": len(labels), "train_accuracy": float(clf.score(z, labels))}
