"""A minimal segmentation fine-tune: (image, mask) pairs, N steps, per-class Dice and IoU.

The first slice of issue 38, short of a job: no run folder, checkpoints, resume or CLI yet (those
come from `engine.job` when `finetune --task segment` is wired). What it fixes already is the
protocol the job will keep: every item's crop and flips come from a generator of
``(seed, step, index)`` through `SegmentTransform`, so a run is a pure function of its inputs;
the BEiT arm gets layer-wise lr decay and AdamW on the classifier's param groups, the U-Net
arm plain AdamW; the loss is cross-entropy (ignored pixels left out) plus a soft Dice over the
foreground classes, as MONAI's DiceCELoss, so a small lesion is not drowned by the background.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from beitdomain.data.masks import MaskClasses
from beitdomain.data.transforms import SegmentTransform
from beitdomain.engine.train.schedule import cosine_lr
from beitdomain.eval.segment_metrics import SegmentationMeter
from beitdomain.models.backbone import BackboneConfig
from beitdomain.models.classifier import layer_decay_param_groups, param_groups_weight_decay
from beitdomain.models.convert import load_backbone_weights
from beitdomain.models.segment import BeitSegmenter, monai_unet
from beitdomain.user import UserError

__all__ = ["build_segmenter", "segment_finetune", "segment_loss"]

Pair = tuple[np.ndarray, np.ndarray]  # image [C, H, W] float32 in [0, 1], mask [H, W] int64


def build_segmenter(
    arch: Literal["beit", "unet"],
    backbone: BackboneConfig,
    classes: MaskClasses,
    *,
    init: str | Path | None = None,
    decoder: Literal["progressive", "linear"] = "progressive",
    channels: int = 64,
    blocks: Sequence[int] | None = None,
    trust_pickle: bool = False,
) -> nn.Module:
    """The BEiT segmenter (random, or `init` loaded by the classifier's weight loader) or the
    from-scratch MONAI U-Net (which takes only `backbone.in_chans`).

    Raises:
        UserError: an init for the U-Net, or weights that do not fit the backbone.
    """
    if arch == "unet":
        if init is not None:
            raise UserError(f"the U-Net baseline trains from scratch; it takes no init ({init})")
        return monai_unet(backbone.in_chans, classes.num_classes)
    # Fine-tuning gives every block its own relative position table (BEiT's recipe).
    cfg = backbone.replace(use_shared_rel_pos_bias=False)
    model = BeitSegmenter.from_config(
        cfg, classes.num_classes, blocks=blocks, decoder=decoder, channels=channels
    )
    if init is not None:
        load_backbone_weights(model, init, in_chans=cfg.in_chans, trust_pickle=trust_pickle)
    return model


def segment_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None
) -> torch.Tensor:
    """Cross-entropy plus soft Dice over the foreground classes (1 - mean Dice of the batch).

    Args:
        logits: ``[B, K, H, W]``.
        target: ``[B, H, W]`` class indices; pixels at `ignore_index` count in neither term.
    """
    ignore = -100 if ignore_index is None else ignore_index
    ce = F.cross_entropy(logits, target, ignore_index=ignore)
    keep = (target != ignore).unsqueeze(1).to(logits.dtype)  # [B, 1, H, W]
    probs = logits.softmax(1) * keep
    onehot = F.one_hot(target.where(target != ignore, 0), logits.shape[1]).permute(0, 3, 1, 2)
    onehot = onehot.to(logits.dtype) * keep
    inter = (probs * onehot).sum((0, 2, 3))[1:]
    total = (probs + onehot).sum((0, 2, 3))[1:]
    dice = (2 * inter + 1.0) / (total + 1.0)
    return ce + (1.0 - dice.mean())


def _batch(
    pairs: Sequence[Pair], indices: Sequence[int], transform: SegmentTransform, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    views = [
        transform(*pairs[i], np.random.default_rng([seed, step, int(i)]))
        if transform.train
        else transform(*pairs[i])
        for i in indices
    ]
    images = torch.from_numpy(np.stack([v for v, _ in views]))
    masks = torch.from_numpy(np.stack([m for _, m in views]))
    return images, masks


@torch.no_grad()
def evaluate_segmenter(
    model: nn.Module,
    pairs: Sequence[Pair],
    classes: MaskClasses,
    image_size: int,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Per-class Dice and IoU (pooled over `pairs`) of `model`'s predictions at `image_size`."""
    transform = SegmentTransform(train=False, image_size=image_size)
    meter = SegmentationMeter(classes.names, classes.ignore_index)
    was_training = model.training
    model.eval()
    for start in range(0, len(pairs), batch_size):
        images, masks = _batch(
            pairs, range(start, min(start + batch_size, len(pairs))), transform, 0, 0
        )
        meter.update(model(images), masks)
    model.train(was_training)
    return meter.compute()


def segment_finetune(
    model: nn.Module,
    train: Sequence[Pair],
    classes: MaskClasses,
    *,
    steps: int,
    image_size: int,
    val: Sequence[Pair] | None = None,
    batch_size: int = 8,
    lr: float = 1e-3,
    min_lr: float = 1e-5,
    warmup_steps: int = 0,
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
    seed: int = 0,
    augment: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Trains `model` on `train` for `steps` optimizer steps on the CPU and evaluates it.

    Args:
        model: `build_segmenter`'s BEiT segmenter or U-Net (trained in place).
        train: ``(image [C, H, W], mask [H, W])`` pairs, e.g. `data.masks.load_pairs`.
        classes: what the mask values mean.
        steps: optimizer steps; each draws `batch_size` pairs (seeded).
        image_size: side of the square views the model trains and is evaluated on.
        val: pairs the returned metrics are computed on; None: `train` itself.
        layer_decay: BEiT's layer-wise lr decay (0.65 when fine-tuning pre-trained weights);
            None: one lr for every parameter.
        augment: `SegmentTransform` options (scale, ratio, hflip, vflip, intensity).

    Returns:
        `segmentation_metrics` of the evaluated pairs, plus ``steps`` and ``train_loss`` (the
        mean of the last 10 steps' losses).
    """
    if not train:
        raise UserError("segment_finetune: no training pairs")
    if steps < 1:
        raise UserError(f"segment_finetune: steps={steps}; need at least 1")
    torch.manual_seed(seed)
    if layer_decay is not None and isinstance(model, BeitSegmenter):
        groups = layer_decay_param_groups(model, lr, weight_decay, layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay)
    for g in groups:
        g.pop("param_names", None)
    optimizer = torch.optim.AdamW(groups, lr=lr)
    transform = SegmentTransform(train=True, image_size=image_size, **(augment or {}))
    order = np.random.default_rng([seed, 2**31 - 1])  # which pairs each step draws
    losses: list[float] = []
    model.train()
    for step in range(steps):
        rate = cosine_lr(step, steps, lr, min_lr, warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = rate * g.get("lr_scale", 1.0)
        indices = order.integers(0, len(train), batch_size)
        images, masks = _batch(train, indices, transform, seed, step)
        loss = segment_loss(model(images), masks, classes.ignore_index)
        if not torch.isfinite(loss):
            raise UserError(f"segment_finetune: the loss is {loss.item()} at step {step}; lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        losses.append(loss.item())
    metrics = evaluate_segmenter(model, val if val is not None else train, classes, image_size)
    return {**metrics, "steps": steps, "train_loss": float(np.mean(losses[-10:]))}
