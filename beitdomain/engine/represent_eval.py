"""Scores of frozen features: k-NN / a linear probe on the labelled splits.

`evaluate_representation` scores a backbone's frozen features on the labelled splits with a
k-NN classifier or a linear probe (`beitdomain eval knn|probe`), beside a random backbone of
the same shape so the number has a reference. `KnnMonitor` does the k-NN check during
pre-training, once per epoch; with several processes each embeds its share of the images.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from beitdomain.config import Recipe
from beitdomain.data.labeled import labeled_data
from beitdomain.engine.represent import FrozenBackbone, random_like
from beitdomain.engine.train import distributed as D
from beitdomain.eval.representation import representation_scores
from beitdomain.io import IntensitySpec
from beitdomain.user import UserError

log = logging.getLogger(__name__)


def evaluate_representation(
    backbone: FrozenBackbone,
    recipe: Recipe,
    methods: tuple[str, ...] = ("knn",),
    *,
    baseline: bool = True,
    k: int = 20,
    c: float = 0.1,
    progress: bool = True,
) -> dict[str, Any]:
    """k-NN and/or linear-probe test scores of frozen features on the recipe's labelled data.

    The splits are fine-tuning's (`data.split_seed`, the CSV's split column), and the training
    side is `finetune.labels` of the train split, so `eval probe` at 1% reads against
    `finetune --labels 1%`. With `baseline`, the same is measured for a random backbone of the
    same shape.

    Returns:
        `{"methods": {name: {"backbone": metrics, "random": metrics}}, "classes", "n_train",
        "n_test", "labels", "source"}`; metrics as `classification_metrics`.

    Raises:
        UserError: unlabelled data, fewer than two classes, no test split.
    """

    data = labeled_data(recipe, progress=progress)
    test = data.test if data.test is not None else data.val
    if test is None:
        raise UserError(
            "k-NN / probe scores need held-out images: set data.test_fraction > 0 or give test "
            "rows in the labels CSV"
        )
    arms = {"backbone": backbone}
    if baseline:
        arms["random"] = random_like(backbone, recipe.seed)
    out: dict[str, Any] = {
        "source": backbone.source,
        "classes": data.classes,
        "labels": data.subset["spec"],
        "n_train": len(data.train),
        "n_test": len(test),
        "split_scored": "test" if data.test is not None else "val",
        "methods": {m: {} for m in methods},
    }
    for arm, bb in arms.items():
        train_xy = bb.embed_dataset(data.train)
        test_xy = bb.embed_dataset(test)
        for m in methods:
            out["methods"][m][arm] = representation_scores(
                m, train_xy, test_xy, data.classes, k=k, c=c
            )
    return out


@dataclass
class KnnMonitor:
    """Trainer hook: k-NN balanced accuracy of the backbone's frozen features once per epoch.

    Logged as `knn_balanced_accuracy` (and `knn_accuracy`) in metrics.jsonl, so a rising
    curve during pre-training shows the features getting better before any fine-tune.

    Args:
        backbone_of: the trained module -> the model that holds the timm `Beit` as `.backbone`
            and its `input_norm` (e.g. `lambda m: m.mim` for pre-training).
        train: labelled dataset whose features form the k-NN memory (evaluation view).
        test: labelled dataset scored against it.
        classes: class names.
        image_size: the evaluation view's side.
        every_epochs: epochs between checks.

    Under torchrun every rank takes part: each embeds every `world_size`-th image, the
    features are gathered, and each rank scores the same k-NN (rank 0 logs it). Were rank 0 to
    embed both sets alone, the others would wait for it in their next step's all-reduce, and a
    check longer than the process group's timeout would end the run.
    """

    backbone_of: Any
    train: Any
    test: Any
    classes: list[str]
    image_size: int
    every_epochs: int = 1
    k: int = 20
    last_step: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)

    def measure(self, model: nn.Module, device: torch.device) -> dict[str, Any]:

        owner = D.unwrap(self.backbone_of(D.unwrap(model)))
        bb = getattr(owner, "backbone", owner)
        was = bb.training
        fb = FrozenBackbone.of_model(
            owner, IntensitySpec(), self.image_size, "training", None, device
        )
        info = D.dist_info()
        try:
            train_xy = _embed_share(fb, self.train, info)
            test_xy = _embed_share(fb, self.test, info)
        finally:
            bb.train(was)
        return representation_scores("knn", train_xy, test_xy, self.classes, k=self.k)

    def on_step_end(self, trainer: Any) -> None:
        # An epoch has just ended when the sampler's batches are used up.
        state = trainer.state
        ended = state.batch_in_epoch >= len(trainer.loader.batch_sampler)
        last = state.step == trainer.total_steps
        if not (last or (ended and (state.epoch + 1) % self.every_epochs == 0)):
            return
        if state.step == self.last_step:
            return
        self.last_step = state.step
        m = self.measure(trainer.model, trainer.device)  # on every rank: each embeds a share
        self.history.append({"step": state.step, **m})
        if not trainer.dist.is_main:
            return
        trainer.log(knn_balanced_accuracy=m["balanced_accuracy"], knn_accuracy=m["accuracy"])
        log.info(
            "k-NN monitor after epoch %d (step %d): balanced accuracy %.3f (chance %.3f)",
            state.epoch + 1,
            state.step,
            m["balanced_accuracy"],
            m["chance_balanced_accuracy"],
        )


def _embed_share(
    fb: FrozenBackbone, dataset: Any, info: D.DistInfo
) -> tuple[np.ndarray, np.ndarray]:
    """`fb.embed_dataset(dataset)` on every rank, each rank embedding every `world_size`-th
    item (rank r: items r, r + w, ...); the shares are gathered back into the dataset's order.

    A dataset without `indices` (not an `ImageDataset`), or with fewer items than ranks, is
    embedded whole on every rank.
    """
    if not info.enabled or not hasattr(dataset, "indices") or len(dataset) < info.world_size:
        return fb.embed_dataset(dataset)
    share = copy.copy(dataset)
    share.indices = np.asarray(dataset.indices)[info.rank :: info.world_size]
    parts = D.all_gather_object(fb.embed_dataset(share))
    x0, y0 = parts[0]
    x = np.empty((len(dataset), *x0.shape[1:]), dtype=x0.dtype)
    y = np.empty((len(dataset), *y0.shape[1:]), dtype=y0.dtype)
    for r, (xr, yr) in enumerate(parts):
        x[r :: info.world_size], y[r :: info.world_size] = xr, yr
    return x, y
