"""Adapting tensors to the target: channels, patch size, relative position tables, target state."""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.layers import resize_rel_pos_bias_table as timm_resize_rel_pos_bias_table
from timm.models import adapt_input_conv
from timm.models.beit import Beit
from torch import nn

from beitdomain.models.convention import (
    InputConvention,
)
from beitdomain.models.convert.report import RPB, LoadReport, WeightsError


def _target_state(model: nn.Module) -> tuple[Beit, dict[str, str], dict[str, torch.Tensor]]:
    """Canonical name -> model name, and canonical name -> current tensor."""
    if isinstance(model, Beit):
        backbone, prefix = model, ""
    elif isinstance(getattr(model, "backbone", None), Beit):
        backbone, prefix = model.backbone, "backbone."
    else:
        raise TypeError(
            f"cannot load BEiT weights into {type(model).__name__}: expected a timm Beit, "
            "BeitMIM or BeitClassifier"
        )
    names: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for full, tensor in model.state_dict().items():
        canon = full[len(prefix) :] if prefix and full.startswith(prefix) else full
        names[canon] = full
        tensors[canon] = tensor
    return backbone, names, tensors


def _grid_of_table(rows: int) -> tuple[int, int] | None:
    side = round((rows - 3) ** 0.5)
    if side * side == rows - 3 and side % 2 == 1:
        return (side + 1) // 2, (side + 1) // 2
    return None


def resize_rel_pos_bias_table(
    table: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]
) -> torch.Tensor:
    """Resizes a BEiT relative position bias table to another patch grid.

    Geometric interpolation as in unilm's fine-tuning (through timm's
    `resize_rel_pos_bias_table`): source offsets are placed on a geometric progression so that
    small offsets, where the bias varies most, keep their values (a plain bicubic stretch of a
    14x14 table to 8x8 moves offset 1's bias by half the distance to offset 2's).

    Args:
        table: `[(2h-1)*(2w-1) + 3, heads]`; rows are row-major over (dy, dx) offsets, the last 3
            are cls->token, token->cls and cls->cls.
        src_grid: the table's patch grid `(h, w)`.
        dst_grid: the new patch grid.

    Returns:
        `[(2h'-1)*(2w'-1) + 3, heads]`, cls entries kept.
    """
    sh, sw = 2 * src_grid[0] - 1, 2 * src_grid[1] - 1
    dh, dw = 2 * dst_grid[0] - 1, 2 * dst_grid[1] - 1
    heads = table.shape[1]
    if table.shape[0] != sh * sw + 3:
        raise ValueError(
            f"table with {table.shape[0]} rows does not belong to a {src_grid} grid "
            f"(expected {sh * sw + 3})"
        )
    if (sh, sw) == (dh, dw):
        return table.clone()
    out = timm_resize_rel_pos_bias_table(
        table.float(),
        new_window_size=tuple(dst_grid),
        new_bias_shape=(dh * dw + 3, heads),
        old_window_size=tuple(src_grid),
    )
    return out.to(table.dtype)


def _conv_weights_for_channels(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    src: InputConvention,
    chans: int,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[float, ...], tuple[float, ...], str]:
    """Patch filters for `chans` input channels, exact on gray images; returns the new mean/std.

    C -> 1: `W' = s' * sum_c W_c / s_c`, bias absorbing `sum_c W_c m_c / s_c - W' m' / s'`
    (with equal mean/std on every channel this is the plain sum). 1 -> C: replicate and divide
    by C (timm's `adapt_input_conv`), same mean/std on every channel.
    """
    c = weight.shape[1]
    m = torch.tensor(src.mean, dtype=torch.float64)
    s = torch.tensor(src.std, dtype=torch.float64)
    if chans == 1:
        m1, s1 = float(m.mean()), float(s.mean())
        w = weight.double()
        per = w / s.view(1, -1, 1, 1)  # W_c / s_c
        new_w = s1 * per.sum(1, keepdim=True)
        new_b = None
        if bias is not None:
            offset = (per * m.view(1, -1, 1, 1)).sum((1, 2, 3)) - (new_w * m1 / s1).sum((1, 2, 3))
            new_b = (bias.double() - offset).to(bias.dtype)
        equal = bool((m == m[0]).all() and (s == s[0]).all())
        rule = "summed" if equal else "summed, 1/std-weighted"
        return new_w.to(weight.dtype), new_b, (m1,), (s1,), f"{c} -> 1 input channels ({rule})"
    if c == 1:
        new = adapt_input_conv(chans, weight, base_chans=1)
        mean, std = (float(m[0]),) * chans, (float(s[0]),) * chans
        return new, bias, mean, std, f"1 -> {chans} input channels (replicated and scaled)"
    raise WeightsError(
        f"cannot adapt a {c}-channel patch embedding to {chans} channels: only C -> 1 and 1 -> C "
        "are exact; build the model with in_chans=1 or in_chans=" + str(c)
    )


def _adapt(
    key: str,
    value: torch.Tensor,
    target: torch.Tensor,
    backbone: Beit,
    src_grid: tuple[int, int] | None,
    report: LoadReport,
) -> torch.Tensor | None:
    """`value` reshaped to `target`'s shape, or None (reported) when it cannot be."""
    old = tuple(value.shape)
    new = tuple(target.shape)
    how = None
    if key == "patch_embed.proj.weight" and value.ndim == 4:
        if value.shape[-2:] != target.shape[-2:] and value.shape[:2] == target.shape[:2]:
            value = resample_patch_embed(value, list(target.shape[-2:]), verbose=False)
            how = "patch size resampled"
    elif key.endswith(RPB) and value.ndim == 2 and value.shape[1] == target.shape[1]:
        grid = src_grid or _grid_of_table(value.shape[0])
        if grid is None:
            report.notes.append(
                f"{key}: cannot infer the source grid of a non-square table "
                f"({value.shape[0]} rows); pass source_grid"
            )
            return None
        dst = tuple(backbone.patch_embed.grid_size)
        value = resize_rel_pos_bias_table(value, grid, dst)  # type: ignore[arg-type]
        how = f"geometric {grid} -> {dst} grid (timm's resize_rel_pos_bias_table), cls kept"
    elif key == "pos_embed" and value.ndim == 3 and value.shape[2] == target.shape[2]:
        value = resample_abs_pos_embed(
            value,
            new_size=list(backbone.patch_embed.grid_size),
            old_size=list(src_grid) if src_grid else None,
            num_prefix_tokens=1,
        )
        how = "bicubic resample"
    if tuple(value.shape) != new:
        report.mismatched.append(f"{key}: checkpoint {old} vs model {new}")
        if key.startswith(("lm_head.", "head.")) and key.endswith("weight"):
            report.notes.append(
                f"new head {key.rsplit('.', 1)[0]}: checkpoint has {old[0]} outputs, model "
                f"{new[0]}; it keeps its fresh initialization"
            )
        return None
    report.reshaped.append(f"{key}: {old} -> {new}, {how}")
    return value
