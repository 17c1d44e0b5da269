"""Loading: `load_backbone_weights` (read, map, adapt, report) and the backbone state the
exports write."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.models.beit import Beit
from torch import nn

from beitdomain.models.backbone import backbone_config_of
from beitdomain.models.convention import NORM_KEYS as _NORM_KEYS
from beitdomain.models.convention import (
    ConventionError,
    InputConvention,
    read_convention,
)
from beitdomain.models.convert.adapt import _adapt, _conv_weights_for_channels, _target_state
from beitdomain.models.convert.keys import to_canonical
from beitdomain.models.convert.read import read_checkpoint
from beitdomain.models.convert.report import _BLOCK_RPB, RPB, SHARED_RPB, LoadReport, WeightsError


def load_backbone_weights(
    model: nn.Module,
    path_or_state: str | Path | Mapping[str, Any],
    *,
    in_chans: int | None = None,
    strict_report: bool = True,
    trust_pickle: bool = False,
    source_grid: tuple[int, int] | None = None,
    reuse_lm_head: bool = True,
    source_mean: tuple[float, ...] | float | None = None,
    source_std: tuple[float, ...] | float | None = None,
) -> LoadReport:
    """Loads BEiT weights from a local checkpoint into a `Beit`, `BeitMIM` or `BeitClassifier`.

    Args:
        model: the target; its architecture decides shapes (weights are adapted to it).
        path_or_state: unilm `.pth`, timm `.safetensors`/`.pth`, a Hugging Face
            `BeitForMaskedImageModeling` (or `BeitModel`) folder, a timm hub folder, a
            beitdomain checkpoint or export, or an in-memory state dict.
        in_chans: channels the caller expects the model to take; checked against the model.
        strict_report: raise `WeightsError` (with the full report) when the checkpoint
            does not provide a complete backbone: missing or incompatible backbone tensors, or
            blocks the model does not have. Heads, final norms and the mask token may be
            missing either way. False = load what fits and only report.
        trust_pickle: allow full pickle for `.pth` files that are not plain tensors.
        source_grid: the checkpoint's patch grid, needed only to resize non-square relative
            position tables (taken from `config.json` for HF folders).
        reuse_lm_head: load the checkpoint's MIM head; False keeps the model's fresh head (its
            code ids belong to another tokenizer) and reports it as re-initialized.
        source_mean: the checkpoint's input mean on [0, 1] images, when the file does not say
            (unilm `.pth` files do not; BEiT v1 used 0.5, BEiT v2 ImageNet's 0.485/0.456/0.406).
            None: what the file records, else the official 0.5.
        source_std: likewise for the std (official: 0.5).

    Returns:
        The `LoadReport`; `str(report)` is a readable summary.
    """
    backbone, names, target = _target_state(model)
    model_chans = backbone.patch_embed.proj.in_channels
    if in_chans is not None and in_chans != model_chans:
        raise WeightsError(
            f"in_chans={in_chans} but the model takes {model_chans} channels; build the model "
            f"with in_chans={in_chans}"
        )
    state, hf_config, source = read_checkpoint(path_or_state, trust_pickle=trust_pickle)
    canon, origin, fmt, ignored, unmapped = to_canonical(state, source)
    report = LoadReport(source=source, format=fmt, ignored=ignored, unexpected=list(unmapped))
    report.model_depth = len(backbone.blocks)
    if hf_config is not None:
        source_grid = source_grid or _hf_grid(hf_config)
        _compare_hf_config(hf_config, backbone, report)

    size = 224
    if hf_config is not None and isinstance(hf_config.get("image_size"), int):
        size = hf_config["image_size"]
    try:
        src_conv, conv_source = read_convention(
            path_or_state, state=canon, fmt=fmt, input_size=size, mean=source_mean, std=source_std
        )
    except ConventionError as e:
        raise WeightsError(str(e)) from None
    for k in _NORM_KEYS:
        canon.pop(k, None)
    mean, std = src_conv.mean, src_conv.std
    w = canon.get("patch_embed.proj.weight")
    if w is not None and w.ndim == 4 and w.shape[1] != model_chans:
        old = tuple(w.shape)
        w, b, mean, std, how = _conv_weights_for_channels(
            w, canon.get("patch_embed.proj.bias"), src_conv, model_chans
        )
        canon["patch_embed.proj.weight"] = w
        if b is not None:
            canon["patch_embed.proj.bias"] = b
        report.reshaped.append(f"patch_embed.proj.weight: {old} -> {tuple(w.shape)}, {how}")
    _merge_equal_block_tables(canon, target, report)

    used: set[str] = set()
    new_state: dict[str, torch.Tensor] = {}
    shared_copied = False
    for key, tensor in target.items():
        if key in _NORM_KEYS:
            continue  # set below from the source's convention
        value = canon.get(key)
        src_key = key
        if value is None and _BLOCK_RPB.match(key) and SHARED_RPB in canon:
            value, src_key, shared_copied = canon[SHARED_RPB], SHARED_RPB, True
        if value is None:
            report.missing.append(key)
            continue
        used.add(src_key)
        if key.startswith("lm_head.") and not reuse_lm_head:
            report.reinitialized.append(key)
            continue
        if tuple(value.shape) != tuple(tensor.shape):
            value = _adapt(key, value, tensor, backbone, source_grid, report)
            if value is None:
                if key.startswith(("lm_head.", "head.")):
                    report.reinitialized.append(key)
                continue
        new_state[names[key]] = value.to(dtype=tensor.dtype)
        report.loaded.append(key)
    if shared_copied:
        report.notes.append("shared relative position bias copied into every block's table")
    if any(_BLOCK_RPB.match(k) for k in canon) and SHARED_RPB in report.missing:
        report.notes.append(
            "checkpoint has one relative position table per block, and they differ, but the "
            "model shares one; set model.rel_pos_bias=per_block (a backbone built with "
            "use_shared_rel_pos_bias=False; BeitMIM pre-trains with per-block tables too)"
        )
    if report.reinitialized and any(k.startswith("lm_head.") for k in report.reinitialized):
        report.notes.append(
            "MIM head re-initialized: the checkpoint's head predicts another tokenizer's codes"
        )
    report.unexpected.extend(origin.get(k, k) for k in canon if k not in used)

    problems = report.problems()
    if strict_report and problems:
        raise WeightsError(
            f"{source} does not fit the model: " + "; ".join(problems) + f"\n{report}"
        )
    result = model.load_state_dict(new_state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # names come from the model
    norm = getattr(model, "input_norm", None)
    size = backbone.patch_embed.img_size[0]
    conv = InputConvention(model_chans, size, tuple(mean), tuple(std))
    if norm is not None:
        norm.set(conv.mean, conv.std)
    elif conv != InputConvention.identity(model_chans, size):
        report.notes.append(
            f"a bare timm Beit has no input normalization: feed it (x - {list(conv.mean)}) / "
            f"{list(conv.std)} for [0, 1] images x"
        )
    report.input = {**conv.to_dict(), "source": conv_source}
    return report


def _merge_equal_block_tables(
    canon: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport
) -> None:
    """Per-block tables -> one shared table, only when every block holds the same table."""
    if SHARED_RPB not in target or SHARED_RPB in canon:
        return
    tables = sorted(
        ((int(m.group(1)), k) for k in canon if (m := _BLOCK_RPB.match(k))), key=lambda t: t[0]
    )
    if not tables:
        return
    first = canon[tables[0][1]]
    if all(torch.equal(canon[k], first) for _, k in tables):
        canon[SHARED_RPB] = first
        for _, k in tables:
            del canon[k]
        report.notes.append(
            f"the checkpoint's {len(tables)} per-block relative position tables are equal: "
            "merged exactly into the shared table"
        )


def _hf_grid(config: Mapping[str, Any]) -> tuple[int, int] | None:
    img, patch = config.get("image_size"), config.get("patch_size")
    if img is None or patch is None:
        return None
    ih, iw = (img, img) if isinstance(img, int) else img
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    return ih // ph, iw // pw


def _compare_hf_config(config: Mapping[str, Any], backbone: Beit, report: LoadReport) -> None:
    cfg = backbone_config_of(backbone)
    expected = {
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": int(cfg.embed_dim * cfg.mlp_ratio),
    }
    for field_name, value in expected.items():
        if field_name in config and config[field_name] != value:
            report.notes.append(f"config.json {field_name}={config[field_name]}, model {value}")
    eps = config.get("layer_norm_eps")
    model_eps = backbone.blocks[0].norm1.eps
    if eps is not None and abs(eps - model_eps) > 1e-12:
        report.notes.append(
            f"config.json layer_norm_eps={eps:g}, the timm model uses {model_eps:g} "
            "(negligible for trained weights)"
        )
    act = config.get("hidden_act")
    if act is not None and act != "gelu":
        report.notes.append(f"config.json hidden_act={act!r}; timm's Beit uses exact 'gelu'")


def pooled_backbone_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], Any]:
    """(CPU tensors in timm's classifier layout: per-block tables, fc_norm, no head; config)."""
    backbone, _, _ = _target_state(model)
    cfg = backbone_config_of(backbone)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "norm."))}
    shared = state.pop(SHARED_RPB, None)
    if shared is not None:
        for i in range(cfg.depth):
            state[f"blocks.{i}.attn.{RPB}"] = shared.clone()
    if "fc_norm.weight" not in state:
        state["fc_norm.weight"] = torch.ones(cfg.embed_dim)
        state["fc_norm.bias"] = torch.zeros(cfg.embed_dim)
    return state, cfg
