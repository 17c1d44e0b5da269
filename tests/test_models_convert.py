"""Tests for beitdomain.models.convert: unilm / timm / HF / own checkpoints, adaptation, export."""

from __future__ import annotations

import logging
import pathlib
from pathlib import Path

import pytest
import timm
import torch
from helpers import randomize, timm_beit_kwargs, tiny_hf_beit_config
from safetensors.torch import load_file, save_file

from beitdomain.models.backbone import create_backbone, get_preset
from beitdomain.models.classifier import BeitClassifier
from beitdomain.models.convert import (
    WeightsError,
    load_backbone_weights,
    resize_rel_pos_bias_table,
)
from beitdomain.models.export import export_timm_backbone
from beitdomain.models.mim import BeitMIM

CFG = get_preset("tiny", img_size=32)  # 4x4 grid, width 64, 2 blocks, 2 heads, shared bias
VOCAB = 24

pytestmark = pytest.mark.usefixtures("one_thread")


def _source_mim(seed: int = 0, **changes: object) -> BeitMIM:
    torch.manual_seed(seed)
    model = BeitMIM.from_config(CFG.replace(**changes), vocab_size=VOCAB).eval()
    randomize(model, seed)
    return model


def _unilm_state(model: BeitMIM) -> dict[str, torch.Tensor]:
    """Official unilm pre-training layout: no prefix, shared bias, index buffers, lm_head."""
    sd = {k.removeprefix("backbone."): v.clone() for k, v in model.state_dict().items()}
    sd["rel_pos_bias.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    for i in range(len(model.backbone.blocks)):
        sd[f"blocks.{i}.attn.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    return sd


def _images(c: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, c, 32, 32, generator=torch.Generator().manual_seed(seed))


def _mask() -> torch.Tensor:
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 1, 4, 5, 9]] = True
    mask[1, [2, 3, 6, 7, 15]] = True
    return mask


def _block_output(backbone: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return backbone.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)[
        0
    ]


def test_unilm_pth_roundtrip_into_mim(tmp_path: Path) -> None:
    src = _source_mim()
    path = tmp_path / "beit_pt.pth"
    torch.save({"model": _unilm_state(src), "epoch": 3}, path)
    dst = BeitMIM.from_config(CFG, vocab_size=VOCAB).eval()
    report = load_backbone_weights(dst, path, in_chans=3)
    assert report.format == "unilm"
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert len(report.ignored) == 3  # relative_position_index buffers are recomputed
    assert "mask_token" in report.loaded and "lm_head.weight" in report.loaded
    x, mask = _images(), _mask()
    torch.testing.assert_close(dst(x, mask), src(x, mask))
    text = str(report)
    assert "unilm format" in text and "ignored (recomputed): 3" in text


def test_unilm_into_per_block_classifier_copies_shared_bias(tmp_path: Path) -> None:
    src = _source_mim()
    path = tmp_path / "beit_pt.pth"
    torch.save({"model": _unilm_state(src)}, path)
    dst = BeitClassifier.from_config(CFG.replace(use_shared_rel_pos_bias=False), 7).eval()
    report = load_backbone_weights(dst, path)
    shared = src.backbone.rel_pos_bias.relative_position_bias_table
    for blk in dst.backbone.blocks:
        torch.testing.assert_close(blk.attn.relative_position_bias_table, shared)
    assert any("copied into every block" in n for n in report.notes)
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert sorted(report.unexpected) == [
        "lm_head.bias",
        "lm_head.weight",
        "mask_token",
        "norm.bias",
        "norm.weight",
    ]
    # Same block outputs: shared bias vs the same bias copied per block.
    x = _images()
    torch.testing.assert_close(_block_output(dst.backbone, x), _block_output(src.backbone, x))


