"""Recipes: typed dataclasses loaded from YAML, with `extends:` and dotted overrides.

A recipe is one YAML file whose top-level sections map onto the dataclasses below. Values are
merged in this order, later winning:

    dataclass defaults < `extends:` base recipe(s) < the recipe file < typed CLI options < `--set`

The sections mirror the jobs: `data`, `model`, `mask` describe the images and the backbone;
`tokenizer`, `pretrain` and `finetune` are the three jobs, each with the same `train` (how long,
how) and `optim` (AdamW, schedule) sub-sections, and each job reads only its own; `curve` is the
grid of fine-tunes.

Every key is checked against the dataclass it lands in; an unknown or mistyped key, or a value
outside its field's range, is an error that names the key, the value, the file it came from and
what would be valid. `None` in a field means "not set": the command derives a value (e.g. warmup
from epochs) instead of guessing here. Trust (`--trust-pickle`) is not a recipe value: it comes
from the person running the command, never from a file.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from beitdomain.labels import LabelSubsetError, parse_labels_spec
from beitdomain.user import UserError

__all__ = [
    "RECIPES_DIR",
    "CurveConfig",
    "DataConfig",
    "FinetuneConfig",
    "MaskConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "Recipe",
    "RecipeError",
    "SegmentConfig",
    "TokenizerConfig",
    "TrainConfig",
    "bounded",
    "dump_recipe",
    "find_recipe",
    "load_recipe",
    "parse_set",
    "recipe_to_dict",
]

# A source checkout (or editable install) keeps its shipped recipes beside the package.
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class RecipeError(UserError):
    """A recipe or override that cannot be used; the message says where and what would be valid."""


# Seeds are mixed into generator seeds (seed * 1_000_003 + epoch) that torch and NumPy take
# as 64-bit (NumPy's legacy seed: 32-bit) integers; a larger one fails mid-run, after the run
# folder exists, with "Overflow when unpacking long long".
SEED_MAX = 2**32 - 1
# Any integer of a recipe ends up in a C integer somewhere (torch, NumPy, the OS).
INT_MAX = 2**63 - 1


def _shown(value: Any) -> str:
    """`repr(value)`, short for an integer too long to print (Python refuses > 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**40:
        return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    return repr(value)


def bounded(
    default: Any = None,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    ordered: bool = False,
    default_factory: Any = None,
) -> Any:
    """A dataclass field whose numbers (each item, for a list or pair) must lie in a range.

    `ordered`: a pair whose first value must not exceed the second (e.g. a crop scale).
    """
    meta = {"range": (ge, gt, le, lt), "ordered": ordered}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where images come from and how their intensities become [0, 1]."""

    root: str | None = None  # folder of images (scanned recursively); ImageFolder labels if any
    labels: str | None = None  # CSV `path,label[,split]`; paths relative to `root`
    manifest: str | None = None  # manifest written by `beitdomain data scan`
    cache: str | None = None  # cache folder written by `beitdomain data cache`
    in_chans: Literal[1, 3] = 1  # 1: RGB -> luminance; 3: grayscale replicated
    image_size: int = bounded(224, ge=1)  # backbone view
    # tokenizer view (pre-training); token grid = this / downsample
    tokenizer_size: int = bounded(112, ge=1)
    normalize: Literal["auto", "window", "percentile", "dtype"] = "auto"
    window: str | dict[str, float] | None = None  # preset ('ct-lung') or {center: 40, width: 400}
    percentiles: tuple[float, float] = bounded((0.5, 99.5), ge=0, le=100, ordered=True)
    # sample indices for TIFFs with more than 3 samples
    channels: list[int] | None = bounded(None, ge=0)
    nonfinite: Literal["error", "zero"] = "error"  # NaN/Inf in float images
    # multi-frame files, stacks, series, volumes: all | middle | first | every:K | range:A:B
    frames: str = "all"
    slice_axis: Literal["axial", "coronal", "sagittal"] = "axial"  # NIfTI, NRRD, MetaImage
    dicom_series: bool = False  # a folder of only DICOMs is one volume, ordered by position
    on_error: Literal["fail", "skip"] = "fail"
    allow_outside_root: bool = False  # label-CSV paths must resolve inside `root` unless set
    num_workers: int | None = bounded(None, ge=0)  # None: engine.distributed.default_num_workers
    # augmentation
    crop_scale: tuple[float, float] = bounded((0.2, 1.0), gt=0, le=1, ordered=True)
    hflip: float = bounded(0.5, ge=0, le=1)
    vflip: float = bounded(0.0, ge=0, le=1)
    # rows and columns swapped; with both flips at 0.5, 0.5 draws all 8 square symmetries
    transpose: float = bounded(0.0, ge=0, le=1)
    intensity_jitter: float = bounded(0.1, ge=0, le=1)
    # the user's own pipeline instead of the five above: an albumentations file saved with
    # albumentations.save (.json/.yaml) or 'package.module:name' of a (MONAI) transform or a
    # function building one; reseeded per item from (seed, epoch, index)
    augment: str | None = None
    # labelled splits when the data has none: stratified, seeded
    val_fraction: float = bounded(0.1, ge=0, lt=1)
    test_fraction: float = bounded(0.2, ge=0, lt=1)
    split_seed: int = bounded(0, ge=0, le=SEED_MAX)
    # Pre-training and the tokenizer leave the test split's images out; true: use them too.
    transductive: bool = False
    # images of one group never sit in two splits; label subsets take whole groups
    group_column: str = "group"  # labels-CSV column naming each image's patient/wafer/slide
    patient_groups: bool = True  # DICOMs: group by PatientID (salted hash in memory only)


@dataclass
class OptimConfig:
    """AdamW with cosine decay after a linear warm-up."""

    lr: float | None = bounded(None, ge=0)  # None: base_lr * batch / 256 (the linear scaling rule)
    base_lr: float = bounded(1.5e-3 * 256 / 2048, gt=0)  # BEiT: 1.5e-3 at batch 2048
    min_lr: float = bounded(1e-5, ge=0)
    weight_decay: float = bounded(0.05, ge=0)
    betas: tuple[float, float] = bounded((0.9, 0.999), ge=0, lt=1)
    eps: float = bounded(1e-8, gt=0)
    warmup_steps: int | None = bounded(None, ge=0)  # None: warmup_fraction of the run
    warmup_fraction: float = bounded(0.1, ge=0, le=1)
    grad_clip: float | None = bounded(3.0, gt=0)
    layer_decay: float | None = bounded(None, gt=0, le=1)  # fine-tuning: 0.65


@dataclass
class TrainConfig:
    """How long and how a job runs; shared by tokenizer, pre-training and fine-tuning."""

    epochs: float | None = bounded(None, gt=0)
    steps: int | None = bounded(None, ge=1)  # overrides epochs when set
    min_steps: int = bounded(0, ge=0)  # small label subsets still get this many optimizer steps
    batch_size: int = bounded(64, ge=1)  # per process, per micro-step
    accum_steps: int = bounded(1, ge=1)
    # auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # torch.compile the model: off by default; on 2-core CPUs the demo's step ran 2-6% faster
    # (Xeon, 52 s to compile) or within noise (EPYC), which did not pay (BENCHMARKS.md);
    # untested on GPUs here
    compile: bool = False
    grad_checkpointing: bool = False
    log_every: int = bounded(10, ge=1)
    ckpt_every: int = bounded(200, ge=1)  # optimizer steps between checkpoints
    keep_checkpoints: int = bounded(3, ge=1)
    # fine-tuning: steps between validations (None: each epoch)
    eval_every: int | None = bounded(None, ge=1)
    max_nonfinite: int = bounded(5, ge=1)  # consecutive non-finite losses before the run stops
    tensorboard: bool = False  # also write TensorBoard events (needs `pip install tensorboard`)
    # Experiment trackers that also receive every metrics record (engine/run/trackers.py); one not
    # installed is a warning, not an error.
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=list)
    deterministic: bool = False


@dataclass
class TokenizerConfig:
    """The discrete VAE: architecture, where it starts from, and how it is trained."""

    path: str | None = None  # trained tokenizer used by `pretrain` (dir or tokenizer.safetensors)
    preset: str = "small"
    vocab_size: int | None = bounded(None, ge=2)  # None: the preset's
    downsample: int | None = bounded(None, ge=1)  # 4 or 8; None: the preset's
    recon_loss: Literal["logit_laplace", "l1", "mse"] | None = None
    init: str | None = None  # previous tokenizer dir to continue from
    temperature_start: float = bounded(1.0, gt=0)
    temperature_end: float = bounded(1.0 / 16, gt=0)
    # Anneal over this first part of the run, then hold temperature_end (DALL-E: 1/16 after 5%
    # of 3M updates), so the decoder also trains on the near-hard codes pre-training uses.
    temperature_anneal_fraction: float = bounded(0.05, gt=0, le=1)
    # KL to the uniform prior, per token cell, against a reconstruction loss per pixel. DALL-E's
    # beta = 6.6 weighs sums (sub-pixels vs cells); per pixel that is 6.6 / (pixels per cell):
    # 6.6 / 64 = 0.1 at 8x downsampling; divided by the channel count when applied, as the
    # reconstruction loss averages channels too. Much weaker and codes collapse early.
    kl_weight: float = bounded(0.1, ge=0)
    kl_warmup_fraction: float = bounded(0.1, ge=0, le=1)
    # KL of the batch-average code distribution to uniform: spreads the codes over the
    # codebook without making each cell's choice uncertain (see DVAEOutput.loss); 0 = off.
    usage_weight: float = bounded(0.0, ge=0)
    # L1 between the image gradients (finite differences along x and y) of the reconstruction
    # and of the input, added to the reconstruction loss with this weight; 0 = off. A per-pixel
    # loss barely notices a 1-px crack (a few pixels of the image); the gradient is large exactly
    # there. On 64 px ELPV cells weight 1 sharpened edges (+0.9 dB) but isolated thin cracks
    # stayed lost (BENCHMARKS.md).
    edge_weight: float = bounded(0.0, ge=0)
    # Straight-through Gumbel: the decoder sees one-hot codes (as it will at inference), the
    # gradient flows through the soft sample.
    straight_through: bool = False
    # steps between dead-code re-initialisations; None: off
    dead_code_every: int | None = bounded(200, ge=1)
    # a code used less often than this fraction counts as dead
    dead_code_min_usage: float = bounded(0.0, ge=0, le=1)
    sample_every: int = bounded(500, ge=1)  # steps between reconstruction-grid PNGs
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(base_lr=1e-3, min_lr=1e-5, weight_decay=0.01)
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, batch_size=64))


@dataclass
class MaskConfig:
    """BEiT masking: blockwise by default; `random` for the paper's ablation."""

    kind: Literal["block", "random"] = "block"
    ratio: float = bounded(0.4, gt=0, lt=1)
    min_num_patches: int | None = bounded(None, ge=1)  # None: 16 at 14x14, scaled with the grid


@dataclass
class ModelConfig:
    """The BEiT backbone (timm) and the pre-training target."""

    preset: str = "vit-base"
    img_size: int | None = bounded(None, ge=1)  # None: data.image_size
    patch_size: int | None = bounded(None, ge=1)
    embed_dim: int | None = bounded(None, ge=1)
    depth: int | None = bounded(None, ge=1)
    num_heads: int | None = bounded(None, ge=1)
    drop_path: float = bounded(0.1, ge=0, lt=1)
    layer_scale_init: float | None = bounded(0.1, gt=0)
    # checkpoint file/dir, hf-hub:org/name or a timm BEiT name to start from; None: random
    init: str | None = None
    target: Literal["tokens", "pixels"] = "tokens"
    # target=pixels: regress each patch normalized by its own mean and std (MAE), or false: the
    # raw (input-normalized) pixels, as in BEiT's pixel-regression ablation
    norm_pix_loss: bool = True
    # auto: one table per block when the init checkpoint has differing ones, else shared (BEiT)
    rel_pos_bias: Literal["auto", "shared", "per_block"] = "auto"
    # auto: reuse the init's MIM head only with the tokenizer it predicts (an imported DALL-E)
    lm_head: Literal["auto", "reuse", "new"] = "auto"
    # Mean/std of [0, 1] inputs (one value or one per channel). None: what the init checkpoint
    # records (official BEiT: 0.5 / 0.5), or 0 / 1 from scratch. Set it for a .pth that was
    # trained otherwise (BEiT v2: ImageNet's 0.485/0.456/0.406, 0.229/0.224/0.225).
    input_mean: list[float] | None = None
    input_std: list[float] | None = bounded(None, gt=0)


@dataclass
class FinetuneConfig:
    """Low-label fine-tuning: which labels, which head, how regularised."""

    labels: str = "100%"  # '1%', '0.01', '200', '5/class'
    # classify: one label per image; segment: a mask per image (the labels CSV's `mask`
    # column, or segment.masks), label amounts counted in annotated images (engine/segment.py)
    task: Literal["classify", "segment"] = "classify"
    init: str | None = None  # pre-training run dir, exported/official checkpoint; None: scratch
    linear_probe: bool = False
    label_smoothing: float = bounded(0.1, ge=0, lt=1)
    mixup: float = bounded(0.0, ge=0)
    cutmix: float = bounded(0.0, ge=0)
    # decay of an average of the weights over steps (timm's ModelEmaV3, warmed up): the average
    # is what validation scores and the run keeps. 0: off, the final (or best) weights
    ema: float = bounded(0.0, ge=0, lt=1)
    class_weighting: Literal["none", "loss", "sampler"] = "none"
    # validations without improvement before stopping
    early_stopping: int | None = bounded(None, ge=1)
    select_metric: Literal["balanced_accuracy", "accuracy", "auroc", "macro_f1", "loss"] = (
        "balanced_accuracy"
    )
    head_init_scale: float = bounded(0.001, ge=0)
    # "random": BEiT's small random head. "probe": LP-FT (Kumar et al., ICLR 2022): the head
    # starts as a logistic regression fitted on the frozen backbone's features of the training
    # labels (L2 strength 1 / probe_c on standardized features), so the first fine-tuning
    # gradients do not come from a random head and distort the pre-trained features.
    head_init: Literal["random", "probe"] = "random"
    probe_c: float = bounded(0.1, gt=0)
    # Learning rates to try, e.g. [1.0e-4, 1.0e-3]: one fine-tune each (in lr-<value>/), and the
    # one with the best validation `select_metric` is the result. Empty: just `optim.lr`.
    lr_grid: list[float] = bounded(ge=0, default_factory=list)
    # What checkpoint and lr selection may look at: "none" (a fixed schedule, the final
    # weights), "carve" (a fifth of the label subset validates, the rest trains), "outside"
    # (the split's validation images: labels beyond the budget, only on request).
    selection: Literal["none", "carve", "outside"] = "none"
    drop_path: float = bounded(0.1, ge=0, lt=1)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            base_lr=1e-3, min_lr=1e-6, weight_decay=0.05, layer_decay=0.65, grad_clip=None
        )
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=30, min_steps=300, batch_size=64)
    )


