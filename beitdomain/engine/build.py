"""Recipe -> models and mask generators: the few decisions pre-training and fine-tuning share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from beitdomain.config import Recipe
from beitdomain.data.masking import build_mask_generator
from beitdomain.engine.job import BACKBONE_FILE, BEST_FILE, RECIPE_FILE, RESULTS_FILE, is_finished
from beitdomain.models.backbone import BackboneConfig, get_preset
from beitdomain.models.classifier import BeitClassifier
from beitdomain.models.cnn import TIMM_PREFIX, TimmClassifier, check_timm_arch, timm_arch
from beitdomain.models.convert import LoadReport, load_backbone_weights
from beitdomain.models.hub import HF_PREFIX, locate_weights
from beitdomain.user import UserError

SCRATCH = ("scratch", "none", "random")


def resolve_init(init: str | None) -> str | None:
    """What an `--init` of any kind loads, for every job that takes one.

    `scratch` (or `none`, `random`, None) -> None; `timm:<arch>` stays as it is (that timm
    network from random weights, its name checked); a finished pre-training run folder -> its
    exported backbone; a finished fine-tuning run folder -> its best weights (BEiT's
    intermediate fine-tuning: a related labelled set first, then the target; its head loads
    where the number of classes is the same, as any classifier checkpoint's); a hub or timm
    BEiT name -> its local folder (`models.hub`); any other existing file or folder -> its path.

    Raises:
        UserError: an unfinished run folder, an unknown architecture or a missing path;
            `WeightsError` for a hub name that cannot be fetched.
    """
    if init is None or init.lower() in SCRATCH:
        return None
    arch = timm_arch(init)
    if arch is not None:
        try:
            return TIMM_PREFIX + check_timm_arch(arch)
        except ValueError as e:
            raise UserError(f"--init {init}: {e}") from None
    p = Path(init)
    if p.is_dir() and is_finished(p, "pretrain"):
        return str(p / BACKBONE_FILE)
    if p.is_dir() and is_finished(p, "finetune"):
        return str(p / BEST_FILE)
    if p.is_dir() and (p / RECIPE_FILE).is_file() and not (p / "config.json").is_file():
        raise UserError(
            f"{p} is a run folder without {BACKBONE_FILE} (or {BEST_FILE} and {RESULTS_FILE}): "
            f"it has not finished pre-training (or fine-tuning). Resume it (beitdomain pretrain "
            f"--out {p} --resume) or export its newest checkpoint (beitdomain pretrain export {p})"
        )
    if not p.exists():
        if init.startswith(HF_PREFIX) or init.startswith("beit"):  # hub / timm names
            return locate_weights(init).path
        raise UserError(f"--init {init}: no such file or folder (or use --init scratch)")
    return str(p)


def is_pretrained(init: str | None) -> bool:
    """Whether a resolved init loads weights (not scratch, not a timm network from random)."""
    return init is not None and timm_arch(init) is None


def load_init(
    model: nn.Module, init: str | None, recipe: Recipe, *, trust_pickle: bool = False
) -> LoadReport | None:
    """Loads a resolved `init` (`resolve_init`) into a classifier built for `recipe`.

    The weights' input convention is the recipe's `model.input_mean` / `model.input_std`
    where it states one, else what the file records. Scratch and `timm:<arch>` load nothing
    (None).
    """
    if not is_pretrained(init):
        return None
    return load_backbone_weights(
        model,
        init,
        in_chans=recipe.data.in_chans,
        trust_pickle=trust_pickle,
        source_mean=recipe.model.input_mean,
        source_std=recipe.model.input_std,
    )


def backbone_config(
    recipe: Recipe, *, grad_checkpointing: bool = False, drop_path: float | None = None
) -> BackboneConfig:
    """The backbone of `model.preset` with the recipe's overrides (size, channels, drop path).

    `grad_checkpointing` comes from the job that trains it (`pretrain.train` or
    `finetune.train`), never from another job's section.

    Overriding a dimension of a named timm architecture makes the config `custom`, so the
    exported name never claims dimensions it does not have.
    """
    m = recipe.model
    changes: dict[str, Any] = {
        "in_chans": recipe.data.in_chans,
        "img_size": m.img_size or recipe.data.image_size,
        "drop_path_rate": m.drop_path if drop_path is None else drop_path,
        "layer_scale_init": m.layer_scale_init,
        "grad_checkpointing": grad_checkpointing,
    }
    dims = {k: getattr(m, k) for k in ("patch_size", "embed_dim", "depth", "num_heads")}
    dims = {k: v for k, v in dims.items() if v is not None}
    try:
        cfg = get_preset(m.preset)
    except KeyError as e:
        raise UserError(f"model.preset: {e.args[0]}") from None
    if dims and any(getattr(cfg, k) != v for k, v in dims.items()):
        changes["arch"] = "custom"
    try:
        return cfg.replace(**changes, **dims)
    except ValueError as e:
        raise UserError(f"model: {e}") from None


def mask_generator(recipe: Recipe, grid: tuple[int, int]) -> Any:
    """BEiT blockwise (or random) masking over the backbone's patch grid."""
    mk = recipe.mask
    if not 0.0 < mk.ratio < 1.0:
        raise UserError(f"mask.ratio={mk.ratio} must be between 0 and 1 (BEiT: 0.4)")
    return build_mask_generator(mk.kind, grid, mk.ratio, min_num_patches=mk.min_num_patches)


def build_classifier(recipe: Recipe, num_classes: int) -> BeitClassifier | TimmClassifier:
    """The fine-tuning classifier: the recipe's backbone with `finetune`'s drop path and head.

    `finetune.init: timm:<arch>` builds that timm network from random weights instead (the
    CNN a practitioner would train; `model` then only gives the channels).
    """
    ft = recipe.finetune
    arch = timm_arch(ft.init)
    if arch is not None:
        try:
            return TimmClassifier(
                arch, num_classes, in_chans=recipe.data.in_chans, drop_path=ft.drop_path or 0.0
            )
        except ValueError as e:
            raise UserError(f"finetune.init {ft.init}: {e}") from None
    # Fine-tuning gives every block its own relative position table (BEiT's recipe); a shared
    # pre-trained table is copied into each by the weight loader.
    cfg = backbone_config(
        recipe, grad_checkpointing=ft.train.grad_checkpointing, drop_path=ft.drop_path
    ).replace(use_shared_rel_pos_bias=False)
    return BeitClassifier.from_config(cfg, num_classes, head_init_scale=ft.head_init_scale)
