"""Segmentation on the BEiT backbone: tokens of several blocks into a light decoder, logits at
the input's resolution; and the from-scratch MONAI U-Net a practitioner would train instead.

`BeitSegmenter` keeps the classifier's layout (`backbone` a timm `Beit`, `input_norm` its input
convention), so `models.convert.load_backbone_weights` loads every init kind into it (official
weights, a beitdomain pre-training or fine-tuning run) and `layer_decay_param_groups` gives its
blocks BEiT's layer-wise lr decay, the decoder counting as the head.

Decoders (`segment.decoder`):

* ``progressive``: each chosen block's tokens as a ``[B, D, H/p, W/p]`` map, projected to
  ``channels`` and summed, then upsampled 2x at a time (bilinear + 3x3 conv) to the input size,
  where a small conv stem of the input image itself adds the detail a 16 px patch grid cannot
  hold (SETR-PUP's upsampling with UNETR's full-resolution skip);
* ``linear``: the projected maps concatenated, one 1x1 conv to classes, bilinear upsampling
  (SETR-naive; the cheapest head).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.models.beit import Beit
from torch import nn

from beitdomain.models.backbone import BackboneConfig, create_backbone
from beitdomain.models.convention import InputNorm

__all__ = ["BeitSegmenter", "LinearDecoder", "ProgressiveDecoder", "default_blocks", "monai_unet"]


def default_blocks(depth: int, n: int = 4) -> list[int]:
    """``n`` evenly spaced block indices ending at the last (12 blocks: 2, 5, 8, 11)."""
    n = min(n, depth)
    return sorted({depth - 1 - round(i * depth / n) for i in range(n)})


def _conv_gn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.GroupNorm(math.gcd(8, cout), cout),
        nn.GELU(),
    )


class LinearDecoder(nn.Module):
    """The blocks' maps projected, concatenated, one 1x1 conv to classes, bilinear to the input."""

    def __init__(self, dim: int, n_maps: int, num_classes: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(dim, channels, 1) for _ in range(n_maps))
        self.classify = nn.Conv2d(channels * n_maps, num_classes, 1)

    def forward(self, maps: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        x = self.classify(torch.cat([p(f) for p, f in zip(self.proj, maps)], 1))
        return F.interpolate(x, size=images.shape[-2:], mode="bilinear", align_corners=False)


class ProgressiveDecoder(nn.Module):
    """The blocks' maps projected and summed, upsampled 2x at a time to the input size, fused
    with a conv stem of the (normalized) input image."""

    def __init__(
        self, dim: int, n_maps: int, num_classes: int, channels: int, patch: int, in_chans: int
    ) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(dim, channels, 1) for _ in range(n_maps))
        self.up = nn.ModuleList(_conv_gn(channels, channels) for _ in range(int(math.log2(patch))))
        skip = max(channels // 2, 1)
        self.stem = _conv_gn(in_chans, skip)
        self.fuse = _conv_gn(channels + skip, channels)
        self.classify = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        x = torch.stack([p(f) for p, f in zip(self.proj, maps)]).sum(0)
        for up in self.up:
            x = up(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        if x.shape[-2:] != size:  # a patch size that is not a power of 2
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.classify(self.fuse(torch.cat([x, self.stem(images)], 1)))


class BeitSegmenter(nn.Module):
    """Per-pixel class logits ``[B, num_classes, H, W]`` for images ``[B, C, H, W]`` in [0, 1].

    The decoder is `head` (as the classifier's linear head is), so a backbone checkpoint
    without it loads as a complete backbone.

    Args:
        backbone: timm `Beit` with `num_classes=0`.
        num_classes: classes of the masks (background included).
        blocks: 0-based indices of the blocks feeding the decoder; None: `default_blocks`.
        decoder: "progressive" or "linear" (module docstring).
        channels: decoder width.
    """

    def __init__(
        self,
        backbone: Beit,
        num_classes: int,
        *,
        blocks: Sequence[int] | None = None,
        decoder: Literal["progressive", "linear"] = "progressive",
        channels: int = 64,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(
                f"num_classes must be >= 2 (background and a class), got {num_classes}"
            )
        depth = len(backbone.blocks)
        self.blocks = list(default_blocks(depth) if blocks is None else blocks)
        if not self.blocks or any(not 0 <= b < depth for b in self.blocks):
            raise ValueError(f"blocks {self.blocks}: need indices in 0..{depth - 1}")
        self.backbone = backbone
        self.num_classes = num_classes
        in_chans = backbone.patch_embed.proj.in_channels
        self.input_norm = InputNorm(in_chans)
        dim, n = backbone.embed_dim, len(self.blocks)
        if decoder == "progressive":
            patch = backbone.patch_embed.patch_size[0]
            self.head: nn.Module = ProgressiveDecoder(
                dim, n, num_classes, channels, patch, in_chans
            )
        elif decoder == "linear":
            self.head = LinearDecoder(dim, n, num_classes, channels)
        else:
            raise ValueError(f"decoder must be 'progressive' or 'linear', got {decoder!r}")

    @classmethod
    def from_config(cls, cfg: BackboneConfig, num_classes: int, **kwargs: Any) -> BeitSegmenter:
        """Builds the backbone from `cfg` (the classifier's layout) and adds the decoder."""
        return cls(create_backbone(cfg, final_norm="pooled"), num_classes, **kwargs)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The chosen blocks' patch tokens as maps ``[B, D, H/p, W/p]``, shallow first, for
        normalized images."""
        return self.backbone.forward_intermediates(
            images, indices=self.blocks, intermediates_only=True
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(images)
        return self.head(self.features(x), x)


def monai_unet(
    in_chans: int,
    num_classes: int,
    channels: Sequence[int] = (16, 32, 64, 128),
    num_res_units: int = 2,
) -> nn.Module:
    """MONAI's 2D U-Net from random weights: the baseline without pre-training.

    Input sides must be divisible by ``2 ** (len(channels) - 1)`` (8 for the default).

    Raises:
        UserError: MONAI is not installed.
    """
    try:
        from monai.networks.nets import UNet
    except ImportError:
        from beitdomain.user import UserError

        raise UserError(
            "the U-Net baseline needs MONAI: pip install 'beitdomain[volumes]' (or monai)"
        ) from None
    return UNet(
        spatial_dims=2,
        in_channels=in_chans,
        out_channels=num_classes,
        channels=tuple(channels),
        strides=(2,) * (len(channels) - 1),
        num_res_units=num_res_units,
    )
