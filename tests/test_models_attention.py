"""Tests for beitdomain.models.attention: the kernel switch and attention at chosen tokens."""

from __future__ import annotations

import pytest
import torch

from beitdomain.models.attention import attention_at, select_attention_kernels
from beitdomain.models.backbone import get_preset
from beitdomain.models.mim import BeitMIM

VOCAB = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed_mim(shared: bool) -> BeitMIM:
    torch.manual_seed(0)
    cfg = get_preset("tiny", img_size=32, use_shared_rel_pos_bias=shared)
    model = BeitMIM.from_config(cfg, vocab_size=VOCAB)
    with torch.no_grad():  # move LayerScale, biases and bias tables off their init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_attention_at_equals_full_attention_gathered(shared: bool, fused: bool) -> None:
    model = _perturbed_mim(shared)
    bb = model.backbone
    attn = bb.blocks[-1].attn
    attn.fused_attn = fused
    x = torch.randn(3, 17, 64)
    idx = torch.stack([torch.randperm(17)[:7].sort().values for _ in range(3)])  # [B, M]
    bias = bb.rel_pos_bias() if shared else None
    full = attn(x, shared_rel_pos_bias=bias)  # [B, N, D]
    want = full.gather(1, idx.unsqueeze(-1).expand(-1, -1, 64))
    got = attention_at(attn, x, idx, bias)
    assert got.shape == (3, 7, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_mim_forward_equals_plain_path_in_fp32_with_both_kernels(shared: bool) -> None:
    """forward() (last block on masked queries) vs every token through timm, loss and grads."""
    model = _perturbed_mim(shared)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 32, generator=g)
    mask = torch.zeros(4, 16, dtype=torch.bool)
    for i in range(4):
        mask[i, torch.randperm(16, generator=g)[:6]] = True
    for device_kind in ("cpu", "cuda"):  # the kernel choice for that device, run on the CPU
        select_attention_kernels(model, torch.device(device_kind))
        model.zero_grad()
        fast = model(images, mask)
        fast.square().sum().backward()
        fast_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        plain = model.lm_head(model.encode(images, mask)[:, 1:][mask])
        plain.square().sum().backward()
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
        for a, p in zip(fast_grads, model.parameters()):
            torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_selected_forward_equals_timm_forward(shared: bool) -> None:
    model = _perturbed_mim(shared)
    bb = model.backbone
    x = torch.randn(2, 17, 64)
    bias = bb.rel_pos_bias() if shared else None
    for device_kind in ("cpu", "cuda"):  # explicit / fused path (run on the CPU here)
        for blk in bb.blocks:
            blk.attn.__dict__.pop("forward", None)
            blk.attn.fused_attn = device_kind != "cpu"
            want = blk.attn(x, shared_rel_pos_bias=bias)
            select_attention_kernels(blk, torch.device(device_kind))
            assert "forward" in blk.attn.__dict__
            torch.testing.assert_close(
                blk.attn(x, shared_rel_pos_bias=bias), want, rtol=1e-5, atol=1e-5
            )
    # Under bf16 autocast the bias joins the scores in bf16 and the output stays close.
    select_attention_kernels(model, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bb.blocks[0].attn(x, shared_rel_pos_bias=bias)
    assert got.dtype == torch.bfloat16
    bb.blocks[0].attn.__dict__.pop("forward")
    torch.testing.assert_close(
        got.float(), bb.blocks[0].attn(x, shared_rel_pos_bias=bias), rtol=0.05, atol=0.05
    )


def test_select_attention_kernels_sets_every_block() -> None:
    model = _perturbed_mim(True)
    assert select_attention_kernels(model, torch.device("cpu")) == 2  # tiny preset: 2 blocks
    assert not any(b.attn.fused_attn for b in model.backbone.blocks)
    select_attention_kernels(model, torch.device("cuda"))
    assert all(b.attn.fused_attn for b in model.backbone.blocks)
    # The state dict is untouched (checkpoints and exports keep timm's keys).
    assert set(model.state_dict()) == set(_perturbed_mim(True).state_dict())