def test_timm_safetensors_with_other_head(tmp_path: Path) -> None:
    torch.manual_seed(3)
    cfg = CFG.replace(use_shared_rel_pos_bias=False)
    src = timm.create_model(
        "beit_base_patch16_224", pretrained=False, num_classes=10, **timm_beit_kwargs(cfg)
    ).eval()
    randomize(src, 3)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = BeitClassifier.from_config(cfg, 4).eval()
    report = load_backbone_weights(dst, path)
    assert report.format == "timm"
    assert report.missing == []
    assert any(
        m.startswith("head.weight: checkpoint (10, 64) vs model (4, 64)") for m in report.mismatched
    )
    assert any("new head head: checkpoint has 10 outputs, model 4" in n for n in report.notes)
    # A plain timm file records no convention: the official (x - 0.5) / 0.5 is assumed and
    # carried by the model, which takes [0, 1] images.
    assert report.input["mean"] == [0.5] * 3 and report.input["std"] == [0.5] * 3
    x01 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        dst.forward_features(x01),
        src.forward_head(src.forward_features((x01 - 0.5) / 0.5), pre_logits=True),
    )


def _hf_model(shared: bool = True):  # type: ignore[no-untyped-def]
    config = tiny_hf_beit_config(
        vocab_size=VOCAB,
        layer_scale_init_value=0.1,
        use_mask_token=True,
        use_shared_relative_position_bias=shared,
        use_relative_position_bias=not shared,
        use_absolute_position_embeddings=False,
        use_mean_pooling=True,
        drop_path_rate=0.0,
    )
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    model = transformers.BeitForMaskedImageModeling(config).eval()
    randomize(model, 5)
    return model


