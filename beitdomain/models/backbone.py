"""BEiT backbone configuration and construction on timm's `Beit` (attention is timm's, fused SDPA).

`create_backbone(cfg)` always returns a `timm.models.beit.Beit` with `num_classes=0`, so the same
module (and the same state-dict keys as timm and unilm) serves pre-training, fine-tuning and
export. Its final norm sits either on every token (`final_norm="tokens"`, what masked image
modeling needs, key `norm.*`) or after mean pooling (`final_norm="pooled"`, timm's default for
BEiT classifiers, key `fc_norm.*`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import timm
from timm.models.beit import Beit


@dataclass(frozen=True)
class BackboneConfig:
    """Architecture of a BEiT backbone.

    Args:
        arch: a registered timm BEiT name these dimensions match (e.g. "beit_base_patch16_224"),
            used to build through `timm.create_model` and to name the model on export; "custom"
            builds `Beit` directly.
        img_size: input side in pixels (square inputs).
        patch_size: patch side in pixels.
        in_chans: input channels (1 for most DICOM/TIFF, 3 for RGB).
        embed_dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads (embed_dim must divide evenly).
        mlp_ratio: MLP hidden width / embed_dim.
        drop_path_rate: stochastic depth at the last block (linear from 0).
        layer_scale_init: LayerScale init value (BEiT: 0.1 base, 1e-5 large); None = off.
        use_shared_rel_pos_bias: one relative position bias shared by all blocks (BEiT
            pre-training); False = one table per block (BEiT fine-tuning, timm's weights).
        use_abs_pos_emb: learned absolute position embedding (BEiT uses none).
        grad_checkpointing: recompute block activations in backward to save memory.
    """

    arch: str = "custom"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    layer_scale_init: float | None = 0.1
    use_shared_rel_pos_bias: bool = True
    use_abs_pos_emb: bool = False
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}; "
                f"use e.g. img_size={self.img_size // self.patch_size * self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        if self.in_chans < 1 or self.depth < 1:
            raise ValueError(f"in_chans and depth must be >= 1, got {self.in_chans}, {self.depth}")

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid `(gh, gw)`."""
        side = self.img_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        """Number of patch tokens (without the cls token)."""
        return self.grid[0] * self.grid[1]

    def replace(self, **changes: Any) -> BackboneConfig:
        """A copy with some fields changed (e.g. `use_shared_rel_pos_bias=False` to fine-tune)."""
        return dataclasses.replace(self, **changes)


BACKBONE_PRESETS: dict[str, BackboneConfig] = {
    # For tests and smoke runs: 64 px, 8x8 patches of 8 px, 2 blocks of width 64.
    "tiny": BackboneConfig(
        img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2, drop_path_rate=0.0
    ),
    # ViT-Ti/S/B widths with BEiT's choices (rel. pos. bias, LayerScale, no abs. pos. emb.).
    "vit-tiny": BackboneConfig(embed_dim=192, depth=12, num_heads=3),
    "vit-small": BackboneConfig(embed_dim=384, depth=12, num_heads=6),
    "vit-base": BackboneConfig(arch="beit_base_patch16_224", embed_dim=768, depth=12, num_heads=12),
}


def get_preset(name: str, **changes: Any) -> BackboneConfig:
    """Looks up a preset by name, optionally changing some fields.

    Raises:
        KeyError: for an unknown name, listing the valid ones.
    """
    try:
        cfg = BACKBONE_PRESETS[name]
    except KeyError:
        raise KeyError(
            f"unknown backbone preset {name!r}; valid presets: {sorted(BACKBONE_PRESETS)}"
        ) from None
    return cfg.replace(**changes) if changes else cfg


# The network's shape: each `BackboneConfig` field (timm's `Beit` argument of the same name) and
# its name in Hugging Face's `BeitConfig` (`models.export.hf_config_dict`).
HF_SHAPE_NAMES = {
    "img_size": "image_size",
    "patch_size": "patch_size",
    "in_chans": "num_channels",
    "embed_dim": "hidden_size",
    "depth": "num_hidden_layers",
    "num_heads": "num_attention_heads",
}


def beit_kwargs(cfg: BackboneConfig) -> dict[str, Any]:
    """The keyword arguments of `timm.models.beit.Beit` (and `timm.create_model`) for `cfg`."""
    return dict(
        **{name: getattr(cfg, name) for name in HF_SHAPE_NAMES},
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        drop_path_rate=cfg.drop_path_rate,
        init_values=cfg.layer_scale_init or None,
        use_abs_pos_emb=cfg.use_abs_pos_emb,
        use_rel_pos_bias=not cfg.use_shared_rel_pos_bias,
        use_shared_rel_pos_bias=cfg.use_shared_rel_pos_bias,
    )


def create_backbone(
    cfg: BackboneConfig, *, final_norm: Literal["pooled", "tokens"] = "pooled"
) -> Beit:
    """Builds a timm `Beit` without classification head.

    Args:
        cfg: the architecture.
        final_norm: "pooled" = mean-pool patch tokens then LayerNorm (`fc_norm`, timm's BEiT
            classifier layout); "tokens" = LayerNorm on every token (`norm`, for MIM heads).

    Returns:
        The backbone; `forward_features` gives `[B, 1 + L, D]` tokens (cls first).
    """
    if final_norm not in ("pooled", "tokens"):
        raise ValueError(f"final_norm must be 'pooled' or 'tokens', got {final_norm!r}")
    pooled = final_norm == "pooled"
    kwargs = beit_kwargs(cfg)
    kwargs.update(num_classes=0, global_pool="avg" if pooled else "", use_fc_norm=pooled)
    if cfg.arch == "custom":
        model = Beit(**kwargs)
    else:
        if not cfg.arch.startswith("beit"):
            raise ValueError(
                f"arch={cfg.arch!r} is not a timm BEiT model; use 'custom' or one of "
                f"{timm.list_models('beit*')}"
            )
        # pretrained=False: weights come only from local files via models.convert.
        model = timm.create_model(cfg.arch, pretrained=False, **kwargs)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model


def backbone_config_of(model: Beit) -> BackboneConfig:
    """Reads the architecture back from a built `Beit` (used by export and conversion)."""
    blk = model.blocks[0]
    per_block = blk.attn.relative_position_bias_table is not None
    shared = model.rel_pos_bias is not None
    if per_block and shared:
        raise ValueError("backbones with both per-block and shared rel. pos. bias are unsupported")
    ph, pw = model.patch_embed.patch_size
    ih, iw = model.patch_embed.img_size
    if ph != pw or ih != iw:
        raise ValueError(f"only square patches/images are supported, got {ph}x{pw}, {ih}x{iw}")
    return BackboneConfig(
        img_size=ih,
        patch_size=ph,
        in_chans=model.patch_embed.proj.in_channels,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim,
        drop_path_rate=0.0,
        # timm keeps the constructor's value; the trained gamma values live in the state dict.
        layer_scale_init=blk.init_values if blk.gamma_1 is not None else None,
        use_shared_rel_pos_bias=shared,
        use_abs_pos_emb=model.pos_embed is not None,
        grad_checkpointing=bool(model.grad_checkpointing),
    )