@dataclass
class CurveConfig:
    """The grid of fine-tunes behind a label-efficiency curve."""

    fractions: list[str] = field(default_factory=lambda: ["1%", "5%", "10%", "25%", "100%"])
    seeds: list[int] = bounded(ge=0, le=SEED_MAX, default_factory=lambda: [0, 1, 2])
    # More seeds where labels are scarcest, e.g. {"1%": [0, 1, 2, 3, 4, 5]}: there the spread
    # between seeds is largest and each fine-tune is cheapest.
    fraction_seeds: dict[str, list[int]] = bounded(ge=0, le=SEED_MAX, default_factory=dict)
    inits: dict[str, str | None] = field(default_factory=lambda: {"scratch": None})
    # Per-initialization `--set` overrides, e.g. {domain: ["finetune.optim.lr=1e-4"]}: a
    # pre-trained backbone and a random one rarely want the same fine-tuning lr, and a fair
    # comparison gives each the setting its validation split prefers.
    init_sets: dict[str, list[str]] = field(default_factory=dict)
    # Where a cell's settings have a `finetune.lr_grid`: "all" runs the grid in every cell;
    # "first" runs it for the first seed of each (initialization, fraction) only, and the other
    # seeds fine-tune once at the lr that seed's validation split chose (tune once, then
    # repeat over seeds: the grid's cost is paid once per fraction, not once per seed).
    lr_grid_seeds: Literal["all", "first"] = "all"
    # What the curve compares (summary.csv, curve.png, the verdicts): a classification metric,
    # or for a segmentation curve mean_dice or mean_iou, the foreground means of each cell's
    # test masks (the default reads as mean_dice there; curve.csv holds both either way).
    metric: Literal[
        "balanced_accuracy", "accuracy", "auroc", "macro_f1", "mean_dice", "mean_iou"
    ] = "balanced_accuracy"
    # The classical arms on the same subsets: logistic regressions on pixels, on their PCA, and
    # on each backbone's frozen features (seconds on a CPU); the verdict is against the
    # strongest arm without pre-training.
    baselines: bool = True
    # Cells fine-tuned at a time (--workers overrides). None: one per visible GPU, else 1. On
    # a CPU each of n workers keeps to 1/n of the cores, with one torch thread per core.
    workers: int | None = bounded(None, ge=1)


