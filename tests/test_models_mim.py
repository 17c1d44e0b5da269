"""Tests for beitdomain.models.mim (BeitMIM on timm's Beit) and the backbone factory."""

from __future__ import annotations

import pytest
import torch

from beitdomain.models.backbone import BACKBONE_PRESETS, create_backbone, get_preset
from beitdomain.models.classifier import param_groups_weight_decay
from beitdomain.models.mim import BeitMIM

CFG = get_preset("tiny", img_size=32)  # 4 x 4 patches of 8 px, width 64, 2 blocks
VOCAB = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(seed: int = 0, b: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, 32, 32, generator=g)
    mask = torch.zeros(b, 16, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(16, generator=g)[:6]] = True
    tokens = torch.randint(0, VOCAB, (b, 16), generator=g)
    return images, mask, tokens


def _model(**kwargs: object) -> BeitMIM:
    torch.manual_seed(0)
    return BeitMIM.from_config(CFG, vocab_size=VOCAB, **kwargs).eval()  # type: ignore[arg-type]


def test_presets_build() -> None:
    assert {"tiny", "vit-tiny", "vit-small", "vit-base"} <= set(BACKBONE_PRESETS)
    bb = create_backbone(BACKBONE_PRESETS["tiny"])
    assert bb.num_classes == 0
    assert bb.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 65, 64)
    base = BACKBONE_PRESETS["vit-base"]
    assert (base.embed_dim, base.depth, base.num_heads) == (768, 12, 12)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        get_preset("tiny", img_size=30)
    with pytest.raises(KeyError, match="valid presets"):
        get_preset("huge")


def test_output_is_masked_positions_only() -> None:
    model = _model()
    images, mask, _ = _batch()
    out = model(images, mask)
    assert out.shape == (int(mask.sum()), VOCAB)
    # A [B, gh, gw] mask gives the same result.
    torch.testing.assert_close(model(images, mask.view(2, 4, 4)), out)
    # Row order is (batch, patch) row-major: compare against a full-sequence head.
    full = model.lm_head(model.encode(images, mask)[:, 1:])  # [B, L, V]
    torch.testing.assert_close(out, full[mask])
    with pytest.raises(ValueError, match=r"expected \(2, 16\)"):
        model(images, torch.zeros(2, 15, dtype=torch.bool))


@pytest.mark.parametrize("target", ["tokens", "pixels"])
def test_masked_tail_equals_the_full_last_block(target: str) -> None:
    """forward() runs the last MLP and norm on masked tokens only; nothing else may change."""
    torch.manual_seed(0)
    cfg = CFG.replace(drop_path_rate=0.3)
    model = BeitMIM.from_config(cfg, vocab_size=VOCAB, target=target)  # type: ignore[arg-type]
    images, mask, _ = _batch(b=4)
    for train in (False, True):  # train: drop path draws one value per image on both paths
        model.train(train)
        torch.manual_seed(1)
        fast = model(images, mask)
        torch.manual_seed(1)
        full = model.lm_head(model.encode(images, mask)[:, 1:][mask])
        torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    # Gradients agree too.
    model.eval()
    model(images, mask).square().sum().backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.lm_head(model.encode(images, mask)[:, 1:][mask]).square().sum().backward()
    for a, p in zip(fast_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5)
    # Unequal masked counts: the full last block runs, same result.
    ragged = mask.clone()
    ragged[0, ~mask[0]] = torch.tensor([True] + [False] * 9)
    torch.testing.assert_close(
        model(images, ragged), model.lm_head(model.encode(images, ragged)[:, 1:][ragged])
    )


@pytest.mark.parametrize("target", ["tokens", "pixels"])
def test_a_known_masked_count_gives_the_same_loss_without_counting(target: str) -> None:
    """With `num_masked` the masked positions come from a fixed-size sort, not `nonzero`; the
    predictions, the targets they are paired with and the loss are those of the counted path."""
    torch.manual_seed(0)
    model = BeitMIM.from_config(CFG, vocab_size=VOCAB, target=target).eval()  # type: ignore[arg-type]
    images, mask, tokens = _batch(b=3)
    targets = tokens if target == "tokens" else None
    torch.testing.assert_close(model(images, mask, num_masked=6), model(images, mask))
    loss, metrics = model.loss(images, mask, targets, num_masked=6)
    ref, ref_metrics = model.loss(images, mask, targets)
    torch.testing.assert_close(loss, ref)
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:
        torch.testing.assert_close(metrics[k], ref_metrics[k])
    pos = BeitMIM.masked_positions(mask, 6)
    assert torch.equal(pos, mask.nonzero()[:, 1].view(3, 6))  # ascending, per image
    # A count the masks do not hold is refused (checked on the CPU, where it costs nothing).
    with pytest.raises(ValueError, match=r"num_masked=5 but the masks hold \[6, 6, 6\]"):
        model.loss(images, mask, targets, num_masked=5)


