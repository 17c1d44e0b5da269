"""Which kernels a model's layers run on a device, chosen once before training.

Three choices, each the same function as timm's layers with only rounding differing, and each
leaving the state dict unchanged:

- attention: fused SDPA on CUDA, explicit softmax attention on a CPU (`models.attention`);
- the patch embedding: timm's `PatchEmbed` is a convolution whose kernel equals its stride, i.e.
  one matrix multiply of the flattened patches by the flattened kernel. On a CPU oneDNN's
  convolution backward for the kernel's gradient is slow (bf16, the demo's 64 x 1 x 64 x 64
  images with 8 x 8 patches: forward + backward 3.8 ms as a convolution, 1.0 ms as a matrix
  multiply; BENCHMARKS.md), so a CPU runs it as `F.linear`. CUDA keeps cuDNN's convolution
  (not measured there);
- the blocks' residual branches, `x + drop_path(gamma * y)`, as one fused op on every device
  (`models.residual`).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from torch import nn

from beitdomain.models.attention import select_attention_kernels
from beitdomain.models.residual import select_block_kernel


def patch_projection_as_matmul(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for a patch projection (kernel = stride, no padding) as one matrix multiply.

    Patches `[B, gh*gw, C*ph*pw]` (channel, row, column: the order of the kernel's weights)
    times the flattened kernel `[D, C*ph*pw]`; the result is returned as the convolution's
    `[B, D, gh, gw]` (a view over `[B, gh, gw, D]`, which timm's `PatchEmbed` flattens back to
    `[B, gh*gw, D]` without a copy).
    """
    ph, pw = conv.kernel_size
    b, c, h, w = x.shape
    if h % ph or w % pw:  # a partial patch: the convolution drops it, keep its semantics
        return conv._conv_forward(x, conv.weight, conv.bias)
    gh, gw = h // ph, w // pw
    patches = x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(b, gh * gw, c * ph * pw)
    y = F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)
    return y.view(b, gh, gw, -1).permute(0, 3, 1, 2)


def is_patch_projection(m: nn.Module) -> bool:
    """A `Conv2d` that cuts non-overlapping patches: kernel = stride, no padding or groups."""
    return (
        type(m) is nn.Conv2d
        and m.kernel_size == m.stride
        and m.padding == (0, 0)
        and m.dilation == (1, 1)
        and m.groups == 1
    )


def select_patch_embed_kernel(model: nn.Module, device: torch.device) -> int:
    """Runs every timm `PatchEmbed` projection of `model` as a matrix multiply on a CPU.

    On other devices the projections keep (or get back) the convolution. Returns how many
    projections were set.
    """
    n = 0
    for m in model.modules():
        if not isinstance(m, PatchEmbed) or not is_patch_projection(m.proj):
            continue
        proj = m.proj
        if device.type == "cpu":
            proj.forward = types.MethodType(patch_projection_as_matmul, proj)
        else:
            proj.__dict__.pop("forward", None)  # the class's convolution
        n += 1
    return n


def select_kernels(model: nn.Module, device: torch.device) -> dict[str, int]:
    """The three choices for `device`; returns how many modules of each kind were set."""
    return {
        "attention": select_attention_kernels(model, device),
        "patch_embed": select_patch_embed_kernel(model, device),
        "blocks": select_block_kernel(model, device),
    }