@dataclass
class PretrainConfig:
    """BEiT masked image modeling: how long and with which optimizer (the masking is `mask`)."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100, batch_size=64))
    # k-NN accuracy of the backbone's frozen features on the labelled data (data.labels or
    # subfolders), logged every this many epochs as knn_balanced_accuracy; None: off.
    knn_every: int | None = bounded(None, ge=1)


# The sections that are jobs; each has `train` and `optim`, and each job reads only its own.
JOBS = ("tokenizer", "pretrain", "finetune")


@dataclass
class SegmentConfig:
    """Segmentation: what a mask's values mean and the decoder on the backbone's blocks.

    A mask is a label map, one file per image: pixel value i is `classes[i]`, and
    `ignore_index` (e.g. 255) marks pixels no one annotated (no loss, no metric).
    """

    classes: list[str] = field(default_factory=lambda: ["background", "foreground"])
    ignore_index: int | None = bounded(None, ge=0)
    # "progressive": the blocks' features upsampled 2x at a time, each merged with the next
    # shallower block's, to the input size; "linear": one 1x1 conv on the concatenated blocks,
    # upsampled bilinearly (the cheapest head, SETR-naive).
    decoder: Literal["progressive", "linear"] = "progressive"
    decoder_channels: int = bounded(64, ge=1)
    # Blocks (0-based) whose tokens feed the decoder; None: 4 evenly spaced, ending at the last.
    blocks: list[int] | None = bounded(None, ge=0)
    # A folder mirroring data.root with one mask per image (same relative path; any image
    # suffix); None: the `mask` column of data.labels.
    masks: str | None = None


@dataclass
class Recipe:
    """A whole recipe; each command reads the sections it needs."""

    name: str | None = None
    seed: int = bounded(0, ge=0, le=SEED_MAX)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    curve: CurveConfig = field(default_factory=CurveConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)


# Keys that a recipe used to have, and where they live now: named in the error, so an old
# recipe or `--set train.steps=500` says what to write instead.
MOVED_KEYS = {"train": "pretrain.train", "optim": "pretrain.optim"}
# Keys a recipe may never hold: trust belongs to the person running the command.
REFUSED_KEYS = {
    "model.trust_pickle": (
        "trust cannot come from a recipe (a file, `extends:`, --set or a saved run's "
        "recipe.yaml). Pass --trust-pickle on the command line (trust_pickle=True in Python) "
        "when you trust the weight file"
    ),
}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def find_recipe(name_or_path: str | Path) -> Path:
    """Resolves a recipe path, or a shipped recipe name (`elpv-cpu` -> recipes/elpv-cpu.yaml).

    Raises:
        RecipeError: if neither exists; the message lists the shipped recipes.
    """
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    for candidate in (RECIPES_DIR / p, RECIPES_DIR / f"{p}.yaml", RECIPES_DIR / f"{p.name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = sorted(q.stem for q in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    close = difflib.get_close_matches(p.stem, shipped, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise RecipeError(
        f"recipe '{name_or_path}' not found: not a file, and not a shipped recipe "
        f"(shipped: {', '.join(shipped) or 'none found'}){hint}"
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from e
    except ValueError as e:  # a constructor's: an integer past Python's digit limit, a bad date
        raise RecipeError(f"{path}: {_value_error(text, e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(
            f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}"
        )
    return data


def _value_error(text: str, e: ValueError) -> str:
    """What PyYAML's constructor refused, naming the line and key of an over-long integer."""
    long = re.search(rf"\d{{{_LONG_DIGITS},}}", text)
    if long is None:
        return f"a value YAML cannot read: {e}"
    lineno = text.count("\n", 0, long.start()) + 1
    line = text.splitlines()[lineno - 1]
    key = line[: line.find(":")].strip(" -") if ":" in line[: long.start()] else "?"
    digits = len(long.group())
    return (
        f"line {lineno}: '{key}' holds an integer of {digits} digits; a recipe's integers "
        f"must lie within +-{INT_MAX} (64 bits)"
    )


