"""Tests for beitdomain.models.residual: BEiT's residual branch as one fused op."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from timm.layers import DropPath
from timm.models.beit import Block
from torch import nn

from beitdomain.models.backbone import get_preset
from beitdomain.models.kernels import select_kernels
from beitdomain.models.mim import BeitMIM
from beitdomain.models.residual import block_forward, residual_add, select_block_kernel

pytestmark = pytest.mark.usefixtures("one_thread")


def _timm_branch(x, y, gamma, drop):  # timm Block.forward's update, verbatim in effect
    return x + drop(y if gamma is None else gamma * y)


@pytest.mark.parametrize("with_gamma", [True, False])
@pytest.mark.parametrize(("drop_prob", "scale_by_keep"), [(0.0, True), (0.4, True), (0.4, False)])
@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16])
def test_residual_add_equals_timms_branch_with_its_draws_and_gradients(
    with_gamma: bool, drop_prob: float, scale_by_keep: bool, y_dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    drop = DropPath(drop_prob, scale_by_keep=scale_by_keep) if drop_prob else nn.Identity()
    drop.train()
    x0 = torch.randn(16, 5, 8)
    y0 = torch.randn(16, 5, 8).to(y_dtype)
    g0 = torch.rand(8) + 0.5 if with_gamma else None
    results = []
    for fn in (_timm_branch, residual_add):
        x = x0.clone().requires_grad_()
        y = y0.clone().requires_grad_()
        gamma = g0.clone().requires_grad_() if with_gamma else None
        torch.manual_seed(1)
        out = fn(x, y, gamma, drop)
        after = torch.rand(3)  # the generator's state after the branch
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = [x.grad, y.grad] + ([gamma.grad] if with_gamma else [])
        results.append((out.detach(), after, grads))
    (want, want_after, want_grads), (got, got_after, got_grads) = results
    assert got.dtype == want.dtype
    torch.testing.assert_close(got_after, want_after, rtol=0, atol=0)  # the same draws
    # bf16 y: timm rounds y * keep to bf16 without LayerScale; the fused op does not
    tol = 1e-6 if y_dtype == torch.float32 or with_gamma else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-5 if g.dtype == torch.float32 else 1e-2, atol=1e-5)
    if drop_prob:  # some images were dropped: their update is exactly zero
        dropped = (want - x0).abs().amax(dim=(1, 2)) == 0
        assert dropped.any() and not dropped.all()
        assert torch.equal((got - x0).abs().amax(dim=(1, 2)) == 0, dropped)


@pytest.mark.parametrize("layer_scale", [0.1, None])
def test_block_forward_equals_timms_block_in_training(layer_scale: float | None) -> None:
    torch.manual_seed(0)
    blk = Block(16, 2, qkv_bias=True, drop_path=0.3, init_values=layer_scale, window_size=(3, 3))
    blk.train()
    x0 = torch.randn(5, 10, 16)
    results = []
    for forward in (blk.forward, lambda x: block_forward(blk, x)):
        blk.zero_grad()
        x = x0.clone().requires_grad_()
        torch.manual_seed(3)
        out = forward(x)
        out.square().sum().backward()
        results.append((out.detach(), x.grad, [p.grad.clone() for p in blk.parameters()]))
    (want, want_gx, want_g), (got, got_gx, got_g) = results
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_gx, want_gx, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_the_mim_step_is_the_same_with_and_without_the_fused_blocks() -> None:
    """A pre-training loss with drop path on: the same value and gradients whether the blocks
    run timm's forward or the fused one, so a run's numbers and its drop-path draws hold."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("tiny", img_size=32), drop_path_rate=0.3)
    model = BeitMIM.from_config(cfg, vocab_size=16).train()
    images = torch.rand(4, 3, 32, 32)
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, 3:9] = True
    targets = torch.randint(0, 16, (4, 16))
    results = []
    for fused in (False, True):
        if fused:
            assert select_block_kernel(model, torch.device("cpu")) == len(model.backbone.blocks)
        model.zero_grad()
        torch.manual_seed(5)
        loss, _ = model.loss(images, mask, targets, num_masked=6)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for g, w in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_select_block_kernel_keeps_the_state_dict_and_skips_other_modules() -> None:
    model = BeitMIM.from_config(get_preset("tiny", img_size=32), vocab_size=16)
    keys = list(model.state_dict())
    assert select_kernels(model, torch.device("cpu"))["blocks"] == len(model.backbone.blocks)
    assert list(model.state_dict()) == keys
    assert select_block_kernel(nn.Sequential(nn.Linear(4, 4)), torch.device("cpu")) == 0
