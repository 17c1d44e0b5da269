"""Parameter and compute counts for tokenizers.

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode`, which counts the
multiply-accumulates of convolutions and matmuls and reports ``2 x MACs``; element-wise ops
(ReLU, pooling, residual adds) are not counted. The model is re-instantiated on the ``meta``
device, so counting a DALL-E-sized encoder allocates no weights and runs no arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from beitdomain.tokenizer.dvae import DiscreteVAE

__all__ = ["count_params", "decoder_gflops", "encoder_gflops"]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (elements) in ``model``, e.g. ``model.encoder`` for a part."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _meta_copy(model: DiscreteVAE) -> DiscreteVAE:
    with torch.device("meta"):
        return DiscreteVAE(model.config)


def encoder_gflops(model: DiscreteVAE, input_size: int | None = None) -> float:
    """GFLOP (= 2 x 1e9 MACs) for encoding one image to logits.

    Args:
        model: The tokenizer (only its config is used).
        input_size: Square image side in pixels; defaults to ``model.config.input_size``.
    """
    cfg = model.config
    size = input_size or cfg.input_size
    meta = _meta_copy(model)
    x = torch.empty(1, cfg.in_chans, size, size, device="meta")
    with FlopCounterMode(display=False) as counter:
        meta.logits(x)
    return counter.get_total_flops() / 1e9


def decoder_gflops(model: DiscreteVAE, input_size: int | None = None) -> float:
    """GFLOP (= 2 x 1e9 MACs) for decoding one image's tokens (one-hot mix + decoder)."""
    cfg = model.config
    size = input_size or cfg.input_size
    grid = size // cfg.downsample
    meta = _meta_copy(model)
    z = torch.empty(1, cfg.vocab_size, grid, grid, device="meta")
    with FlopCounterMode(display=False) as counter:
        meta.decode_stats(meta.embed(z))
    return counter.get_total_flops() / 1e9
