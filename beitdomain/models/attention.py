"""Attention on timm `Beit` blocks: which kernel runs, in which dtype, and at which tokens.

BEiT's attention adds a learned relative position bias to the scores. PyTorch's fused CPU
kernel (flash attention for CPU) takes no additive mask that needs a gradient, so on a CPU
`F.scaled_dot_product_attention` falls back to its generic "math" path, which in bf16 runs the
scores in fp32 with extra masking passes. The explicit path (q @ k^T * scale + bias, softmax,
@ v) with the bias in the scores' dtype computes the same about 2x faster (forward + backward,
64 x 4 heads x 65 tokens, BENCHMARKS.md). On CUDA the fused memory-efficient kernel is the
fast one.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def select_attention_kernels(model: nn.Module, device: torch.device) -> int:
    """Gives every timm BEiT attention module of `model` the faster path for `device`.

    Fused SDPA on CUDA (and other accelerators), explicit softmax attention on CPU; both through
    `attention_forward`, which adds the relative position bias in the scores' dtype (timm's
    explicit path adds a float32 bias to bf16 scores, which runs the softmax and its backward
    in float32). The result is the same function as timm's; only rounding differs.

    Returns:
        How many attention modules were set.
    """
    fused = device.type != "cpu"
    n = 0
    for m in model.modules():
        if hasattr(m, "fused_attn") and hasattr(m, "qkv") and hasattr(m, "q_bias"):
            m.fused_attn = fused
            m.forward = types.MethodType(attention_forward, m)  # state dict unchanged
            n += 1
    return n


def block_relative_position_bias(attn: nn.Module) -> torch.Tensor | None:
    """A timm BEiT attention module's own relative position bias `[H, N, N]`, or None."""
    table = attn.relative_position_bias_table
    if table is None:
        return None
    index = attn.relative_position_index  # [N, N] -> rows of the [distances, H] table
    n = index.shape[0]
    return table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1)


def attention_forward(
    attn: nn.Module,
    x: torch.Tensor,
    shared_rel_pos_bias: torch.Tensor | None = None,
    idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """timm BEiT `Attention.forward(x, shared_rel_pos_bias)`, optionally at tokens `idx` only.

    With `idx`, keys and values still come from every token, so the result equals
    `attn(x, shared_rel_pos_bias).gather(1, idx)`; the query projection, the scores, the
    attention-weighted sum and the output projection run on `M = idx.shape[1]` queries instead
    of all `N` (what the MIM head needs from the last block: its masked tokens).

    Args:
        attn: a `timm.models.beit.Attention`.
        x: `[B, N, D]`, the (normalized) block input.
        shared_rel_pos_bias: the backbone's shared bias `[H, N, N]` (or `[1, H, N, N]`), or None.
        idx: `[B, M]` token positions (int64), or None for every token.

    Returns:
        `[B, N, D]`, or `[B, M, D]` with `idx`.
    """
    b, n, d = x.shape
    heads = attn.num_heads
    w = attn.qkv.weight  # [3 * inner, D]: rows q | k | v
    inner = w.shape[0] // 3
    hd = inner // heads
    qkv_bias = None
    if attn.q_bias is not None:
        qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    if idx is None:
        qkv = F.linear(x, w, qkv_bias).view(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, N, hd] each
    else:
        xq = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))  # [B, M, D]
        q_bias = kv_bias = None
        if qkv_bias is not None:
            q_bias, kv_bias = qkv_bias[:inner], qkv_bias[inner:]
        q = F.linear(xq, w[:inner], q_bias).view(b, -1, heads, hd).transpose(1, 2)
        kv = F.linear(x, w[inner:], kv_bias).view(b, n, 2, heads, hd).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # [B, H, N, hd] each
    bias = block_relative_position_bias(attn)
    if shared_rel_pos_bias is not None:
        shared = shared_rel_pos_bias.reshape(-1, n, n)  # [H, N, N]
        bias = shared if bias is None else bias + shared
    if bias is not None:
        bias = bias.to(q.dtype)  # the scores' dtype (see `select_attention_kernels`)
        if idx is not None:
            bias = bias.transpose(0, 1)[idx].transpose(1, 2)  # [B, H, M, N]
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    else:
        s = (q * attn.scale) @ k.transpose(-2, -1)  # [B, H, M or N, N]
        if bias is not None:
            s = s + bias
        o = attn.attn_drop(s.softmax(dim=-1)) @ v
    o = attn.proj(o.transpose(1, 2).reshape(b, -1, inner))
    return attn.proj_drop(o)


def attention_at(
    attn: nn.Module,
    x: torch.Tensor,
    idx: torch.Tensor,
    shared_rel_pos_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`attention_forward` at token positions `idx` `[B, M]` only: `[B, M, D]`."""
    return attention_forward(attn, x, shared_rel_pos_bias, idx)
