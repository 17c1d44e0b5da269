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
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.layers import resize_rel_pos_bias_table as timm_resize_rel_pos_bias_table
from timm.models import adapt_input_conv
from timm.models.beit import Beit
from torch import nn

from beitdomain.models.backbone import backbone_config_of
from beitdomain.models.convention import NORM_KEYS as _NORM_KEYS
from beitdomain.models.convention import (
    ConventionError,
    InputConvention,
    read_convention,
)
from beitdomain.user import UserError

RPB = "relative_position_bias_table"
SHARED_RPB = f"rel_pos_bias.{RPB}"
# Target keys that are expected to be absent from a backbone checkpoint (fresh heads / norms).
_FRESH = re.compile(r"^(head\.|lm_head\.|fc_norm\.|norm\.|mask_token$)")
_BLOCK_RPB = re.compile(rf"^blocks\.(\d+)\.attn\.{RPB}$")


class WeightsError(UserError):
    """A checkpoint that cannot be read, or does not fit the model."""


@dataclass
class LoadReport:
    """What `load_backbone_weights` did, key by key (target keys in canonical, timm-style names).

    Attributes:
        source: the file, folder or "<state dict>".
        format: detected layout: "unilm", "timm", "hf" or "beitdomain".
        loaded: target keys filled from the checkpoint (as is or reshaped).
        missing: target keys the checkpoint did not provide (left as initialized).
        unexpected: checkpoint keys (their own names) that were not used.
        reshaped: "key: (old shape) -> (new shape), how" for adapted tensors.
        mismatched: "key: checkpoint (shape) vs model (shape)" for tensors that could not be
            adapted (not loaded).
        ignored: derived checkpoint entries that are recomputed, e.g. relative_position_index.
        notes: other things worth knowing (new head, shared bias copied, config differences).
        reinitialized: target keys deliberately left freshly initialized although the checkpoint
            has them (a MIM head whose codes mean nothing to the new tokenizer, a head of
            another size).
        input: the input convention set on the model (`InputConvention.to_dict()`) and
            `input["source"]`, where it came from.
    """

    source: str
    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    input: dict[str, Any] = field(default_factory=dict)
    model_depth: int | None = field(default=None, repr=False)

    @property
    def missing_backbone(self) -> list[str]:
        """Missing keys other than heads, final norms and the mask token."""
        return [k for k in self.missing if not _FRESH.match(k)]

    def problems(self) -> list[str]:
        """Reasons this load does not give a pre-trained backbone (empty when it does)."""
        out = []
        if self.missing_backbone:
            out.append(
                f"backbone keys missing from the checkpoint: {_short(self.missing_backbone)}"
            )
        bad = [m for m in self.mismatched if not _FRESH.match(m.split(":")[0])]
        if bad:
            out.append(f"backbone keys with incompatible shapes: {_short(bad)}")
        extra_blocks = [
            k
            for k in self.unexpected
            if (m := re.search(r"(?:blocks|layers?)\.(\d+)\.", k))
            and (self.model_depth is None or int(m.group(1)) >= self.model_depth)
        ]
        if extra_blocks:
            out.append(f"checkpoint blocks the model does not have: {_short(extra_blocks)}")
        return out

    def __str__(self) -> str:
        lines = [
            f"Loaded {len(self.loaded)} tensors from {self.source} ({self.format} format)",
        ]
        if self.input:
            lines.append(
                f"  input: mean {self.input['mean']}, std {self.input['std']} on [0, 1] images "
                f"({self.input.get('source', '')})"
            )
        sections = [
            ("reshaped", self.reshaped),
            ("missing (kept initialization)", self.missing),
            ("unexpected (not used)", self.unexpected),
            ("incompatible shapes (not loaded)", self.mismatched),
            ("ignored (recomputed)", self.ignored),
            ("re-initialized", self.reinitialized),
            ("notes", self.notes),
        ]
        for title, items in sections:
            if items:
                lines.append(f"  {title}: {len(items)}")
                lines.extend(f"    - {item}" for item in items)
        return "\n".join(lines)


def _short(items: list[str], n: int = 6) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ----------------------------------------------------------------------------- reading


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    try:
        # unilm checkpoints may carry their argparse.Namespace; it holds only plain values.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WeightsError(
                f"{path} cannot be read as plain tensors (weights_only=True): {reason}. "
                "Loading it needs full pickle, which can run arbitrary code; if you trust the "
                "file, pass --trust-pickle (trust_pickle=True), or convert it to safetensors."
            ) from None
        return torch.load(path, map_location="cpu", weights_only=False)


