"""BEiT image classifier (mean-pooled patch tokens), optimizer param groups, linear-probe freezing.

Param groups follow BEiT's fine-tuning recipe (unilm `optim_factory.py`): layer-wise learning-rate
decay with the embeddings as layer 0, block i as layer i + 1 and the head as layer depth + 1,
`lr_scale = layer_decay ** (depth + 1 - layer)`; no weight decay on norms, biases, other 1-D
parameters (LayerScale gammas), position embeddings, relative position tables and cls/mask tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch import nn

from beitdomain.models.backbone import BackboneConfig, create_backbone
from beitdomain.models.convention import InputNorm

# Substrings of parameter names that never get weight decay (besides every 1-D parameter).
NO_WEIGHT_DECAY_KEYS: tuple[str, ...] = (
    "pos_embed",
    "relative_position_bias_table",
    "cls_token",
    "mask_token",
)


class BeitClassifier(nn.Module):
    """Mean pooling of patch tokens, LayerNorm (`fc_norm`), dropout, linear head.

    The backbone is a timm `Beit` built with `final_norm="pooled"` (it owns `fc_norm` and drop
    path); the head is initialized like BEiT's: trunc-normal(0.02) scaled by `head_init_scale`,
    so the first fine-tuning steps do not wreck the pre-trained features with large gradients.

    Args:
        backbone: timm `Beit` with `num_classes=0`.
        num_classes: number of output classes.
        head_init_scale: scale of the head's initial weights and bias (BEiT: 0.001).
        head_drop: dropout before the head.
    """

    def __init__(
        self,
        backbone: Beit,
        num_classes: int,
        *,
        head_init_scale: float = 0.001,
        head_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if backbone.global_pool != "avg":
            raise ValueError(
                "BeitClassifier needs a mean-pooling backbone; build it with "
                "create_backbone(cfg, final_norm='pooled')"
            )
        self.backbone = backbone
        self.num_classes = num_classes
        self.backbone_frozen = False
        # [0, 1] images -> the weights' own convention (mean/std saved in the state dict).
        self.input_norm = InputNorm(backbone.patch_embed.proj.in_channels)
        self.head_drop = nn.Dropout(head_drop)
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)

    @classmethod
    def from_config(cls, cfg: BackboneConfig, num_classes: int, **kwargs: float) -> BeitClassifier:
        """Builds the backbone from `cfg` (pooled final norm) and adds the head."""
        return cls(create_backbone(cfg, final_norm="pooled"), num_classes, **kwargs)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled, normalized features `[B, D]`."""
        tokens = self.backbone.forward_features(self.input_norm(images))  # [B, 1 + L, D]
        # timm: mean over patch tokens (cls excluded), then fc_norm.
        return self.backbone.forward_head(tokens, pre_logits=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits `[B, num_classes]` for images `[B, C, H, W]`."""
        return self.head(self.head_drop(self.forward_features(images)))

    def train(self, mode: bool = True) -> BeitClassifier:
        """As `nn.Module.train`, but a frozen backbone stays in eval mode (no drop path)."""
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self


def freeze_backbone(model: BeitClassifier, *, train_fc_norm: bool = False) -> None:
    """Linear probing: freeze every backbone parameter, keep the head trainable.

    The backbone is also kept in eval mode (no stochastic depth or dropout) from now on.

    Args:
        model: the classifier.
        train_fc_norm: also train the pooled LayerNorm's affine parameters.
    """
    for name, param in model.backbone.named_parameters():
        param.requires_grad_(train_fc_norm and name.startswith("fc_norm."))
    for param in model.head.parameters():
        param.requires_grad_(True)
    model.backbone_frozen = True
    model.train(model.training)


def _find_backbone(model: nn.Module) -> tuple[Beit, str]:
    if isinstance(model, Beit):
        return model, ""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, Beit):
        return backbone, "backbone."
    raise TypeError(
        f"{type(model).__name__} has no timm Beit backbone (expected a Beit or a module with "
        "a `backbone` attribute holding one)"
    )


def _no_decay(name: str, param: torch.Tensor, extra: Iterable[str]) -> bool:
    return (
        param.ndim <= 1
        or name.endswith(".bias")
        or any(key in name for key in NO_WEIGHT_DECAY_KEYS)
        or any(key in name for key in extra)
    )


def layer_id(name: str, depth: int) -> int:
    """BEiT layer id of a parameter name (relative to the backbone, or a wrapper's own name).

    Embeddings (patch_embed, cls_token, pos_embed, mask_token) are 0, `blocks.i.*` is i + 1,
    everything else (final norms, heads, the shared relative position bias) is depth + 1. The
    shared bias goes to the top layer as in unilm: it feeds every block, so it is not decayed
    like an input embedding.
    """
    if name.startswith(("patch_embed", "cls_token", "pos_embed", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float = 0.65,
    no_weight_decay_names: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Optimizer param groups with BEiT layer-wise lr decay and weight-decay exclusions.

    Args:
        model: a `BeitClassifier`, `BeitMIM` or timm `Beit`.
        lr: base learning rate (the head's).
        weight_decay: weight decay for matrices.
        layer_decay: per-layer lr factor; 1.0 = no decay.
        no_weight_decay_names: extra name substrings excluded from weight decay.

    Returns:
        Groups with "params", "lr" (= lr * lr_scale), "lr_scale", "weight_decay", "layer_id"
        and "param_names". Schedulers should set `group["lr"] = lr_t * group["lr_scale"]`.
        Frozen parameters (requires_grad False) are left out.
    """
    backbone, prefix = _find_backbone(model)
    depth = len(backbone.blocks)
    scales = [layer_decay ** (depth + 1 - i) for i in range(depth + 2)]
    extra = tuple(no_weight_decay_names)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        local = name[len(prefix) :] if prefix and name.startswith(prefix) else name
        lid = layer_id(local, depth)
        decay = not _no_decay(name, param, extra)
        group = groups.setdefault(
            (lid, decay),
            {
                "params": [],
                "param_names": [],
                "lr": lr * scales[lid],
                "lr_scale": scales[lid],
                "weight_decay": weight_decay if decay else 0.0,
                "layer_id": lid,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def param_groups_weight_decay(
    model: nn.Module, weight_decay: float, no_weight_decay_names: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Two param groups (decay / no decay) with the same exclusions, for pre-training.

    Args:
        model: any module (e.g. `BeitMIM`).
        weight_decay: weight decay for matrices.
        no_weight_decay_names: extra name substrings excluded from weight decay.

    Returns:
        `[{"params", "param_names", "weight_decay": weight_decay, "lr_scale": 1.0},
        {... "weight_decay": 0.0 ...}]`; frozen parameters are left out.
    """
    extra = tuple(no_weight_decay_names)
    decay: dict[str, Any] = {"params": [], "param_names": [], "weight_decay": weight_decay}
    no_decay: dict[str, Any] = {"params": [], "param_names": [], "weight_decay": 0.0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = no_decay if _no_decay(name, param, extra) else decay
        group["params"].append(param)
        group["param_names"].append(name)
    return [dict(g, lr_scale=1.0) for g in (decay, no_decay)]
