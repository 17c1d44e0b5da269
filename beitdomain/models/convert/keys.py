"""Key mapping: every source (unilm, timm, Hugging Face, beitdomain) into one canonical
key space."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from beitdomain.models.convert.report import RPB, SHARED_RPB, WeightsError

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