def read_checkpoint(
    path_or_state: str | Path | Mapping[str, Any], *, trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, str]:
    """Reads a checkpoint into a flat `{name: tensor}` dict.

    Args:
        path_or_state: a `.safetensors` / `.pth` / `.pt` / `.bin` file, a Hugging Face model
            folder (`model.safetensors` or `pytorch_model.bin`, plus `config.json`), or an
            in-memory state dict.
        trust_pickle: allow full pickle for files that are not plain tensors.

    Returns:
        `(state, hf_config, source)`: tensors, the HF `config.json` contents if any, and a
        description of the source for reports.

    Raises:
        WeightsError: missing file, unreadable pickle, no tensors found.
    """
    hf_config = None
    if isinstance(path_or_state, Mapping):
        raw: Any = path_or_state
        source = "<state dict>"
    else:
        path = Path(path_or_state)
        source = str(path)
        if path.is_dir():
            cfg_path = path / "config.json"
            if cfg_path.is_file():
                hf_config = json.loads(cfg_path.read_text())
            for name in ("model.safetensors", "pytorch_model.bin"):
                if (path / name).is_file():
                    path = path / name
                    break
            else:
                found = sorted(p.name for p in path.iterdir())[:10]
                raise WeightsError(
                    f"{path} is a folder without model.safetensors or pytorch_model.bin "
                    f"(found: {found}); pass the weights file itself"
                )
        elif not path.is_file():
            raise WeightsError(f"checkpoint {path} does not exist")
        if path.suffix == ".safetensors":
            try:
                raw = load_file(str(path))
            except (SafetensorError, OSError) as e:
                raise WeightsError(
                    f"{path} is not a readable safetensors file ({e}); nothing was loaded. A "
                    f"PyTorch pickle renamed .safetensors is refused: give it its real .pth "
                    f"name (loading a pickle needs --trust-pickle, for trusted files only)"
                ) from None
        else:
            raw = _torch_load(path, trust_pickle)
    state = _unwrap(raw)
    if not state:
        raise WeightsError(f"no tensors found in {source}")
    return state, hf_config, source


def _unwrap(raw: Any) -> dict[str, torch.Tensor]:
    # Training checkpoints nest the weights: {'model': ..., 'optimizer': ...} (unilm, ours),
    # {'module': ...} (DeepSpeed / BEiT v2), {'state_dict': ...} (Lightning).
    if isinstance(raw, Mapping):
        for key in ("model", "module", "state_dict"):
            inner = raw.get(key)
            if isinstance(inner, Mapping) and any(torch.is_tensor(v) for v in inner.values()):
                return _unwrap(inner)
        return {str(k): v for k, v in raw.items() if torch.is_tensor(v)}
    raise WeightsError(f"checkpoint holds a {type(raw).__name__}, not a state dict")


# ----------------------------------------------------------------------------- key mapping

# Per-layer suffixes of Hugging Face BEiT: the classic layout that `save_pretrained` writes and the
# hub holds (`attention.attention.query`) and transformers 5's in-memory layout (`q_proj`).
_HF_LAYER = [
    (r"attention\.attention\.query\.weight|attention\.q_proj\.weight", "attn.q.weight"),
    (r"attention\.attention\.key\.weight|attention\.k_proj\.weight", "attn.k.weight"),
    (r"attention\.attention\.value\.weight|attention\.v_proj\.weight", "attn.v.weight"),
    (r"attention\.attention\.query\.bias|attention\.q_proj\.bias", "attn.q_bias"),
    (r"attention\.attention\.value\.bias|attention\.v_proj\.bias", "attn.v_bias"),
    (
        r"attention\.attention\.relative_position_bias\.relative_position_bias_table"
        r"|relative_position_bias\.relative_position_bias_table",
        f"attn.{RPB}",
    ),
    (r"attention\.output\.dense\.(weight|bias)|attention\.o_proj\.(weight|bias)", "attn.proj."),
    (r"intermediate\.dense\.(weight|bias)|mlp\.fc1\.(weight|bias)", "mlp.fc1."),
    (r"output\.dense\.(weight|bias)|mlp\.fc2\.(weight|bias)", "mlp.fc2."),
    (r"layernorm_before\.(weight|bias)", "norm1."),
    (r"layernorm_after\.(weight|bias)", "norm2."),
    (r"lambda_1", "gamma_1"),
    (r"lambda_2", "gamma_2"),
]
_HF_TOP = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.mask_token", "mask_token"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", "patch_embed.proj."),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (
        r"encoder\.relative_position_bias\.relative_position_bias_table"
        r"|shared_position_bias\.relative_position_bias_table",
        SHARED_RPB,
    ),
    (r"layernorm\.(weight|bias)", "norm."),
    (r"pooler\.layernorm\.(weight|bias)", "fc_norm."),
    (r"lm_head\.(weight|bias)", "lm_head."),
    (r"classifier\.(weight|bias)", "head."),
]
_HF_LAYER_RE = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")


