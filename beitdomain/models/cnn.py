"""The arm a practitioner tries first: any timm architecture trained from random weights.

`--init timm:resnet18` (any name `timm.list_models()` knows) fine-tunes that network from
scratch with the same data, augmentations, schedule and label budget as the BEiT arms, so the
curve's "strongest arm without pre-training" includes the model a user would otherwise train.
The classifier has the same face as `BeitClassifier` (`input_norm`, `forward_features`, a
linear `head`, `num_classes`), so LP-FT's probe head, evaluation and prediction treat both alike.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
from timm.layers import trunc_normal_
from torch import nn

from beitdomain.models.convention import InputNorm
from beitdomain.precision import autocast

TIMM_PREFIX = "timm:"


def timm_arch(init: str | None) -> str | None:
    """The architecture of an init `timm:<name>`; None for anything else (weights, scratch)."""
    if init is None or not init.lower().startswith(TIMM_PREFIX):
        return None
    return init[len(TIMM_PREFIX) :].strip()


def check_timm_arch(name: str) -> str:
    """`name` if timm can build it; a ValueError naming close matches otherwise."""
    if not name:
        raise ValueError("timm: needs an architecture name, e.g. timm:resnet18")
    if timm.is_model(name):
        return name
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
    raise ValueError(f"timm has no architecture {name!r}{hint}")


class TimmClassifier(nn.Module):
    """A timm network from random weights: global-pooled features -> dropout -> linear head.

    Args:
        arch: a timm architecture name (`timm.list_models()`).
        num_classes: number of output classes.
        in_chans: input channels.
        drop_path: stochastic depth rate, where the architecture has it (timm ignores it
            otherwise).
        head_drop: dropout before the head.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        *,
        in_chans: int,
        drop_path: float = 0.0,
        head_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.arch = check_timm_arch(arch)
        kwargs = {"drop_path_rate": drop_path} if drop_path else {}
        self.backbone = timm.create_model(
            self.arch, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs
        )
        self.num_classes = num_classes
        self.backbone_frozen = False
        # [0, 1] images as they are, like a BEiT backbone from scratch (see models/convention.py)
        self.input_norm = InputNorm(in_chans)
        self.head_drop = nn.Dropout(head_drop)
        self.head = nn.Linear(self.backbone.num_features, num_classes)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features `[B, D]` for images `[B, C, H, W]` in [0, 1]."""
        return self.backbone(self.input_norm(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits `[B, num_classes]`."""
        return self.head(self.head_drop(self.forward_features(images)))

    def train(self, mode: bool = True) -> TimmClassifier:
        """As `nn.Module.train`, but a frozen backbone stays in eval mode (BatchNorm included)."""
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self


def freeze_timm_backbone(model: TimmClassifier) -> None:
    """Linear probing: only the head trains; the backbone stays in eval mode."""
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.backbone_frozen = True
    model.train(model.training)


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    dataset: Any,
    device: torch.device,
    *,
    batch_size: int = 64,
    amp_dtype: torch.dtype | None = None,
) -> int:
    """Sets every BatchNorm's running statistics to those of `dataset`'s images (one pass).

    A network from random weights holds running statistics of mean 0 and variance 1, so its
    eval-mode features (what a probe head is fitted on) have nothing in common with the
    train-mode features its first steps see: a resnet18 LP-FT head fitted on them started
    ELPV fine-tuning at a loss of 16,500. After this pass both modes normalize alike. Only the
    BatchNorm layers run in train mode (no dropout or drop path draws); the running statistics
    are the exact average over the batches (`momentum=None`), the rest of the model is
    unchanged. Items are `{'image', ...}` in [0, 1]. Returns the number of layers recalibrated.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    was = model.training
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative: the plain average over every batch
        m.train()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    try:
        for batch in loader:
            with autocast(device, amp_dtype):
                model.forward_features(batch["image"].to(device, non_blocking=True))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was)
    return len(norms)
