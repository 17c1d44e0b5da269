"""Export a BEiT backbone as a timm model folder or a Hugging Face `BeitModel` folder.

Both carry the model's input convention (channels, size, mean and std of [0, 1] images), so each
library's own preprocessing feeds the weights what they were trained on:

* timm: `config.json` in timm's hub format (architecture, `model_args`, `pretrained_cfg` with
  `input_size`, `mean`, `std`, the evaluation view, `num_classes: 0`) and `model.safetensors`,
  written by `export_timm_backbone`, the one timm writer (`backbone.safetensors` too). Loads with
  `timm.create_model("local-dir:<folder>", pretrained=True)`, or the same call with
  `pretrained_cfg_overlay=dict(file="<folder>/model.safetensors")`; `resolve_data_config` +
  `create_transform` give the matching transform.
* Hugging Face: `config.json` (`BeitConfig`), `model.safetensors` and `preprocessor_config.json`
  (`BeitImageProcessor`: the evaluation view of `beitdomain.view`, shorter side resized and a
  centred square cut, then rescale to [0, 1] and normalize with the model's mean / std); loads
  with `BeitModel.from_pretrained(folder)` and
  `AutoImageProcessor.from_pretrained(folder)`. transformers is needed only here (dev extra).

The layout is the fine-tuning one of both libraries: mean pooling over patch tokens, then a
LayerNorm (`fc_norm` / `pooler.layernorm`). A MIM backbone's token norm is not carried over and
the pooled norm is written fresh (weight 1, bias 0), as BEiT fine-tuning starts it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from beitdomain.fileio import (
    atomic_write_safetensors,
    atomic_write_text,
    make_dirs,
    written_names,
)
from beitdomain.models.backbone import HF_SHAPE_NAMES, beit_kwargs
from beitdomain.models.convention import INPUT_META, InputConvention, convention_of
from beitdomain.models.convert import WeightsError, pooled_backbone_state
from beitdomain.models.convert.keys import _hf_name
from beitdomain.user import UserError
from beitdomain.view import EvalView

ExportFormat = Literal["timm", "hf"]
TIMM_TEMPLATE = "beit_base_patch16_224"  # any registered BEiT: model_args set every dimension
TIMM_META = "beitdomain.timm"  # safetensors metadata: the template name + timm model_args
WEIGHTS = "model.safetensors"
EXPORTED_FILE = ".beitdomain-export.json"  # the files an export wrote into its folder
EXPORT_FILES: dict[str, tuple[str, ...]] = {
    "timm": ("config.json", WEIGHTS),
    "hf": ("config.json", WEIGHTS, "preprocessor_config.json"),
}


def _claim_export_folder(out: Path, fmt: ExportFormat) -> None:
    """Creates `out` and records the files this export writes there, after checking that none
    of them is a file an export did not write (a web app's config.json, say).

    Raises:
        UserError: such a file exists; nothing was written.
    """
    names = EXPORT_FILES[fmt]
    ours, foreign = written_names(out, EXPORTED_FILE, names)
    if foreign:
        raise UserError(
            f"{out}: {', '.join(foreign)} already there and not written by a beitdomain export; "
            "nothing was written. Choose another --out folder (or an empty one)"
        )
    make_dirs(out, f"write the {fmt} export")
    atomic_write_text(out / EXPORTED_FILE, json.dumps(sorted(ours | set(names))) + "\n")


def _pooled_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], Any, InputConvention]:
    """Backbone tensors in timm's classifier layout (per-block tables, fc_norm, no head)."""
    state, cfg = pooled_backbone_state(model)
    return state, cfg, convention_of(model)


def timm_model_args(cfg: Any) -> dict[str, Any]:
    """`timm.create_model` keyword arguments that rebuild the exported architecture."""
    kwargs = beit_kwargs(cfg.replace(use_shared_rel_pos_bias=False, drop_path_rate=0.0))
    kwargs.pop("drop_path_rate")
    return kwargs


def timm_pretrained_cfg(
    in_chans: int, image_size: int, conv: InputConvention | None
) -> dict[str, Any]:
    """timm's `pretrained_cfg` for an export: its input, convention and evaluation view."""
    out: dict[str, Any] = {
        "input_size": [in_chans, image_size, image_size],
        "fixed_input_size": True,
        **EvalView(image_size).timm_cfg(),
        "num_classes": 0,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    if conv is not None:
        out.update(mean=list(conv.mean), std=list(conv.std))
    return out


@dataclass
class TimmExport:
    """Where an exported backbone is and how timm builds a matching model for it.

    Attributes:
        path: the `.safetensors` file.
        model_name: a registered timm BEiT name; `model_kwargs` override its dimensions.
        model_kwargs: keyword arguments for `timm.create_model` describing the architecture.
        input: the weights' input convention (None: not recorded).
    """

    path: Path
    model_name: str
    model_kwargs: dict[str, Any]
    input: InputConvention | None = None

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's `pretrained_cfg` of these weights (`timm_pretrained_cfg`)."""
        args = self.model_kwargs
        return timm_pretrained_cfg(int(args["in_chans"]), int(args["img_size"]), self.input)

    @property
    def pretrained_cfg_overlay(self) -> dict[str, Any]:
        """Overlay for `timm.create_model(..., pretrained=True, pretrained_cfg_overlay=...)`.

        `input_size` declares the exported channel count, so timm adapts the patch embedding
        correctly when `in_chans` differs; `num_classes=0` says the file has no head.
        """
        cfg = self.pretrained_cfg
        if self.input is None:  # no convention recorded: leave timm's mean / std and view
            cfg = {k: cfg[k] for k in ("input_size", "num_classes")}
        return {"file": str(self.path), **cfg, "input_size": tuple(cfg["input_size"])}

    def create_model(self, num_classes: int = 0, **overrides: Any) -> nn.Module:
        """Builds the timm model with these weights (offline; reads only `path`)."""
        import timm

        kwargs = {**self.model_kwargs, **overrides}
        return timm.create_model(
            self.model_name,
            pretrained=True,
            pretrained_cfg_overlay=self.pretrained_cfg_overlay,
            num_classes=num_classes,
            **kwargs,
        )


def export_timm_backbone(model: nn.Module, out_path: str | Path) -> TimmExport:
    """Writes a backbone as timm BEiT safetensors (no MIM head, no mask token): the one timm
    writer, behind `backbone.safetensors` and the timm folder's `model.safetensors`.

    The layout is that of timm's registered BEiT models: one relative position table per block
    (a shared table is copied into each), `fc_norm` after mean pooling and no token `norm`. A
    MIM backbone's token norm is not carried over (unilm and MAE fine-tuning also start `fc_norm`
    fresh); `fc_norm` is written as a fresh LayerNorm (weight 1, bias 0) so timm finds every key.
    The metadata records the architecture (`beitdomain.timm`) and the input convention.

    Args:
        model: a `BeitMIM`, `BeitClassifier` or timm `Beit`.
        out_path: the `.safetensors` file to write.

    Returns:
        A `TimmExport`; `export.create_model(num_classes=N)` or
        `timm.create_model(export.model_name, pretrained=True,
        pretrained_cfg_overlay=export.pretrained_cfg_overlay, num_classes=N,
        **export.model_kwargs)` loads it with only the new head missing.
    """
    return _write_timm_weights(*_pooled_state(model), Path(out_path))


def _write_timm_weights(
    state: dict[str, torch.Tensor], cfg: Any, conv: InputConvention, out: Path
) -> TimmExport:
    args = timm_model_args(cfg)
    meta = {
        "format": "pt",
        TIMM_META: json.dumps({"model": TIMM_TEMPLATE, **args}),
        INPUT_META: json.dumps(conv.to_dict()),
    }
    atomic_write_safetensors(out, state, metadata=meta)
    return TimmExport(path=out, model_name=TIMM_TEMPLATE, model_kwargs=args, input=conv)


def export_timm(model: nn.Module, folder: str | Path) -> Path:
    """Writes a timm model folder (`config.json` + `model.safetensors`); returns the folder.

    Load it with `timm.create_model(f"local-dir:{folder}", pretrained=True)`; the
    `pretrained_cfg` it reads says `in_chans`, `input_size`, `mean`, `std`, the evaluation
    view (`beitdomain.view`) and `num_classes=0`.
    """
    state, cfg, conv = _pooled_state(model)  # a model that is no BEiT fails before the folder
    out = Path(folder)
    _claim_export_folder(out, "timm")
    export = _write_timm_weights(state, cfg, conv, out / WEIGHTS)
    config = {
        "architecture": export.model_name,
        "num_classes": 0,
        "num_features": export.model_kwargs["embed_dim"],
        "global_pool": "avg",
        "model_args": export.model_kwargs,
        "pretrained_cfg": {**export.pretrained_cfg, "license": "same as the source weights"},
    }
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out


def hf_config_dict(cfg: Any) -> dict[str, Any]:
    """`BeitConfig` keyword arguments for the exported (mean-pooled, per-block bias) layout."""
    return dict(
        **{hf: getattr(cfg, name) for name, hf in HF_SHAPE_NAMES.items()},
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio),
        hidden_act="gelu",  # exact erf GELU, as timm
        layer_norm_eps=1e-6,  # timm's LayerNorm eps (HF's default is 1e-12)
        layer_scale_init_value=cfg.layer_scale_init or 0.0,
        use_mask_token=False,
        use_absolute_position_embeddings=cfg.use_abs_pos_emb,
        use_relative_position_bias=True,
        use_shared_relative_position_bias=False,
        use_mean_pooling=True,
        drop_path_rate=0.0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def export_hf(model: nn.Module, folder: str | Path) -> Path:
    """Writes a Hugging Face `BeitModel` folder with its image processor; returns the folder.

    Raises:
        WeightsError: transformers is not installed (it is in beitdomain's dev extra).
    """
    try:
        import transformers
    except ImportError:
        raise WeightsError(
            "exporting for Hugging Face needs transformers: pip install transformers "
            "(or beitdomain[dev])"
        ) from None
    state, cfg, conv = _pooled_state(model)
    hf = transformers.BeitModel(transformers.BeitConfig(**hf_config_dict(cfg)))
    filled: dict[str, torch.Tensor] = {}
    for key, tensor in hf.state_dict().items():
        canon = _hf_name(key)
        value = None
        if canon is not None:
            value = state.get(canon)
            if value is None and (m := _qkv_part(canon)) is not None:
                prefix, part = m
                qkv = state[f"{prefix}.qkv.weight"]
                value = qkv.chunk(3, dim=0)["qkv".index(part)]
        if value is None:
            if key.endswith("relative_position_index"):
                continue  # buffers that transformers computes itself
            raise WeightsError(f"HF export: no beitdomain tensor for {key} (mapped to {canon})")
        if tuple(value.shape) != tuple(tensor.shape):
            raise WeightsError(
                f"HF export: {key} is {tuple(tensor.shape)} in transformers but "
                f"{tuple(value.shape)} in the model"
            )
        filled[key] = value
    missing, unexpected = hf.load_state_dict(filled, strict=False)
    missing = [k for k in missing if not k.endswith("relative_position_index")]
    if missing or unexpected:
        raise WeightsError(f"HF export incomplete: missing {missing}, unexpected {unexpected}")
    out = Path(folder)
    _claim_export_folder(out, "hf")
    hf.save_pretrained(out)
    processor = transformers.BeitImageProcessor(
        **EvalView(conv.input_size).hf_processor_kwargs(),  # crops a non-square image as timm
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(conv.mean),
        image_std=list(conv.std),
        do_reduce_labels=False,
    )
    processor.save_pretrained(out)
    return out


def _qkv_part(canon: str) -> tuple[str, str] | None:
    for part in "qkv":
        suffix = f".{part}.weight"
        if canon.endswith(suffix) and ".attn" in canon:
            return canon[: -len(suffix)], part
    return None


def export_backbone(model: nn.Module, folder: str | Path, fmt: ExportFormat = "timm") -> Path:
    """`export_timm` or `export_hf` by name.

    Raises:
        ValueError: for another format.
    """
    if fmt == "timm":
        return export_timm(model, folder)
    if fmt == "hf":
        return export_hf(model, folder)
    raise ValueError(f"export format must be 'timm' or 'hf', got {fmt!r}")
