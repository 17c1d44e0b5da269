"""Frozen features: load a trained backbone and embed images with it.

`load_backbone(run)` gives a timm `Beit` (no head) with what it needs to see an image as during
training: the recipe's intensity normalization and the evaluation resize + center crop.
`random_like` gives a random backbone of the same shape, the reference its scores are read
against; the scores themselves (`beitdomain eval knn|probe`, the k-NN check during
pre-training) are `represent_eval`'s.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from beitdomain.config import Recipe, load_recipe
from beitdomain.data.transforms import FinetuneTransform
from beitdomain.engine.build import build_classifier, is_pretrained, load_init, resolve_init
from beitdomain.engine.job import BACKBONE_FILE, BEST_FILE, RESULTS_FILE
from beitdomain.engine.train import distributed as D
from beitdomain.io import IntensitySpec, load_image, normalize
from beitdomain.models.backbone import backbone_config_of, create_backbone
from beitdomain.models.convention import InputNorm, convention_of, read_convention, read_metadata
from beitdomain.models.export import TIMM_META, TimmExport
from beitdomain.models.probe import eval_outputs, pooled_features
from beitdomain.user import UserError
from beitdomain.view import CROP_PCT, EvalView


@dataclass
class FrozenBackbone:
    """A trained backbone in eval mode, with the preprocessing it was trained with.

    Attributes:
        model: a timm `Beit` (`num_classes=0`); `model(x)` gives pooled features `[B, D]`.
        spec: how a file's raw values become [0, 1] (window, percentiles, channels, frames).
        image_size: the side the model takes (resize the shorter side to
            `image_size / crop_pct`, then center-crop).
        source: the weights file it was loaded from.
        recipe: the run's resolved recipe, when the run folder has one.
    """

    model: nn.Module
    spec: IntensitySpec
    image_size: int
    source: str
    recipe: Recipe | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    crop_pct: float = CROP_PCT  # the evaluation view of fine-tuning and the exports
    # The weights' input convention: [0, 1] images become (x - mean) / std before the model
    # (official BEiT weights: 0.5 / 0.5; beitdomain's own from scratch: 0 / 1; None: 0 / 1).
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # `InputNorm`, the step beitdomain models start with, set from mean / std (a timm `Beit`
    # has none).
    input_norm: InputNorm = field(init=False, repr=False)

    @classmethod
    def of_model(
        cls,
        owner: nn.Module,
        spec: IntensitySpec,
        image_size: int,
        source: str,
        recipe: Recipe | None = None,
        device: torch.device | None = None,
    ) -> FrozenBackbone:
        """The backbone of a `BeitClassifier` / `BeitMIM` (or a bare timm `Beit`) in eval mode,
        seeing images with the convention the model's `InputNorm` holds."""
        device = device or torch.device("cpu")
        conv = convention_of(owner)
        bb = getattr(owner, "backbone", owner)
        return cls(
            bb.to(device).eval(),
            spec,
            image_size,
            source,
            recipe,
            device,
            mean=conv.mean,
            std=conv.std,
        )

    def __post_init__(self) -> None:
        norm = InputNorm(self.in_chans)
        norm.set(
            self.mean if self.mean is not None else 0.0, self.std if self.std is not None else 1.0
        )
        self.input_norm = norm.to(self.device)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features `[B, D]` of a batch of [0, 1] images, the convention applied."""
        return pooled_features(self.model, self.input_norm(images.to(self.device)))

    @property
    def in_chans(self) -> int:
        return int(self.model.patch_embed.proj.in_channels)

    @property
    def data_config(self) -> dict[str, Any]:
        """timm-style preprocessing description (`timm.data.resolve_data_config` keys).

        Inputs are intensities in [0, 1] as produced by `spec`, then `(x - mean) / std` with the
        weights' own convention (`features` applies it).
        """
        c = self.in_chans
        return {
            "input_size": (c, self.image_size, self.image_size),
            **EvalView(self.image_size, self.crop_pct).timm_cfg(),
            "mean": tuple(self.mean) if self.mean is not None else (0.0,) * c,
            "std": tuple(self.std) if self.std is not None else (1.0,) * c,
            "intensity": self.spec.to_dict(),
        }

    def _view(self) -> FinetuneTransform:
        return FinetuneTransform(train=False, image_size=self.image_size, crop_pct=self.crop_pct)

    def _as_image(self, item: Any) -> np.ndarray:
        """A path or an array -> one `[C, H, W]` float32 image in [0, 1]."""
        if isinstance(item, (str, Path)):
            image, _ = load_image(item, replace(self.spec, frames="middle"))
            return image
        x = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
        if x.ndim == 2:
            x = x[None]
        elif x.ndim == 3 and x.shape[0] not in (1, 3) and x.shape[-1] in (1, 3, 4):
            x = np.moveaxis(x, -1, 0)  # [H, W, C] -> [C, H, W]
        if x.ndim != 3:
            raise UserError(
                f"an array to embed must be [H, W], [C, H, W] or [H, W, C]; got shape {x.shape}"
            )
        if x.dtype.kind == "f" and np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0:
            scaled = x.astype(np.float32)
            if scaled.shape[0] != self.in_chans:  # the channel policy of the spec
                scaled, _ = normalize(scaled[None], {"format": "array"}, self._dtype_spec())
                scaled = scaled[0]
            return scaled
        meta = {"format": "array", "dtype": str(x.dtype)}
        image, _ = normalize(x[None], meta, replace(self.spec, frames="all"), "<array>")
        return image[0]

    def _dtype_spec(self) -> IntensitySpec:
        return replace(self.spec, normalize="dtype", window=None, frames="all")

    def preprocess(self, items: Any) -> torch.Tensor:
        """Paths or arrays -> the model's input batch `[N, C, S, S]` (one row per item)."""
        view = self._view()
        if isinstance(items, (str, Path, np.ndarray, torch.Tensor)):
            items = [items]
        return torch.stack([torch.from_numpy(view(self._as_image(it))) for it in items])

    @torch.no_grad()
    def embed(self, items: Any, batch_size: int = 32) -> np.ndarray:
        """Pooled features `[N, D]` for image paths and/or arrays, one row per item.

        Files are read with the run's reader settings (a multi-frame file contributes its
        middle frame). Arrays are `[H, W]`, `[C, H, W]` or `[H, W, C]`: float arrays already in
        [0, 1] are used as they are; anything else is scaled to [0, 1] by the run's
        normalization (`spec`, percentiles unless it names a window).
        """
        if isinstance(items, (str, Path, np.ndarray, torch.Tensor)):
            items = [items]
        items = list(items)
        out = []
        for i in range(0, len(items), batch_size):
            x = self.preprocess(items[i : i + batch_size])
            out.append(self.features(x).float().cpu().numpy())
        width = int(getattr(self.model, "num_features", 0))
        return np.concatenate(out) if out else np.zeros((0, width), dtype=np.float32)

    @torch.no_grad()
    def embed_dataset(self, dataset: Any, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels of a labelled `ImageDataset`, with its transform swapped for
        this backbone's evaluation view (no augmentation): `(X [N, D], y [N])`."""
        plain = copy.copy(dataset)
        plain.transform = self._view()
        x, y, _ = eval_outputs(self.features, self.model, plain, self.device, batch_size, None)
        return x.numpy(), y


def _timm_meta(path: Path) -> dict[str, Any] | None:
    """The timm architecture an export records in its safetensors metadata, if any."""
    raw = read_metadata(path).get("safetensors", {}).get(TIMM_META)
    return json.loads(raw) if raw else None


def _recipe_of(folder: Path) -> Recipe | None:
    return load_recipe(folder / "recipe.yaml") if (folder / "recipe.yaml").is_file() else None


def load_backbone(run: str | Path, device: str = "cpu", frames: str = "middle") -> FrozenBackbone:
    """A trained backbone from a pre-training run, a fine-tuning run or an exported file.

    Args:
        run: a `beitdomain pretrain` run folder (its `backbone.safetensors`), a `finetune`
            run folder (its `best.safetensors`, head dropped), or a `backbone.safetensors`
            written by `beitdomain pretrain export`.
        device: where the model runs (`cpu`, `cuda`, `auto`).
        frames: which frame of multi-frame files `embed` uses when given paths.

    Raises:
        UserError: the path holds none of these, naming what was looked for.
    """

    # Which file a run folder or path stands for is the one init resolver's (`resolve_init`);
    # the architecture is the export's timm metadata, else the run's recipe.
    dev = D.resolve_device(device)
    resolved = resolve_init(str(run)) if Path(run).exists() else None
    weights = Path(resolved) if is_pretrained(resolved) else None
    if weights is None or weights.suffix != ".safetensors" or not weights.is_file():
        raise UserError(
            f"{run}: not a pre-training run (no {BACKBONE_FILE}), a finished fine-tuning run "
            f"(no {BEST_FILE} + {RESULTS_FILE}) or an exported .safetensors backbone"
        )
    recipe = _recipe_of(weights.parent)
    meta = _timm_meta(weights)
    if meta is None and recipe is not None and weights.name == BEST_FILE:
        return _from_finetune_run(weights, recipe, dev, frames)
    if meta is None:
        raise UserError(
            f"{weights} carries no '{TIMM_META}' metadata: export it with "
            f"`beitdomain pretrain export RUN` (timm layout) first"
        )
    name = meta.pop("model")
    model = TimmExport(weights, name, meta).create_model(num_classes=0)
    spec = IntensitySpec.from_config(recipe.data) if recipe else IntensitySpec()
    spec = replace(spec, in_chans=int(meta["in_chans"]), frames=frames)
    # An export written before the convention was recorded fed [0, 1] images as they are.
    conv, _ = read_convention(
        weights, fmt="beitdomain", in_chans=int(meta["in_chans"]), input_size=int(meta["img_size"])
    )
    return FrozenBackbone(
        model.to(dev).eval(),
        spec,
        int(meta["img_size"]),
        str(weights),
        recipe,
        dev,
        mean=conv.mean,
        std=conv.std,
    )


def _from_finetune_run(
    weights: Path, recipe: Recipe, dev: torch.device, frames: str
) -> FrozenBackbone:
    """The backbone of a fine-tune's best weights, in the classifier its recipe builds."""
    classes = json.loads((weights.parent / RESULTS_FILE).read_text())["classes"]
    model = build_classifier(
        replace(recipe, finetune=replace(recipe.finetune, init=None)), len(classes)
    )
    # The run's own weights record the convention it ran with: the recipe's model.input_mean
    # described its init's, and must not override it.
    own = replace(recipe, model=replace(recipe.model, input_mean=None, input_std=None))
    load_init(model, str(weights), own)
    spec = replace(IntensitySpec.from_config(recipe.data), frames=frames)
    return FrozenBackbone.of_model(model, spec, recipe.data.image_size, str(weights), recipe, dev)


def random_like(backbone: FrozenBackbone, seed: int = 0) -> FrozenBackbone:
    """A backbone of the same architecture with fresh random weights (timm's init): the
    reference a trained one's k-NN / probe score is read against."""

    torch.manual_seed(seed)
    pooled = getattr(backbone.model, "global_pool", "") == "avg"
    model = create_backbone(
        backbone_config_of(backbone.model), final_norm="pooled" if pooled else "tokens"
    )
    return replace(backbone, model=model.to(backbone.device).eval(), source=f"random (seed {seed})")
