"""Segmentation models (issue 38 item c): BEiT blocks into a decoder at the input's resolution,
the classifier's init kinds, layer decay, and MONAI's U-Net baseline."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize, timm_beit

from beitdomain.models.backbone import get_preset
from beitdomain.models.classifier import layer_decay_param_groups
from beitdomain.models.convert import load_backbone_weights
from beitdomain.models.segment import BeitSegmenter, default_blocks, monai_unet

# The 'tiny' preset at 32 px: 8 px patches, a 4 x 4 grid, 2 blocks of width 64, 1 channel.
# Tiny models on a shared 2-core machine: one torch thread (conftest), no spin-waiting.
pytestmark = pytest.mark.usefixtures("one_thread")

CFG = get_preset("tiny", img_size=32, in_chans=1, use_shared_rel_pos_bias=False)


@pytest.mark.parametrize("decoder", ["progressive", "linear"])
def test_logits_at_the_input_resolution_from_the_chosen_blocks(decoder):
    torch.manual_seed(0)
    model = BeitSegmenter.from_config(CFG, 3, decoder=decoder, channels=16)
    assert model.blocks == [0, 1]
    x = torch.rand(2, 1, 32, 32)
    out = model(x)
    assert out.shape == (2, 3, 32, 32)
    out.square().mean().backward()
    # every chosen block gets a gradient, the first block through its own features too
    for i in model.blocks:
        assert model.backbone.blocks[i].attn.qkv.weight.grad.abs().sum() > 0


def test_default_blocks_are_evenly_spaced_ending_at_the_last():
    assert default_blocks(12) == [2, 5, 8, 11]
    assert default_blocks(24) == [5, 11, 17, 23]
    assert default_blocks(2) == [0, 1]
    with pytest.raises(ValueError, match=r"blocks \[5\]"):
        BeitSegmenter.from_config(CFG, 2, blocks=[5])


def test_official_weights_load_into_the_backbone_and_layer_decay_covers_the_decoder():
    official = timm_beit(CFG, seed=1)  # timm's layout, as an official checkpoint holds it
    model = BeitSegmenter.from_config(CFG, 2)
    report = load_backbone_weights(model, official.state_dict())
    assert not report.problems()
    for name, tensor in official.state_dict().items():
        if not name.startswith(("fc_norm", "norm", "head")):
            assert torch.equal(model.backbone.state_dict()[name], tensor), name
    # official weights see (x - 0.5) / 0.5, carried by the model
    assert torch.allclose(model.input_norm.mean, torch.full_like(model.input_norm.mean, 0.5))
    groups = layer_decay_param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    top = {n for g in groups if g["layer_id"] == CFG.depth + 1 for n in g["param_names"]}
    assert {n for n, _ in model.named_parameters() if not n.startswith("backbone.")} <= top
    assert any(g["lr_scale"] == 0.5**3 for g in groups)  # the patch embedding, layer 0


def test_a_segmenter_reloads_from_its_own_state():
    a = BeitSegmenter.from_config(CFG, 2)
    randomize(a, 2)
    b = BeitSegmenter.from_config(CFG, 2)
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_monai_unet_baseline():
    pytest.importorskip("monai")
    net = monai_unet(1, 3, channels=(8, 16, 32), num_res_units=1)
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 3, 32, 32)
