"""BEiT's residual branch, `x + drop_path(gamma * y)`, as one element-wise pass.

timm's `Beit` block computes each branch's update as three element-wise ops, each writing a
full `[B, N, D]` float32 tensor: the LayerScale product `gamma * y`, drop path's per-image
`* keep`, and the residual add; its backward spends three more passes (and a cast of y's
gradient to y's dtype). Here the per-image keep factor is folded into the per-channel gamma
first, a `[B, 1, D]` tensor, so the forward is one `addcmul` and the backward writes y's
gradient in y's dtype directly. On a CPU, where eager element-wise work is most of a small
model's step, this saves 0.46 ms per branch at the demo's shapes (`[64, 65, 128]`, bf16
autocast; BENCHMARKS.md).

Same function as timm's to float rounding (`gamma * keep` is multiplied first), and the same
random draw: drop path's keep mask comes from the same generator, with the same shape and
dtype, in the same order, so runs and their resumes draw the same masks as before.
"""

from __future__ import annotations

import types

import torch
from timm.models.beit import Block
from torch import nn


class _ScaledResidual(torch.autograd.Function):
    """`x + y * scale` with `scale = gamma * keep` (`[D]` or `[B, 1, D]`, broadcast over y).

    Gradients for x, y and gamma (written out, so the graph holds one node per branch); the
    drop-path keep factors get none.
    """

    @staticmethod
    def forward(ctx, x, y, gamma, keep):  # type: ignore[override]
        scale = keep if gamma is None else (gamma if keep is None else gamma * keep)
        ctx.save_for_backward(y, scale, keep)
        ctx.has_gamma = gamma is not None
        return torch.addcmul(x, y, scale)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        y, scale, keep = ctx.saved_tensors
        grad_y = grad_gamma = None
        if ctx.needs_input_grad[1]:
            grad_y = torch.empty_like(y)
            torch.mul(grad, scale, out=grad_y)  # computed in fp32, rounded once to y's dtype
        if ctx.has_gamma and ctx.needs_input_grad[2]:
            gy = grad * y  # [B, N, D]
            if keep is None:
                grad_gamma = gy.sum(dim=tuple(range(gy.ndim - 1)))
            else:  # sum over tokens, then weight each image by its keep factor
                per_image = gy.sum(dim=tuple(range(1, gy.ndim - 1)))  # [B, D]
                grad_gamma = (per_image * keep.reshape(-1, 1)).sum(0)
        grad_x = grad if ctx.needs_input_grad[0] else None
        return grad_x, grad_y, grad_gamma, None


def _keep_factor(drop: nn.Module, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """timm's `drop_path` keep factors `[B, 1, ..., 1]` (0 or 1/keep_prob), or None when off.

    Drawn as timm draws them: `new_empty(shape).bernoulli_(keep_prob)` in the dtype of the
    tensor drop path receives, then divided by keep_prob.
    """
    p = getattr(drop, "drop_prob", 0.0)
    if not drop.training or p == 0.0:
        return None
    keep_prob = 1.0 - p
    shape = (y.shape[0],) + (1,) * (y.ndim - 1)
    keep = torch.empty(shape, dtype=dtype, device=y.device).bernoulli_(keep_prob)
    if keep_prob > 0.0 and getattr(drop, "scale_by_keep", True):
        keep.div_(keep_prob)
    return keep


def residual_add(
    x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor | None, drop: nn.Module
) -> torch.Tensor:
    """`x + drop(gamma * y)` (`x + drop(y)` without LayerScale) for timm's `DropPath` or
    `Identity` `drop`, as one fused op."""
    branch_dtype = y.dtype if gamma is None else torch.promote_types(y.dtype, gamma.dtype)
    keep = _keep_factor(drop, y, branch_dtype)
    if gamma is None and keep is None:
        return x + y
    return _ScaledResidual.apply(x, y, gamma, keep)


def block_forward(
    blk: Block, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """timm `Beit` `Block.forward` with both residual branches through `residual_add`."""
    h = blk.attn(blk.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias)
    x = residual_add(x, h, blk.gamma_1, blk.drop_path1)
    return residual_add(x, blk.mlp(blk.norm2(x)), blk.gamma_2, blk.drop_path2)


def select_block_kernel(model: nn.Module, device: torch.device) -> int:
    """Gives every timm BEiT block of `model` the fused residual branches.

    The same on every `device` (plain ATen ops; not measured on CUDA). The state dict is
    unchanged. Returns how many blocks were set.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, Block):
            m.forward = types.MethodType(block_forward, m)
            n += 1
    return n
