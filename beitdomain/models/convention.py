"""The input convention a BEiT model was trained with, carried by the model itself.

beitdomain's data path hands every model images in [0, 1] (`[B, C, H, W]`, float). Official BEiT
weights (unilm, timm `beit_*`, Hugging Face `microsoft/beit-*`) were trained on
`(x - 0.5) / 0.5`. The model therefore starts with an `InputNorm` step whose `mean` and `std`
are buffers: they are saved with every checkpoint, set from the source when official weights are
loaded, and written into every export (timm `pretrained_cfg`, HF `preprocessor_config.json`), so
the features do not silently change with the data pipeline or the library that runs the model.

Why a step in the model and not weights folded into the patch embedding: folding is exact for
the forward pass, but it rescales the patch filters (x2 for std 0.5), which changes how AdamW and
weight decay treat them during continued pre-training, and an export would then advertise
mean 0 / std 1 to users who expect the official 0.5 / 0.5. With the step, the weights stay the
official ones and timm / transformers apply the same normalization with their own transforms.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from beitdomain.user import UserError

# (x - 0.5) / 0.5: unilm BEiT v1 (IMAGENET_INCEPTION_MEAN/STD), timm beit_*, HF microsoft/beit-*.
OFFICIAL_MEAN = 0.5
OFFICIAL_STD = 0.5
# safetensors metadata key of beitdomain's exports: the InputConvention as JSON.
INPUT_META = "beitdomain.input"
# A beitdomain checkpoint's own record: the `InputNorm` buffers in its state dict.
NORM_KEYS = ("input_norm.mean", "input_norm.std")


class ConventionError(UserError):
    """A checkpoint's input convention that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class InputConvention:
    """What a model expects: channels, square size, and the normalization of [0, 1] inputs.

    Attributes:
        in_chans: input channels.
        input_size: image side in pixels.
        mean: per-channel mean subtracted from [0, 1] images (length in_chans).
        std: per-channel std the result is divided by (length in_chans).
    """

    in_chans: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(
                f"mean {self.mean} and std {self.std} need one value per channel "
                f"(in_chans={self.in_chans})"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be > 0, got {self.std}")

    @classmethod
    def identity(cls, in_chans: int, input_size: int) -> InputConvention:
        """[0, 1] images as they are (beitdomain's default for models trained from scratch)."""
        return cls(in_chans, input_size, (0.0,) * in_chans, (1.0,) * in_chans)

    @classmethod
    def official(cls, in_chans: int, input_size: int) -> InputConvention:
        """The official BEiT convention, (x - 0.5) / 0.5 on every channel."""
        return cls(in_chans, input_size, (OFFICIAL_MEAN,) * in_chans, (OFFICIAL_STD,) * in_chans)

    def to_dict(self) -> dict[str, Any]:
        return {
            "in_chans": self.in_chans,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputConvention:
        return cls(int(d["in_chans"]), int(d["input_size"]), _floats(d["mean"]), _floats(d["std"]))


def _floats(values: Sequence[float] | float) -> tuple[float, ...]:
    if isinstance(values, int | float):
        return (float(values),)
    return tuple(float(v) for v in values)


def broadcast(values: Sequence[float] | float, chans: int, what: str) -> tuple[float, ...]:
    """One value per channel: a single value is repeated, otherwise the length must match."""
    vals = _floats(values)
    if len(vals) == 1:
        return vals * chans
    if len(vals) != chans:
        raise ValueError(f"{what} has {len(vals)} values, the model takes {chans} channels")
    return vals


class InputNorm(nn.Module):
    """`(x - mean) / std` per channel; `mean` and `std` are saved with the model's state dict.

    State dicts written before this step existed have no `mean` / `std`; loading one keeps the
    fresh values, mean 0 / std 1, which is exactly what those models saw.
    """

    def __init__(self, in_chans: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_chans))
        self.register_buffer("std", torch.ones(in_chans))

    @property
    def in_chans(self) -> int:
        return self.mean.numel()

    def set(self, mean: Sequence[float] | float, std: Sequence[float] | float) -> None:
        """Sets the convention (one value, or one per channel)."""
        c = self.in_chans
        m, s = broadcast(mean, c, "mean"), broadcast(std, c, "std")
        if any(v <= 0 for v in s):
            raise ValueError(f"std must be > 0, got {s}")
        with torch.no_grad():
            self.mean.copy_(torch.tensor(m))
            self.std.copy_(torch.tensor(s))

    def values(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """`(mean, std)` as tuples of floats (rounded to float32 precision for readability)."""
        return (
            tuple(round(float(v), 7) for v in self.mean),
            tuple(round(float(v), 7) for v in self.std),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W] in [0, 1]
        mean = self.mean.to(x.dtype).view(1, -1, 1, 1)
        std = self.std.to(x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
        # Older checkpoints (no normalization step) fed [0, 1] images as they are: a model built
        # fresh has exactly that (mean 0, std 1), so their absence is not an error.
        for name in ("mean", "std"):
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)


def convention_of(model: nn.Module) -> InputConvention:
    """The convention of a `BeitMIM` / `BeitClassifier` (identity for a bare timm `Beit`)."""
    backbone = getattr(model, "backbone", model)
    chans = backbone.patch_embed.proj.in_channels
    size = backbone.patch_embed.img_size[0]
    norm = getattr(model, "input_norm", None)
    if norm is None:
        return InputConvention.identity(chans, size)
    mean, std = norm.values()
    return InputConvention(chans, size, mean, std)


# ----------------------------------------------------------------------------- reading


def read_metadata(path_or_state: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Side information of a checkpoint: safetensors metadata, HF `preprocessor_config.json`,
    timm hub `config.json` (empty for in-memory state dicts and `.pth` files)."""
    if isinstance(path_or_state, Mapping):
        return {}
    path = Path(path_or_state)
    out: dict[str, Any] = {}
    folder = path if path.is_dir() else path.parent
    weights = path
    if path.is_dir():
        names = ("model.safetensors", "backbone.safetensors")
        weights = next((path / n for n in names if (path / n).is_file()), path / names[0])
        for name in ("preprocessor_config.json", "config.json"):
            f = folder / name
            if f.is_file():
                try:
                    out[name] = json.loads(f.read_text())
                except json.JSONDecodeError as e:
                    raise ConventionError(f"{f} is not valid JSON: {e}") from None
    if weights.suffix == ".safetensors" and weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            out["safetensors"] = f.metadata() or {}
    return out


def read_convention(
    source: str | Path | Mapping[str, Any],
    *,
    state: Mapping[str, torch.Tensor] | None = None,
    fmt: str = "beitdomain",
    in_chans: int | None = None,
    input_size: int = 224,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
) -> tuple[InputConvention, str]:
    """The input convention a checkpoint expects, and a few words on where it was read.

    The first that says wins: the checkpoint's own `input_norm` buffers (in `state`), the
    file's beitdomain metadata (`INPUT_META`), a Hugging Face `preprocessor_config.json`, a timm
    hub `config.json`'s `pretrained_cfg`; failing all, a `beitdomain` checkpoint was trained on
    [0, 1] as is (written before the convention was recorded) and any other `fmt` is assumed
    to be the official BEiT (x - 0.5) / 0.5. A file with beitdomain's own safetensors metadata
    (an export in timm's layout) is a beitdomain checkpoint whatever its key layout.

    Args:
        source: a checkpoint file, a folder (HF, timm hub) or an in-memory state dict.
        state: its tensors in canonical (timm-style) names, when the caller has read them.
        fmt: the checkpoint's format ("beitdomain", "timm", "hf", "unilm", ...).
        in_chans: the checkpoint's channels (default: its patch embedding's, else 3).
        input_size: the image side recorded with the convention.
        mean: the caller's mean, which overrides what the checkpoint says (e.g. for a unilm
            `.pth` file, which says nothing); `std` likewise.

    Raises:
        ConventionError: a recorded convention that is unreadable or does not fit `in_chans`.
    """
    state = state or {}
    if in_chans is None:
        w = state.get("patch_embed.proj.weight")
        in_chans = int(w.shape[1]) if w is not None and w.ndim == 4 else 3

    def conv(m: Any, s: Any, where: str) -> tuple[InputConvention, str]:
        try:
            mm = broadcast(mean if mean is not None else m, in_chans, "mean")
            ss = broadcast(std if std is not None else s, in_chans, "std")
            c = InputConvention(in_chans, input_size, mm, ss)
        except ValueError as e:
            raise ConventionError(f"input convention of {where}: {e}") from None
        if mean is not None or std is not None:
            where = "given by the caller (model.input_mean / model.input_std)"
        return c, where

    if all(k in state for k in NORM_KEYS):
        return conv(state[NORM_KEYS[0]].tolist(), state[NORM_KEYS[1]].tolist(), "checkpoint")
    meta = read_metadata(source)
    raw = meta.get("safetensors", {}).get(INPUT_META)
    if raw:
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConventionError(
                f"{source}: metadata {INPUT_META} is not valid JSON: {e}"
            ) from None
        return conv(d["mean"], d["std"], "the file's beitdomain metadata")
    pre = meta.get("preprocessor_config.json")
    if isinstance(pre, Mapping) and "image_mean" in pre:
        if pre.get("do_normalize", True):
            return conv(pre["image_mean"], pre["image_std"], "preprocessor_config.json")
        return conv(0.0, 1.0, "preprocessor_config.json (do_normalize false)")
    cfg = meta.get("config.json")
    if isinstance(cfg, Mapping) and isinstance(cfg.get("pretrained_cfg"), Mapping):
        pc = cfg["pretrained_cfg"]
        if "mean" in pc and "std" in pc:
            return conv(pc["mean"], pc["std"], "config.json pretrained_cfg (timm)")
    if any(k.startswith("beitdomain.") for k in meta.get("safetensors", {})):
        fmt = "beitdomain"  # a beitdomain export in timm's layout (e.g. `beitdomain.timm`)
    if fmt == "beitdomain":  # written before the convention was saved: [0, 1] as is
        return conv(0.0, 1.0, "beitdomain checkpoint without a recorded convention: [0, 1]")
    return conv(
        OFFICIAL_MEAN, OFFICIAL_STD, f"official BEiT convention, assumed for a {fmt} checkpoint"
    )
