"""A MIM model started from official or own weights: the decisions around `load_backbone_weights`.

* where the weights are (`models.hub.locate_weights`: a path, `hf-hub:org/name`, a timm name);
* shared or per-block relative position tables (`rel_pos_bias="auto"` follows the checkpoint:
  per-block tables that differ need a per-block model; equal ones merge exactly);
* the MIM head: reused only when its code ids are the new tokenizer's (an imported DALL-E),
  otherwise re-initialized, so continued pre-training starts near ln(vocab) instead of from a
  confidently wrong head whose large gradients would reach the pre-trained blocks;
* the input convention: the checkpoint's, unless the caller states it;
* from scratch, unilm's initialization (`models.init`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import torch

from beitdomain.models.backbone import BackboneConfig
from beitdomain.models.convert import (
    SHARED_RPB,
    LoadReport,
    WeightsError,
    load_backbone_weights,
    read_checkpoint,
    to_canonical,
)
from beitdomain.models.convert.report import _BLOCK_RPB
from beitdomain.models.hub import locate_weights
from beitdomain.models.init import unilm_init_
from beitdomain.models.mim import BeitMIM, MimTarget

RelPos = Literal["auto", "shared", "per_block"]


def has_distinct_block_tables(path: str, *, trust_pickle: bool = False) -> bool:
    """True when a checkpoint has per-block relative position tables that are not all equal."""
    state, _, _ = read_checkpoint(path, trust_pickle=trust_pickle)
    canon = to_canonical(state)[0]
    if SHARED_RPB in canon:
        return False
    tables = [v for k, v in canon.items() if _BLOCK_RPB.match(k)]
    return len(tables) > 1 and not all(torch.equal(t, tables[0]) for t in tables[1:])


def build_pretraining_model(
    cfg: BackboneConfig,
    *,
    target: MimTarget = "tokens",
    vocab_size: int = 8192,
    norm_pix_loss: bool = True,
    init: str | None = None,
    trust_pickle: bool = False,
    rel_pos_bias: RelPos = "auto",
    reuse_lm_head: bool = False,
    input_mean: Sequence[float] | None = None,
    input_std: Sequence[float] | None = None,
) -> tuple[BeitMIM, LoadReport | None]:
    """The MIM model for pre-training, from scratch or from `init`; returns (model, report).

    Args:
        cfg: the backbone; `use_shared_rel_pos_bias` is replaced according to `rel_pos_bias`.
        target, vocab_size, norm_pix_loss: as `BeitMIM`.
        init: a checkpoint path, `hf-hub:org/name[@rev]` or a timm BEiT name; None = scratch.
        trust_pickle: allow full pickle for `.pth` files.
        rel_pos_bias: "shared" (BEiT pre-training), "per_block" (timm's fine-tuned weights), or
            "auto": per-block when `init` has per-block tables that differ, else shared.
        reuse_lm_head: load the checkpoint's MIM head (only right with the tokenizer it was
            trained to predict); False re-initializes it and says so in the report.
        input_mean, input_std: the input convention; None = the checkpoint's (scratch: 0 / 1).

    Raises:
        WeightsError: unreadable or unfitting weights, unknown hub names.
    """
    resolved = locate_weights(init) if init else None
    if rel_pos_bias == "auto":
        per_block = resolved is not None and has_distinct_block_tables(
            resolved.path, trust_pickle=trust_pickle
        )
    else:
        per_block = rel_pos_bias == "per_block"
    cfg = cfg.replace(use_shared_rel_pos_bias=not per_block)
    model = BeitMIM.from_config(
        cfg, target=target, vocab_size=vocab_size, norm_pix_loss=norm_pix_loss
    )
    if resolved is None:
        unilm_init_(model)  # from scratch: unilm's initialization (models.init)
        if input_mean is not None or input_std is not None:
            try:
                model.input_norm.set(
                    input_mean if input_mean is not None else 0.0,
                    input_std if input_std is not None else 1.0,
                )
            except ValueError as e:
                raise WeightsError(f"model.input_mean / model.input_std: {e}") from None
        return model, None
    mean = tuple(input_mean) if input_mean is not None else resolved.mean
    std = tuple(input_std) if input_std is not None else resolved.std
    report = load_backbone_weights(
        model,
        resolved.path,
        in_chans=cfg.in_chans,
        trust_pickle=trust_pickle,
        reuse_lm_head=reuse_lm_head,
        source_mean=mean or None,
        source_std=std or None,
    )
    if resolved.path != init:
        report.notes.append(resolved.note)
    if input_mean is None and input_std is None and resolved.mean:
        report.input["source"] = f"timm's pretrained_cfg of {resolved.name}"
    layout = "one table per block" if per_block else "one shared table"
    why = f"model.rel_pos_bias={rel_pos_bias}"
    if rel_pos_bias == "auto":
        why += " (per-block only when the checkpoint's tables differ)"
    report.notes.append(f"relative position bias: {layout}, {why}")
    return model, report


def is_imported_dalle(extra: dict[str, object]) -> bool:
    """Whether a saved tokenizer's provenance says it is OpenAI's DALL-E dVAE as imported."""
    return bool(re.fullmatch(r"OpenAI DALL-E dVAE", str(extra.get("source", ""))))