@pytest.mark.parametrize("shared", [True, False])
def test_hf_folder_matches_transformers_outputs(tmp_path: Path, shared: bool) -> None:
    hf = _hf_model(shared)
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    dst = BeitMIM.from_config(CFG.replace(use_shared_rel_pos_bias=shared), vocab_size=VOCAB)
    dst.eval()
    report = load_backbone_weights(dst, tmp_path / "hf")
    assert report.format == "hf"
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    x, mask = _images(), _mask()
    x01 = x * 0.5 + 0.5  # HF's pixel_values are (x01 - 0.5) / 0.5, the official convention
    with torch.no_grad():
        out = hf(pixel_values=x, bool_masked_pos=mask, output_hidden_states=True)
        ours = dst.encode(x01, mask)
    # HF applies its final `layernorm` in the MIM head; compare normalized tokens and logits.
    torch.testing.assert_close(ours, hf.layernorm(out.hidden_states[-1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dst(x01, mask), out.logits[mask], atol=1e-5, rtol=1e-5)
    # The in-memory transformers-5 layout (q_proj, layers.N, shared_position_bias) maps too.
    dst2 = BeitMIM.from_config(CFG.replace(use_shared_rel_pos_bias=shared), vocab_size=VOCAB)
    report2 = load_backbone_weights(dst2.eval(), hf.state_dict())
    assert report2.missing == [] and report2.unexpected == []
    torch.testing.assert_close(dst2(x01, mask), dst(x01, mask))


def test_rgb_to_gray_and_gray_to_rgb() -> None:
    src = _source_mim()
    gray = BeitMIM.from_config(CFG.replace(in_chans=1), vocab_size=VOCAB).eval()
    report = load_backbone_weights(gray, _unilm_state(src), in_chans=1)
    assert report.reshaped == [
        "patch_embed.proj.weight: (64, 3, 8, 8) -> (64, 1, 8, 8), 3 -> 1 input channels (summed)"
    ]
    x1 = _images(c=1)
    x3 = x1.expand(-1, 3, -1, -1)
    mask = _mask()
    # The summed filter on a gray image == the RGB model on that image copied into R, G, B.
    torch.testing.assert_close(gray(x1, mask), src(x3, mask), atol=1e-5, rtol=1e-5)
    back = BeitMIM.from_config(CFG, vocab_size=VOCAB).eval()
    report = load_backbone_weights(back, gray.state_dict())
    assert "1 -> 3 input channels (replicated and scaled)" in report.reshaped[0]
    torch.testing.assert_close(back(x3, mask), gray(x1, mask), atol=1e-5, rtol=1e-5)
    with pytest.raises(WeightsError, match="in_chans=3 but the model takes 1 channels"):
        load_backbone_weights(gray, _unilm_state(src), in_chans=3)


def test_rel_pos_bias_interpolation_to_other_grid() -> None:
    src = _source_mim()
    big = BeitMIM.from_config(CFG.replace(img_size=64), vocab_size=VOCAB)  # 8x8 grid
    report = load_backbone_weights(big, _unilm_state(src))
    assert report.reshaped == [
        "rel_pos_bias.relative_position_bias_table: (52, 2) -> (228, 2), "
        "geometric (4, 4) -> (8, 8) grid (timm's resize_rel_pos_bias_table), cls kept"
    ]
    old = src.backbone.rel_pos_bias.relative_position_bias_table.detach()
    new = big.backbone.rel_pos_bias.relative_position_bias_table.detach()
    torch.testing.assert_close(new[-3:], old[-3:])  # cls entries untouched
    # Offset (0, 0) sits at the center of both tables and is reproduced exactly.
    torch.testing.assert_close(new[(15 * 15) // 2], old[(7 * 7) // 2])
    assert big(torch.randn(1, 3, 64, 64), torch.ones(1, 64, dtype=torch.bool)).shape == (64, VOCAB)
    # A table constant over offsets stays constant; non-square grids work too.
    flat = torch.cat([torch.full((7 * 5, 2), 0.25), torch.tensor([[1.0, 2], [3, 4], [5, 6]])])
    out = resize_rel_pos_bias_table(flat, (4, 3), (6, 2))
    assert out.shape == (11 * 3 + 3, 2)
    torch.testing.assert_close(out[:-3], torch.full((33, 2), 0.25))
    with pytest.raises(ValueError, match="does not belong to a"):
        resize_rel_pos_bias_table(flat, (4, 4), (6, 6))


def test_rel_pos_resize_is_timms_geometric_one() -> None:
    from timm.layers import resize_rel_pos_bias_table as timm_resize

    # 14x14 -> 8x8 (224 px to 128 px at patch 16), bias -0.5 per unit of offset along x.
    dx = torch.arange(-13, 14, dtype=torch.float32).abs().repeat(27)  # row-major (dy, dx)
    table = torch.cat([(-0.5 * dx)[:, None].repeat(1, 2), torch.tensor([[7.0, 8]] * 3)])
    out = resize_rel_pos_bias_table(table, (14, 14), (8, 8))
    ref = timm_resize(table, new_window_size=(8, 8), new_bias_shape=(15 * 15 + 3, 2))
    torch.testing.assert_close(out, ref)
    core = out[:-3].reshape(15, 15, 2)
    # Offsets 0 and 1 keep their values exactly (a bicubic stretch gives -0.88 at offset 1).
    torch.testing.assert_close(core[7, 7], torch.zeros(2))
    torch.testing.assert_close(core[7, 8], torch.full((2,), -0.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[-3:], table[-3:])
    assert bool((core[7, 8:, 0].diff() < 0).all())  # still falling with the offset


def test_other_vocab_and_abs_pos_emb() -> None:
    src = _source_mim(use_abs_pos_emb=True)
    dst = BeitMIM.from_config(CFG.replace(use_abs_pos_emb=True, img_size=48), vocab_size=10)
    report = load_backbone_weights(dst, _unilm_state(src))
    assert any(r.startswith("pos_embed: (1, 17, 64) -> (1, 37, 64)") for r in report.reshaped)
    assert "lm_head.weight: checkpoint (24, 64) vs model (10, 64)" in report.mismatched
    assert any("new head lm_head" in n for n in report.notes)
    assert "lm_head.weight" not in report.loaded and "mask_token" in report.loaded


def test_strict_report_raises_on_incomplete_backbone(tmp_path: Path) -> None:
    src = _source_mim()
    deeper = BeitMIM.from_config(CFG.replace(depth=3), vocab_size=VOCAB)
    with pytest.raises(WeightsError, match=r"backbone keys missing.*blocks\.2\."):
        load_backbone_weights(deeper, _unilm_state(src))
    before = deeper.backbone.blocks[2].attn.qkv.weight.clone()
    report = load_backbone_weights(deeper, _unilm_state(src), strict_report=False)
    assert any(k.startswith("blocks.2.") for k in report.missing)
    torch.testing.assert_close(deeper.backbone.blocks[2].attn.qkv.weight, before)
    torch.testing.assert_close(
        deeper.backbone.blocks[0].attn.qkv.weight, src.backbone.blocks[0].attn.qkv.weight
    )
    shallow = BeitMIM.from_config(CFG.replace(depth=1), vocab_size=VOCAB)
    with pytest.raises(WeightsError, match="blocks the model does not have"):
        load_backbone_weights(shallow, _unilm_state(src))
    # Per-block tables that differ cannot become one shared table: say what to change.
    per_block = BeitClassifier.from_config(CFG.replace(use_shared_rel_pos_bias=False), 3)
    randomize(per_block, 4)
    with pytest.raises(WeightsError, match="use_shared_rel_pos_bias=False"):
        load_backbone_weights(src, per_block.state_dict())


def test_own_checkpoint_and_pickle_policy(tmp_path: Path) -> None:
    src = _source_mim()
    # beitdomain training checkpoint: {'model': BeitMIM.state_dict(), ...}
    path = tmp_path / "step-00000010.pt"
    torch.save({"model": src.state_dict(), "step": 10, "optimizer": {"lr": 1.0}}, path)
    dst = BeitMIM.from_config(CFG, vocab_size=VOCAB).eval()
    report = load_backbone_weights(dst, path)
    assert report.format == "beitdomain" and report.missing == [] and report.unexpected == []
    x, mask = _images(), _mask()
    torch.testing.assert_close(dst(x, mask), src(x, mask))
    # A file that needs full pickle: refused with a pointer to --trust-pickle.
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": src.state_dict(), "where": pathlib.PurePosixPath("/data")}, unsafe)
    with pytest.raises(WeightsError, match="--trust-pickle"):
        load_backbone_weights(dst, unsafe)
    assert load_backbone_weights(dst, unsafe, trust_pickle=True).missing == []
    with pytest.raises(WeightsError, match="does not exist"):
        load_backbone_weights(dst, tmp_path / "nope.pth")
    with pytest.raises(WeightsError, match="without model.safetensors"):
        load_backbone_weights(dst, tmp_path)


@pytest.mark.parametrize("in_chans", [3, 1])
def test_export_loads_into_timm_create_model(
    tmp_path: Path, in_chans: int, caplog: pytest.LogCaptureFixture
) -> None:
    src = _source_mim(in_chans=in_chans)
    export = export_timm_backbone(src, tmp_path / "backbone.safetensors")
    written = load_file(str(export.path))
    assert not any(
        k.startswith(("lm_head", "mask_token", "rel_pos_bias", "norm.")) for k in written
    )
    assert "blocks.1.attn.relative_position_bias_table" in written
    # The plain call from the docs: local file, new head, no network.
    with caplog.at_level(logging.INFO, logger="timm"):
        model = timm.create_model(
            "beit_base_patch16_224",
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(export.path)),
            num_classes=6,
            **export.model_kwargs,
        )
    state = model.state_dict()
    assert set(state) - set(written) == {"head.weight", "head.bias"}
    assert set(written) <= set(state)
    for k, v in written.items():
        torch.testing.assert_close(state[k], v, msg=k)
    assert "Missing keys (head.weight, head.bias)" in caplog.text
    # Same block outputs as the MIM backbone it came from.
    x = _images(c=in_chans)
    torch.testing.assert_close(_block_output(model.eval(), x), _block_output(src.backbone, x))
    # Our own loader reads the export back into a classifier with nothing missing but the head.
    clf = BeitClassifier.from_config(
        CFG.replace(in_chans=in_chans, use_shared_rel_pos_bias=False), 6
    )
    report = load_backbone_weights(clf, export.path)
    assert report.missing == ["head.weight", "head.bias"] and report.unexpected == []


def test_export_gray_into_rgb_timm_model(tmp_path: Path) -> None:
    src = _source_mim(in_chans=1)
    export = export_timm_backbone(src, tmp_path / "gray.safetensors")
    # input_size in the overlay tells timm the file has 1 channel, so it adapts 1 -> 3.
    model = export.create_model(num_classes=2, in_chans=3)
    w = model.patch_embed.proj.weight
    assert w.shape[1] == 3
    torch.testing.assert_close(w.sum(1, keepdim=True), src.backbone.patch_embed.proj.weight)
    # The unrelated head-free layout also loads into a plain Beit of ours.
    bb = create_backbone(CFG.replace(in_chans=1, use_shared_rel_pos_bias=False))
    assert load_backbone_weights(bb, export.path).missing == []