# Fewer digits than Python's int/str conversion limit (4300 by default) never fail.
_LONG_DIGITS = 1000


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not _is_free_mapping(k):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _is_free_mapping(key: str) -> bool:
    # Fields whose value is a user mapping, replaced whole rather than merged key by key.
    return key in {"inits", "init_sets", "fraction_seeds", "window"}


def _raw_recipe(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe file merged over its `extends:` chain, keys checked against the schema."""
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise RecipeError(f"{path}: `extends:` forms a cycle: {chain}")
    data = _read_yaml(path)
    bases = data.pop("extends", None)
    _build(Recipe, data, str(path), prefix="")  # keys and types, blamed on this file
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else (bases or []):
        base_path = Path(base)
        if not base_path.is_absolute() and (path.parent / base_path).is_file():
            base_path = path.parent / base_path
        try:
            base_path = find_recipe(base_path)
        except RecipeError as e:
            raise RecipeError(f"{path}: extends: {e}") from None
        merged = _deep_merge(merged, _raw_recipe(base_path, (*_seen, path)))
    return _deep_merge(merged, data)


def load_recipe(
    path: str | Path | None = None,
    options: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> Recipe:
    """Builds a recipe from defaults, a YAML file, typed CLI options and `--set` overrides.

    Args:
        path: recipe file or shipped recipe name; None for defaults only.
        options: dotted key -> value from typed CLI options; None values mean "not given".
        sets: `section.key=value` strings; values are parsed as YAML, then checked by type.

    Returns:
        The resolved, validated recipe.

    Raises:
        RecipeError: unknown keys, wrong types or invalid values, naming where they came from.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _raw_recipe(find_recipe(path))
    for key, value in (options or {}).items():
        if value is not None:
            raw = _set_dotted(raw, key, value, source="command-line option")
    raw = _with_sets(raw, sets or [], "--set")
    source = str(path) if path else "defaults"
    return _check_label_specs(_build(Recipe, raw, source=source, prefix=""))


ENV_SETS = "BEITDOMAIN_SET"  # overrides for every command and API call, `;`-separated


def env_sets() -> list[str]:
    """The `section.key=value` overrides in $BEITDOMAIN_SET (`;`-separated)."""
    return [s.strip() for s in os.environ.get(ENV_SETS, "").split(";") if s.strip()]


def apply_sets(recipe: Recipe, sets: list[str], source: str = "--set") -> Recipe:
    """The recipe with `section.key=value` overrides applied, checked like `--set`."""
    built = _build(Recipe, _with_sets(recipe_to_dict(recipe), sets, source), source, prefix="")
    return _check_label_specs(built)


def _check_label_specs(recipe: Recipe) -> Recipe:
    """`finetune.labels`, `curve.fractions` and `curve.fraction_seeds`' keys parsed now, so a
    typo ('1pct') fails when the recipe loads instead of after a scan of the data."""
    given = [("finetune.labels", recipe.finetune.labels)]
    given += [("curve.fractions", f) for f in recipe.curve.fractions]
    given += [("curve.fraction_seeds", f) for f in recipe.curve.fraction_seeds]
    for key, value in given:
        try:
            parse_labels_spec(value)
        except LabelSubsetError as e:
            # the value may come from the file, an option or a --set: name the key, not a source
            raise RecipeError(f"{key}: {e}") from None
    return recipe


def _with_sets(raw: dict[str, Any], sets: list[str], source: str) -> dict[str, Any]:
    for item in sets:
        key, value = parse_set(item)
        raw = _set_dotted(raw, key, value, source=f"{source} {item}")
    return raw


def parse_set(item: str) -> tuple[str, Any]:
    """Splits `section.key=value`; the value is YAML (`[1, 2]`, `true`, `null`, `3e-4`)."""
    if "=" not in item:
        raise RecipeError(
            f"--set {item!r}: expected section.key=value, e.g. --set pretrain.optim.lr=3e-4"
        )
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"--set {item!r}: the key before '=' is empty")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    except ValueError as e:  # an integer past Python's digit limit, a date like 2026-13-45
        digits = sum(c.isdigit() for c in text)
        if digits >= _LONG_DIGITS:
            raise RecipeError(
                f"--set {key}=<{digits} digits>: the value is too large: a recipe's "
                f"integers must lie within +-{INT_MAX} (64 bits)"
            ) from None
        raise RecipeError(f"--set {item!r}: a value YAML cannot read: {e}") from None
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any, source: str) -> dict[str, Any]:
    parts = key.split(".")
    _refuse(parts, source)
    cls: Any = Recipe
    for i, part in enumerate(parts):
        fields = _fields(cls)
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise RecipeError(_unknown_key_message(".".join(parts[: i + 1]), source, where, fields))
        hint = fields[part]
        inner = _dataclass_in(hint)
        if i < len(parts) - 1:
            if inner is None:
                raise RecipeError(
                    f"{source}: '{'.'.join(parts[: i + 1])}' is a value, not a section; "
                    f"it has no key '{parts[i + 1]}'"
                )
            cls = inner
        elif inner is None or not isinstance(value, dict):
            value = _coerce(hint, value, source, key)  # type errors blamed on this option
            _check_range(_field_of(cls, part), value, source, key)
    out = copy.deepcopy(raw)
    node = out
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------------------------
# Typed construction
# --------------------------------------------------------------------------------------------


