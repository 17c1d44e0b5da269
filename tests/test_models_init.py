"""unilm's initialization: truncated at +-1 std, layer-scaled projections, channel-free conv."""

from __future__ import annotations

import math

import pytest
import torch

from beitdomain.models.backbone import get_preset
from beitdomain.models.init import unilm_init_
from beitdomain.models.mim import BeitMIM
from beitdomain.models.pretrained import build_pretraining_model

# Wide enough for stable statistics, still fast: 4 blocks of width 192.
CFG = get_preset("tiny", embed_dim=192, num_heads=3, depth=4, img_size=64, patch_size=16)
EFFECTIVE = 0.02 * 0.5396  # std of N(0, 0.02) truncated at +-0.02


@pytest.mark.parametrize("in_chans", [1, 3])
def test_unilm_init_statistics(in_chans: int) -> None:
    torch.manual_seed(0)
    model = unilm_init_(BeitMIM.from_config(CFG.replace(in_chans=in_chans), vocab_size=512))
    bb = model.backbone
    for w in (bb.blocks[0].attn.qkv.weight, bb.blocks[2].mlp.fc1.weight, model.lm_head.weight):
        assert float(w.abs().max()) <= 0.02 + 1e-7
        assert float(w.std()) == pytest.approx(EFFECTIVE, rel=0.05)
    for i, blk in enumerate(bb.blocks, start=1):  # divided by sqrt(2 * layer_id)
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            assert float(w.std()) == pytest.approx(EFFECTIVE / math.sqrt(2 * i), rel=0.08)
    assert float(bb.cls_token.abs().max()) <= 0.02 and float(model.mask_token.abs().max()) <= 0.02
    # The patch conv like every linear layer (unilm's _init_weights has a Conv2d branch).
    conv = bb.patch_embed.proj
    assert float(conv.weight.std()) == pytest.approx(EFFECTIVE, rel=0.05)
    assert float(conv.weight.abs().max()) <= 0.02 + 1e-7 and not conv.bias.any()
    assert float(model.lm_head.bias.abs().max()) == 0.0
    assert float(bb.blocks[0].norm1.weight.min()) == 1.0


def test_scratch_pretraining_uses_it_and_loads_keep_theirs() -> None:
    torch.manual_seed(0)
    scratch, report = build_pretraining_model(CFG, vocab_size=512)
    assert report is None
    assert float(scratch.backbone.blocks[0].attn.qkv.weight.abs().max()) <= 0.02 + 1e-7
    timm_default = BeitMIM.from_config(CFG, vocab_size=512)  # timm's: not truncated
    assert float(timm_default.backbone.blocks[0].attn.qkv.weight.abs().max()) > 0.03
    x01 = torch.rand(2, 3, 64, 64)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :6] = True
    with torch.no_grad():
        logits = scratch(x01, mask)
    # A fresh model predicts nearly uniformly: the loss starts at ln(vocab).
    loss = torch.nn.functional.cross_entropy(logits, torch.randint(0, 512, (12,)))
    assert float(loss) == pytest.approx(math.log(512), abs=0.05)
