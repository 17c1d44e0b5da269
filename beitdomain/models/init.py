"""unilm's BEiT initialization for pre-training from scratch (beit/modeling_pretrain.py).

unilm draws every linear weight, the cls and mask tokens (and absolute position embeddings) from
a normal of std 0.02 truncated at +-1 std (its `trunc_normal_(t, std=.02)` passes a=-std,
b=std), so their effective std is 0.02 * 0.54 = 0.0108; timm's `Beit` truncates at +-2 absolute,
i.e. not at all. Both then divide each block's attention output projection and second MLP layer
by sqrt(2 * layer_id). The patch convolution gets the same truncated normal and a zero bias
(unilm's `_init_weights` has a `Conv2d` branch; PyTorch's default, U(+-1 / sqrt(fan_in)) with
a random bias, was used here before and is 3.6x wider at a 1-channel 8 px patch).
"""

from __future__ import annotations

import math

import torch
from timm.layers import trunc_normal_
from torch import nn

UNILM_STD = 0.02


def _trunc_1sigma(t: torch.Tensor, std: float = UNILM_STD) -> None:
    trunc_normal_(t, mean=0.0, std=std, a=-std, b=std)


@torch.no_grad()
def unilm_init_(model: nn.Module) -> nn.Module:
    """Re-initializes a `BeitMIM` (or a timm `Beit`) in place as unilm's pre-training does.

    Relative position tables stay at zero, LayerNorms at weight 1 / bias 0, LayerScale gammas
    at their init value; the input convention buffers are not touched. Returns the model.
    """
    backbone = getattr(model, "backbone", model)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            _trunc_1sigma(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name in ("cls_token", "pos_embed"):
        t = getattr(backbone, name, None)
        if isinstance(t, torch.Tensor):
            _trunc_1sigma(t)
    mask_token = getattr(model, "mask_token", None)
    if isinstance(mask_token, torch.Tensor):
        _trunc_1sigma(mask_token)
    # q_bias / v_bias (timm keeps them apart from the qkv Linear) start at zero in both.
    for blk in backbone.blocks:
        for name in ("q_bias", "v_bias"):
            b = getattr(blk.attn, name, None)
            if isinstance(b, torch.Tensor):
                nn.init.zeros_(b)
    for layer_id, blk in enumerate(backbone.blocks, start=1):
        blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
        blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))
    conv = backbone.patch_embed.proj  # unilm's _init_weights: Conv2d like Linear
    _trunc_1sigma(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return model