def _refuse(parts: list[str], source: str) -> None:
    """A moved or refused key (`train.steps`, `model.trust_pickle`) as an error saying why."""
    if parts[0] in MOVED_KEYS:
        rest = ".".join(parts[1:])
        new = f"{MOVED_KEYS[parts[0]]}.{rest}" if rest else MOVED_KEYS[parts[0]]
        raise RecipeError(
            f"{source}: '{'.'.join(parts)}' has moved to '{new}': the top-level '{parts[0]}' "
            "section was pre-training's, and each job (tokenizer, pretrain, finetune) now has "
            f"its own train and optim sections"
        )
    for n in range(1, len(parts) + 1):
        dotted = ".".join(parts[:n])
        if dotted in REFUSED_KEYS:
            raise RecipeError(f"{source}: '{dotted}' is not a recipe key: {REFUSED_KEYS[dotted]}")


def _field_of(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _check_range(f: dataclasses.Field, value: Any, source: str, key: str) -> None:
    """Numbers must be finite and inside the field's `bounded(...)` range (each item of a list,
    pair or mapping); the message names the key, the value and the valid range."""
    ge, gt, le, lt = f.metadata.get("range", (None, None, None, None))

    def numbers(v: Any) -> list[Any]:
        if isinstance(v, dict):
            return [x for item in v.values() for x in numbers(item)]
        if isinstance(v, (list, tuple)):
            return [x for item in v for x in numbers(item)]
        return [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else []

    valid = " and ".join(
        f"{op} {bound if isinstance(bound, int) else format(bound, 'g')}"
        for op, bound in ((">=", ge), (">", gt), ("<=", le), ("<", lt))
        if bound is not None
    )
    for x in numbers(value):
        ok = (isinstance(x, int) or math.isfinite(x)) and not (
            (ge is not None and x < ge)
            or (gt is not None and x <= gt)
            or (le is not None and x > le)
            or (lt is not None and x >= lt)
        )
        if not ok:
            need = f"a finite number {valid}" if valid else "a finite number"
            raise RecipeError(f"{source}: '{key}' = {_shown(value)} is out of range: need {need}")
    pair = isinstance(value, (list, tuple)) and len(value) == 2
    if f.metadata.get("ordered") and pair and value[0] > value[1]:
        raise RecipeError(
            f"{source}: '{key}' = {list(value)!r}: the first value must not exceed the second"
        )


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg  # type: ignore[return-value]
    return None


def _unknown_key_message(key: str, source: str, where: str, fields: dict[str, Any]) -> str:
    last = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(last, list(fields), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return (
        f"{source}: unknown key '{key}' in {where}.{hint} "
        f"Valid keys there: {', '.join(sorted(fields))}."
    )


def _check_keys(cls: type, data: dict[str, Any], source: str, prefix: str) -> None:
    fields = _fields(cls)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        parts = dotted.split(".")
        if not prefix and key in MOVED_KEYS and isinstance(value, dict) and value:
            parts.append(str(next(iter(value))))  # name a whole key: 'train.steps'
        _refuse(parts, source)
        if key not in fields:
            where = f"section '{prefix[:-1]}'" if prefix else "the top level"
            raise RecipeError(_unknown_key_message(dotted, source, where, fields))
        inner = _dataclass_in(fields[key])
        if inner is not None and isinstance(value, dict):
            _check_keys(inner, value, source, prefix=f"{dotted}.")


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        section = prefix[:-1] or "recipe"
        raise RecipeError(f"{source}: '{section}' must be a mapping, got {data!r}")
    _check_keys(cls, data, source, prefix)
    # Sections merge over their field's own defaults (fine-tuning's optimizer keeps its
    # fine-tuning defaults when a recipe sets only `finetune.optim.lr`).
    return _merge_dataclass(cls(), data, source, prefix)


def _merge_dataclass(default: Any, data: dict[str, Any], source: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: '{prefix[:-1]}' must be a mapping, got {data!r}")
    fields = _fields(type(default))
    updates = {}
    for k, v in data.items():
        inner = _dataclass_in(fields[k])
        if inner is not None and isinstance(v, dict):
            updates[k] = _merge_dataclass(getattr(default, k), v, source, f"{prefix}{k}.")
        else:
            updates[k] = _coerce(fields[k], v, source, f"{prefix}{k}")
            _check_range(_field_of(type(default), k), updates[k], source, f"{prefix}{k}")
    return dataclasses.replace(default, **updates)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "choice"  # the valid values follow in the message
    return str(hint).replace("typing.", "")


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    """Checks `value` against `hint`, converting the few safe cases (int -> float, str -> float)."""

    def bad(extra: str = "") -> RecipeError:
        return RecipeError(
            f"{source}: '{key}' = {_shown(value)} is not a valid {_type_name(hint)}{extra}"
        )

    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_MAX:
        raise RecipeError(
            f"{source}: '{key}' = {_shown(value)} is too large: a recipe's integers must lie "
            f"within +-{INT_MAX} (64 bits)"
        )
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except RecipeError as e:
                errors.append(e)
        raise bad()
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):  # True is not 1
            return value
        raise bad(f"; choose one of {', '.join(repr(a) for a in args)}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, f"{key}.")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return _coerce(hint, int(value), source, key)
        raise bad()
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an int beyond any float
                raise bad() from None
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads `3e-4` as a string
            except ValueError:
                raise bad() from None
        raise bad()
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad(f"; expected {len(args)} values")
            return tuple(
                _coerce(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))
            )
        item = args[0] if args else Any
        items = [_coerce(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        kt, vt = args if args else (Any, Any)
        return {
            _coerce(kt, k, source, f"{key}.{k}"): _coerce(vt, v, source, f"{key}.{k}")
            for k, v in value.items()
        }
    raise bad()


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain-data form of a recipe (tuples as lists), ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(recipe))


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    """Writes the fully resolved recipe; it loads back into an equal `Recipe`."""
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
