"""Load BEiT weights from local files (unilm, timm, Hugging Face, beitdomain) into a model.

Every source is first rewritten into one *canonical* key space, timm's `Beit` keys plus unilm's
pre-training extras `mask_token` and `lm_head.*` (and `head.*` for a classifier), then adapted to
the target model:

* patch embedding: other channel count (RGB -> 1 sums the three filters, 1 -> C replicates and
  divides by C; both via timm's `adapt_input_conv`) and other patch size (timm's
  `resample_patch_embed`);
* relative position bias tables for another patch grid: unilm's geometric interpolation through
  timm's `resize_rel_pos_bias_table` (dense near offset 0, sparse far away), the 3 cls entries
  kept; a shared table is copied into every block when the target has one table per block, and
  per-block tables become one shared table only when they are all equal (exact); absolute
  position embeddings resampled with timm's `resample_abs_pos_embed`;
* the input convention (mean / std of [0, 1] images, see `models.convention`) comes from the
  checkpoint when it records one (beitdomain files and exports, HF `preprocessor_config.json`,
  timm hub `config.json`) and is otherwise the official BEiT (x - 0.5) / 0.5; it is set on the
  target's `input_norm`, so official weights see the inputs they were trained on;
* heads of another size (vocabulary or classes) are left freshly initialized and reported, and
  a MIM head can be re-initialized on purpose (`reuse_lm_head=False`) when its code ids mean
  nothing to the new tokenizer.

Nothing is silently dropped: the returned `LoadReport` lists what was loaded, reshaped, missing
and unused. Files are read with `safetensors` or `torch.load(weights_only=True)` only, unless the
caller opts into full pickle with `trust_pickle=True` (the CLI's `--trust-pickle`).

Why summing (not averaging) for RGB -> 1 channel: on a gray image copied into R, G and B, each
normalized with the same mean/std (BEiT uses 0.5/0.5 for every channel), the RGB filter responds
with `sum_c w_c * x`, which is exactly the summed filter applied to the single channel. Averaging
would shrink every patch embedding by 3x, far from the scale the following blocks were trained on.
With different per-channel mean/std (ImageNet's) the filters are summed with weights `s / s_c`
and the bias absorbs the offsets, so the 1-channel model stays exact on gray images.

The parts, in the order a load runs them: `read` (files and folders to a state dict), `keys`
(any layout to the canonical keys), `adapt` (tensors to the target's shapes), `load`
(`load_backbone_weights`, and the state the exports write); `report` holds the error type and
the `LoadReport` they share.
"""

from __future__ import annotations

from beitdomain.models.convert.adapt import resize_rel_pos_bias_table
from beitdomain.models.convert.keys import to_canonical
from beitdomain.models.convert.load import load_backbone_weights, pooled_backbone_state
from beitdomain.models.convert.read import read_checkpoint
from beitdomain.models.convert.report import RPB, SHARED_RPB, LoadReport, WeightsError

__all__ = [
    "RPB",
    "SHARED_RPB",
    "LoadReport",
    "WeightsError",
    "load_backbone_weights",
    "pooled_backbone_state",
    "read_checkpoint",
    "resize_rel_pos_bias_table",
    "to_canonical",
]
