"""Attention on timm `Beit` blocks: which kernel runs, and a block evaluated at some tokens only.

BEiT's attention adds a learned relative position bias to the scores. PyTorch's fused CPU
kernel (flash attention for CPU) takes no additive mask that needs a gradient, so on a CPU
`F.scaled_dot_product_attention` falls back to its generic "math" path, which in bf16 runs the
scores in fp32 with extra masking passes; timm's explicit path (q @ k^T * scale + bias, softmax,
@ v) computes the same in the autocast dtype about 2.5x faster (forward + backward, 64 x 4 heads
x 65 tokens, BENCHMARKS.md). On CUDA the fused memory-efficient kernel is the fast one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def select_attention_kernels(model: nn.Module, device: torch.device) -> int:
    """Sets every timm attention module of `model` to the faster path for `device`.

    Fused SDPA on CUDA (and other accelerators), timm's explicit softmax attention on CPU.
    The two compute the same function; only rounding differs.

    Returns:
        How many attention modules were set.
    """
    fused = device.type != "cpu"
    n = 0
    for m in model.modules():
        if hasattr(m, "fused_attn") and hasattr(m, "qkv"):
            m.fused_attn = fused
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


def attention_at(
    attn: nn.Module,
    x: torch.Tensor,
    idx: torch.Tensor,
    shared_rel_pos_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """timm BEiT `Attention.forward(x)` evaluated at token positions `idx` only.

    Keys and values come from every token, so the result equals
    `attn(x, shared_rel_pos_bias).gather(1, idx)`; the query projection, the scores, the
    attention-weighted sum and the output projection run on `M = idx.shape[1]` queries instead
    of all `N` (what the MIM head needs from the last block: its masked tokens).

    Args:
        attn: a `timm.models.beit.Attention`.
        x: `[B, N, D]`, the (normalized) block input.
        idx: `[B, M]` token positions (int64).
        shared_rel_pos_bias: the backbone's shared bias `[H, N, N]`, or None.

    Returns:
        `[B, M, D]`.
    """
    b, n, d = x.shape
    heads = attn.num_heads
    w = attn.qkv.weight  # [3 * inner, D]: rows q | k | v
    inner = w.shape[0] // 3
    hd = inner // heads
    q_bias = kv_bias = None
    if attn.q_bias is not None:
        q_bias, kv_bias = attn.q_bias, torch.cat((attn.k_bias, attn.v_bias))
    xq = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))  # [B, M, D]
    q = F.linear(xq, w[:inner], q_bias).view(b, -1, heads, hd).transpose(1, 2)  # [B, H, M, hd]
    kv = F.linear(x, w[inner:], kv_bias).view(b, n, 2, heads, hd).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)  # [B, H, N, hd] each
    bias = block_relative_position_bias(attn)
    if shared_rel_pos_bias is not None:
        bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
    if bias is not None:
        # [H, N, N] -> the rows of the chosen queries: [B, H, M, N]
        bias = bias.transpose(0, 1)[idx].transpose(1, 2).to(q.dtype)
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    else:
        s = (q * attn.scale) @ k.transpose(-2, -1)  # [B, H, M, N]
        if bias is not None:
            s = s + bias
        o = attn.attn_drop(s.softmax(dim=-1)) @ v
    o = attn.proj(o.transpose(1, 2).reshape(b, -1, inner))
    return attn.proj_drop(o)
