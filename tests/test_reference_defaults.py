"""Defaults that change training agree with the references (issue 35 item 4)."""

from __future__ import annotations

import torch

from beitdomain.config import TokenizerConfig
from beitdomain.models.backbone import get_preset
from beitdomain.models.pretrained import build_pretraining_model
from beitdomain.tokenizer.schedule import anneal_steps, gumbel_temperature


def test_the_gumbel_temperature_reaches_its_floor_early_and_holds() -> None:
    # DALL-E anneals 1 -> 1/16 over the first 5% of its updates, then holds; the decoder then
    # trains mostly on the near-hard codes that pre-training reads.
    t = TokenizerConfig()
    total = 1000
    anneal = anneal_steps(t.temperature_anneal_fraction, total)
    assert anneal == 50
    temps = [
        gumbel_temperature(s, anneal, t.temperature_start, t.temperature_end) for s in range(total)
    ]
    assert temps[0] == 1.0
    held = [s for s, v in enumerate(temps) if v == t.temperature_end]
    assert held[0] == anneal and len(held) == total - anneal


def test_a_fresh_pretraining_model_initialises_its_patch_embedding_as_unilm() -> None:
    # unilm's VisionTransformerForMaskedImageModeling: conv weights trunc_normal(std 0.02),
    # bias 0, like every linear layer; PyTorch's conv default is std 0.072 at this fan-in.
    # (truncated at +-1 std as unilm's trunc_normal_ does: effective std 0.0108; see models.init)
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(in_chans=1, patch_size=8, img_size=64)
    model, _ = build_pretraining_model(cfg, vocab_size=64)
    proj = model.backbone.patch_embed.proj
    assert abs(proj.weight.std().item() - 0.02 * 0.5396) < 0.001
    assert proj.weight.abs().max().item() <= 0.02 + 1e-7
    assert torch.count_nonzero(proj.bias) == 0