def test_the_loss_with_a_known_count_traces_as_one_graph() -> None:
    """Under torch.compile the CPU-side count check is skipped (it would split the step in
    two graphs); dynamo's trace of the whole loss then has no graph break."""
    import torch._dynamo

    model = _model()
    images, mask, tokens = _batch(b=3)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda *a: model.loss(*a, num_masked=6)[0])(
        images, mask, tokens
    )
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_masked_patch_content_is_invisible() -> None:
    model = _model()
    images, mask, _ = _batch()
    out = model(images, mask)
    # Overwrite the pixels of masked patches: nothing may change (mask token replaced them).
    pix = images.clone().view(2, 3, 4, 8, 4, 8)
    m = mask.view(2, 1, 4, 1, 4, 1).expand_as(pix)
    pix[m] = 100.0
    torch.testing.assert_close(model(pix.view(2, 3, 32, 32), mask), out)
    # Changing a visible patch does change the predictions.
    vis = images.clone()
    first_visible = int((~mask[0]).nonzero()[0])
    r, c = divmod(first_visible, 4)
    vis[0, :, r * 8 : r * 8 + 8, c * 8 : c * 8 + 8] += 5.0
    assert not torch.allclose(model(vis, mask), out)


def test_loss_decreases_overfitting_fixed_batch() -> None:
    model = _model().train()
    images, mask, tokens = _batch(b=4)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(30):
        loss, metrics = model.loss(images, mask, tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert float(metrics["acc"]) > 4 / VOCAB  # chance is 1 / VOCAB
    assert int(metrics["num_masked"]) == int(mask.sum())


def test_accuracy_counts_masked_positions_only() -> None:
    model = _model()
    images, mask, _ = _batch()
    with torch.no_grad():
        pred = model(images, mask).argmax(-1)  # [N]
    # Masked targets = the predictions (all right); visible targets = a wrong class for every
    # visible patch, so an accuracy over all positions would be 12 / 32 instead of 1.
    with torch.no_grad():
        full_pred = model.lm_head(model.encode(images, mask)[:, 1:]).argmax(-1)
    targets = (full_pred + 1) % VOCAB
    targets[mask] = pred
    _, metrics = model.loss(images, mask, targets)
    assert float(metrics["acc"]) == 1.0
    # Half of the masked targets wrong -> exactly 0.5.
    masked_targets = pred.clone()
    masked_targets[::2] = (masked_targets[::2] + 1) % VOCAB
    _, metrics = model.loss(images, mask, masked_targets)  # [N] form
    assert float(metrics["acc"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="expected"):
        model.loss(images, mask, torch.zeros(5, dtype=torch.long))


def test_pixel_target() -> None:
    model = _model(target="pixels").train()
    images, mask, _ = _batch(b=4)
    out = model(images, mask)
    assert out.shape == (int(mask.sum()), 8 * 8 * 3)
    tgt = model.pixel_targets(images)
    assert tgt.shape == (4, 16, 192)
    torch.testing.assert_close(tgt.mean(-1), torch.zeros(4, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(tgt.std(-1), torch.ones(4, 16), atol=1e-3, rtol=0)
    # patchify matches patch order: patch (row 1, col 2) of image 0.
    raw = model.patchify(images)
    torch.testing.assert_close(raw[0, 6], images[0, :, 8:16, 16:24].permute(1, 2, 0).reshape(-1))
    loss, metrics = model.loss(images, mask)
    torch.testing.assert_close(loss, ((out - tgt[mask]) ** 2).mean())
    assert "acc" not in metrics
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    first = float(metrics["mse"])
    for _ in range(20):
        loss, _ = model.loss(images, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Noise images: only memorization helps, so a clear but modest drop is expected.
    assert float(loss.detach()) < 0.9 * first


def test_grad_checkpointing_matches() -> None:
    images, mask, tokens = _batch()
    grads = []
    for ckpt in (False, True):
        model = _model().train()
        model.set_grad_checkpointing(ckpt)
        assert model.backbone.grad_checkpointing is ckpt
        loss, _ = model.loss(images, mask, tokens)
        loss.backward()
        grads.append(model.backbone.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_bf16_autocast_runs() -> None:
    model = _model().train()
    images, mask, tokens = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.loss(images, mask, tokens)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.mask_token.grad is not None
    assert model.backbone.rel_pos_bias.relative_position_bias_table.grad is not None


def test_requires_token_norm_and_pretrain_groups() -> None:
    with pytest.raises(ValueError, match="final_norm='tokens'"):
        BeitMIM(create_backbone(CFG))
    model = _model()
    decay, no_decay = param_groups_weight_decay(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "mask_token" in no_decay["param_names"]
    assert "backbone.cls_token" in no_decay["param_names"]
    assert "backbone.rel_pos_bias.relative_position_bias_table" in no_decay["param_names"]
    assert "backbone.blocks.0.gamma_1" in no_decay["param_names"]
    assert "lm_head.weight" in decay["param_names"]
    assert "backbone.blocks.1.attn.qkv.weight" in decay["param_names"]
    n_params = len(list(model.parameters()))
    assert len(decay["params"]) + len(no_decay["params"]) == n_params
