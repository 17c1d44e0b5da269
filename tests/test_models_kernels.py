"""Tests for beitdomain.models.kernels: the patch embedding as a matrix multiply on a CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from beitdomain.models.backbone import get_preset
from beitdomain.models.classifier import BeitClassifier
from beitdomain.models.kernels import (
    is_patch_projection,
    patch_projection_as_matmul,
    select_kernels,
    select_patch_embed_kernel,
)
from beitdomain.models.mim import BeitMIM

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("chans", "patch", "h", "w"), [(1, 8, 64, 64), (3, 16, 32, 48)])
def test_patch_projection_equals_the_convolution_with_gradients(
    chans: int, patch: int, h: int, w: int
) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(chans, 24, kernel_size=patch, stride=patch)
    x = torch.randn(3, chans, h, w, requires_grad=True)
    want = conv(x)
    want.square().sum().backward()
    want_grads = [t.grad.clone() for t in (x, conv.weight, conv.bias)]
    for t in (x, conv.weight, conv.bias):
        t.grad = None
    got = patch_projection_as_matmul(conv, x)
    assert got.shape == want.shape == (3, 24, h // patch, w // patch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    for g, t in zip(want_grads, (x, conv.weight, conv.bias), strict=True):
        torch.testing.assert_close(t.grad, g, rtol=1e-4, atol=1e-4)


def test_patch_projection_keeps_the_convolution_for_a_partial_patch() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=8, stride=8)
    x = torch.randn(2, 3, 20, 16)  # 20 rows: the convolution drops the last 4
    torch.testing.assert_close(patch_projection_as_matmul(conv, x), conv(x))


def test_only_non_overlapping_projections_qualify() -> None:
    assert is_patch_projection(nn.Conv2d(3, 8, 16, stride=16))
    assert not is_patch_projection(nn.Conv2d(3, 8, 16, stride=8))
    assert not is_patch_projection(nn.Conv2d(3, 8, 16, stride=16, padding=1))
    assert not is_patch_projection(nn.Conv2d(4, 8, 16, stride=16, groups=2))


@pytest.mark.parametrize("model_kind", ["mim", "classifier"])
def test_models_compute_the_same_with_either_kernel(model_kind: str) -> None:
    """The library's models, fp32: outputs and gradients equal with the CPU choice and the
    CUDA one (the convolution), and the state dict is untouched by the switch."""
    torch.manual_seed(0)
    cfg = get_preset("tiny", img_size=32)
    if model_kind == "mim":
        model: nn.Module = BeitMIM.from_config(cfg, vocab_size=16)
        mask = torch.zeros(2, 16, dtype=torch.bool)
        mask[:, :6] = True

        def run() -> torch.Tensor:
            return model(images, mask)
    else:
        model = BeitClassifier.from_config(cfg, num_classes=3)

        def run() -> torch.Tensor:
            return model(images)

    images = torch.rand(2, 3, 32, 32)
    keys = list(model.state_dict())
    results = {}
    for device_kind in ("cuda", "cpu"):
        counts = select_kernels(model, torch.device(device_kind))
        assert counts["patch_embed"] == 1 and counts["attention"] == 2
        proj = model.backbone.patch_embed.proj
        assert ("forward" in proj.__dict__) == (device_kind == "cpu")
        model.zero_grad()
        out = run()
        out.square().sum().backward()
        results[device_kind] = (out.detach(), [p.grad.clone() for p in model.parameters()])
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(results["cpu"][0], results["cuda"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results["cpu"][1], results["cuda"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_select_patch_embed_kernel_skips_models_without_one() -> None:
    assert select_patch_embed_kernel(nn.Sequential(nn.Linear(4, 4)), torch.device("cpu")) == 0
