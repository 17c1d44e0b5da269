"""Tests for beitdomain.models.classifier: pooling head, layer decay groups, linear probing."""

from __future__ import annotations

import pytest
import torch

from beitdomain.models.backbone import create_backbone, get_preset
from beitdomain.models.classifier import (
    BeitClassifier,
    freeze_backbone,
    layer_decay_param_groups,
)

CFG = get_preset("tiny", img_size=32, depth=4, use_shared_rel_pos_bias=False, drop_path_rate=0.1)


pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> BeitClassifier:
    torch.manual_seed(0)
    return BeitClassifier.from_config(CFG, num_classes=5)


def test_forward_and_head_init() -> None:
    model = _model().eval()
    x = torch.randn(3, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (3, 5)
    # Mean of patch tokens, then fc_norm.
    tokens = model.backbone.forward_features(x)
    pooled = model.backbone.fc_norm(tokens[:, 1:].mean(1))
    torch.testing.assert_close(model.forward_features(x), pooled)
    # BEiT's head init: trunc-normal(0.02) x 0.001 -> tiny logits at the start.
    assert 0.5 * 0.02 * 0.001 < float(model.head.weight.std()) < 1.5 * 0.02 * 0.001
    assert logits.abs().max() < 0.01
    with pytest.raises(ValueError, match="final_norm='pooled'"):
        BeitClassifier(create_backbone(CFG, final_norm="tokens"), 5)


def test_layer_decay_groups_depth4() -> None:
    model = _model()
    groups = layer_decay_param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["param_names"]}
    # Every trainable parameter exactly once.
    assert sorted(by_name) == sorted(n for n, _ in model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    def scale(name: str) -> float:
        return by_name[name]["lr_scale"]

    # depth 4: layers 0 (embeddings) .. 5 (head); scale = 0.5 ** (5 - layer).
    assert scale("backbone.patch_embed.proj.weight") == 0.5**5
    assert scale("backbone.cls_token") == 0.5**5
    for i in range(4):
        assert scale(f"backbone.blocks.{i}.attn.qkv.weight") == 0.5 ** (4 - i)
        assert by_name[f"backbone.blocks.{i}.mlp.fc2.bias"]["layer_id"] == i + 1
    assert scale("head.weight") == 1.0
    assert scale("backbone.fc_norm.weight") == 1.0
    for g in groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])

    def wd(name: str) -> float:
        return by_name[name]["weight_decay"]

    for name in (
        "backbone.cls_token",
        "backbone.patch_embed.proj.bias",
        "backbone.blocks.2.norm1.weight",
        "backbone.blocks.2.gamma_1",
        "backbone.blocks.2.attn.q_bias",
        "backbone.blocks.2.attn.relative_position_bias_table",
        "backbone.fc_norm.bias",
        "head.bias",
    ):
        assert wd(name) == 0.0, name
    for name in ("backbone.blocks.3.attn.qkv.weight", "backbone.patch_embed.proj.weight"):
        assert wd(name) == 0.05, name
    extra = layer_decay_param_groups(model, 1e-3, 0.05, no_weight_decay_names=["mlp.fc1.weight"])
    assert all(
        g["weight_decay"] == 0.0 for g in extra for n in g["param_names"] if "fc1.weight" in n
    )
    # Works with torch's optimizer (extra keys are kept).
    opt = torch.optim.AdamW(groups)
    assert opt.param_groups[0]["lr_scale"] == groups[0]["lr_scale"]


def test_freeze_backbone_for_linear_probe() -> None:
    model = _model()
    freeze_backbone(model)
    model.train()
    assert not model.backbone.training and model.head.training
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]
    x = torch.randn(2, 3, 32, 32)
    # Frozen backbone in eval mode: no drop path, so features are deterministic.
    torch.testing.assert_close(model.forward_features(x), model.forward_features(x))
    model(x).sum().backward()
    assert model.head.weight.grad is not None
    assert model.backbone.patch_embed.proj.weight.grad is None
    groups = layer_decay_param_groups(model, 1e-3, 0.05)
    assert sorted(n for g in groups for n in g["param_names"]) == ["head.bias", "head.weight"]
    freeze_backbone(model, train_fc_norm=True)
    assert model.backbone.fc_norm.weight.requires_grad