def _hf_name(key: str) -> str | None:
    key = key.removeprefix("beit.")
    m = _HF_LAYER_RE.match(key)
    table = _HF_LAYER if m else _HF_TOP
    rest = m.group(2) if m else key
    for pattern, target in table:
        hit = re.fullmatch(pattern, rest)
        if hit:
            suffix = next((g for g in hit.groups() if g), "") if target.endswith(".") else ""
            name = target + suffix
            return f"blocks.{m.group(1)}.{name}" if m else name
    return None


def _is_hf(keys: list[str]) -> bool:
    return any(
        k.startswith("beit.") or _HF_LAYER_RE.match(k) or k.startswith("embeddings.") for k in keys
    )


def to_canonical(
    state: Mapping[str, torch.Tensor], source: str = "the checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, str], str, list[str], list[str]]:
    """Rewrites a checkpoint's keys into timm `Beit` names (+ `mask_token`, `lm_head`, `head`).

    Returns:
        `(tensors, origin, format, ignored, unmapped)`: canonical tensors, canonical name ->
        original name, the detected format, derived entries skipped, and keys with no mapping.

    Raises:
        WeightsError: two of `source`'s tensors map to one name (one would be dropped): a
            Hugging Face `BeitForMaskedImageModeling` saved with `use_mean_pooling: false`
            normalizes its tokens twice (`beit.layernorm`, then `layernorm`), which a timm
            `Beit` with one final norm cannot compute.
    """
    keys = list(state)
    stripped: dict[str, str] = {}
    for k in keys:
        name = k
        # DDP / torch.compile wrappers, and the objective our pre-training checkpoints hold
        for prefix in ("module.", "_orig_mod.", "mim."):
            name = name.removeprefix(prefix)
        stripped[k] = name
    fmt = "timm"
    if _is_hf(list(stripped.values())):
        fmt = "hf"
    elif any(n.startswith("backbone.") for n in stripped.values()):
        fmt = "beitdomain"
    elif any(
        "relative_position_index" in n or n.startswith(("lm_head.", "rel_pos_bias."))
        for n in stripped.values()
    ):
        fmt = "unilm"

    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    ignored: list[str] = []
    unmapped: list[str] = []
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, name in stripped.items():
        if "relative_position_index" in name:
            ignored.append(k)
            continue
        if fmt == "hf":
            canon = _hf_name(name)
            if canon is None:
                unmapped.append(k)
                continue
        else:
            canon = name.removeprefix("backbone.") if fmt == "beitdomain" else name
        m = re.fullmatch(r"(blocks\.\d+\.attn)\.([qkv])\.weight", canon)
        if m:  # HF keeps q, k, v apart; timm fuses them into one qkv matrix
            qkv.setdefault(m.group(1), {})[m.group(2)] = state[k]
            origin.setdefault(f"{m.group(1)}.qkv.weight", k)
            continue
        if canon in out:
            raise WeightsError(_collision(source, origin[canon], k, canon))
        out[canon] = state[k]
        origin[canon] = k
    for prefix, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unmapped.extend(f"{prefix}.{p}.weight" for p in parts)
            continue
        out[f"{prefix}.qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out, origin, fmt, ignored, unmapped


def _collision(source: str, first: str, second: str, canon: str) -> str:
    if canon.startswith("norm.") and {first, second} == {f"beit.layer{canon}", f"layer{canon}"}:
        return (
            f"{source}: a Hugging Face BeitForMaskedImageModeling saved with use_mean_pooling: "
            "false normalizes its tokens twice (beit.layernorm, then layernorm), which a BEiT "
            "with one final norm cannot reproduce, so it is refused rather than loaded with one "
            "of the two dropped"
        )
    return f"{source}: tensors {first} and {second} both map to {canon}; one of them would be lost"


# ----------------------------------------------------------------------------- adapting


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


# ----------------------------------------------------------------------------- export


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
