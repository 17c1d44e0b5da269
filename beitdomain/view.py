"""The evaluation view: how one image becomes the model's square input, written down once.

Plain Python (no torch, no timm), so `data.transforms` and the exports both read it.

Fine-tuning's evaluation, `predict`, `embed` and the k-NN and probe scores see an image through
`beitdomain.data.transforms.FinetuneTransform(train=False)`: the shorter side resized (bicubic)
to `round(image_size / crop_pct)`, the longer one in proportion, then a centred
`image_size` square cut out. The exports describe the same view to the libraries that load them:
timm's `pretrained_cfg` (`timm.data.resolve_data_config` + `create_transform`) and the Hugging
Face image processor, so a non-square image is cropped, never squashed, by all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CROP_PCT = 0.875  # the evaluation crop of timm's ImageNet recipes, and FinetuneTransform's


@dataclass(frozen=True)
class EvalView:
    """Resize the shorter side to `resize_side`, then centre-crop `image_size` x `image_size`."""

    image_size: int
    crop_pct: float = CROP_PCT

    @property
    def resize_side(self) -> int:
        """The shorter side before the crop, as `FinetuneTransform` rounds it."""
        return round(self.image_size / self.crop_pct)

    def resized_shape(self, h: int, w: int) -> tuple[int, int]:
        """`(height, width)` of an `h x w` image once its shorter side is `resize_side`
        (never under `image_size`, so the crop fits)."""
        s = self.resize_side / min(h, w)
        return max(self.image_size, round(h * s)), max(self.image_size, round(w * s))

    def crop_origin(self, h: int, w: int) -> tuple[int, int]:
        """`(top, left)` of the centred `image_size` square in a resized `h x w` image."""
        return (h - self.image_size) // 2, (w - self.image_size) // 2

    def timm_cfg(self) -> dict[str, Any]:
        """The `pretrained_cfg` entries of this view.

        timm floors `image_size / crop_pct`; where that would miss `resize_side` by a pixel
        (32 px: 36 against 37) the crop_pct written is the one timm floors onto it.
        """
        crop_pct = self.crop_pct
        if math.floor(self.image_size / crop_pct) != self.resize_side:
            crop_pct = self.image_size / (self.resize_side + 0.5)
        return {"interpolation": "bicubic", "crop_pct": crop_pct, "crop_mode": "center"}

    def hf_processor_kwargs(self) -> dict[str, Any]:
        """`BeitImageProcessor` arguments for this view (rescaling and normalization apart)."""
        side = {"height": self.image_size, "width": self.image_size}
        return {
            "do_resize": True,
            "size": {"shortest_edge": self.resize_side},
            "resample": 3,  # PIL bicubic
            "do_center_crop": True,
            "crop_size": side,
        }
