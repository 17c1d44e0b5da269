"""`beitdomain finetune --task segment`: a segmenter from a few annotated images.

A job like the classification fine-tune (`engine.job`: the run folder and its lock, `Trainer`,
checkpoints, an exact `--resume`, results.json), on (image, mask) pairs (`data.masks`):

* data: every pair read and checked before the run folder exists; split by image file, groups
  kept together, `finetune.labels` counted in annotated images (`data.masks.segment_data`);
* model: the BEiT segmenter (`models.segment`, init as for classification through
  `engine.build.load_init`: scratch, a pre-training run, BEiT weights) or, with `--init unet`,
  MONAI's U-Net from random weights, the baseline a practitioner would train;
* loss: cross-entropy (ignored pixels left out) plus a soft Dice over the foreground classes, as
  MONAI's DiceCELoss, so a small lesion is not drowned by the background; layer-wise lr decay
  for a pre-trained backbone only, as for classification;
* outputs: best.safetensors, results.json (per-class Dice and IoU and their foreground means on
  the test split), contact_sheet.png (image / truth / prediction), labels_used.csv, labels.json.

Each item's crop and flips come from a generator of ``(seed, epoch, item)`` and batches from the
resumable sampler, so a resumed run ends equal to an uninterrupted one.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from beitdomain.config import Recipe
from beitdomain.data.masks import MaskClasses, segment_data, write_nifti_mask
from beitdomain.engine.build import backbone_config, is_pretrained, load_init, resolve_init
from beitdomain.engine.job import BEST_FILE, RESULTS_FILE, Job, JobOptions
from beitdomain.engine.train import distributed as D
from beitdomain.engine.train.ema import weight_ema
from beitdomain.engine.train.selection import ValidationHook, save_weights
from beitdomain.eval.segment_metrics import SegmentationMeter
from beitdomain.eval.segment_sheet import mask_contact_sheet
from beitdomain.models.backbone import BackboneConfig
from beitdomain.models.classifier import layer_decay_param_groups, param_groups_weight_decay
from beitdomain.models.cnn import timm_arch
from beitdomain.models.segment import BeitSegmenter, monai_unet
from beitdomain.user import UserError

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from beitdomain.engine.train.loop import Trainer

__all__ = [
    "SegmentEvalHook",
    "SegmentStep",
    "build_segmenter",
    "evaluate_masks",
    "finetune_segment",
    "is_segment_run",
    "predict_masks",
    "segment_loss",
]

log = logging.getLogger(__name__)

UNET_INITS = ("unet", "monai:unet")  # --init values that train MONAI's U-Net from scratch
SHEET_FILE = "contact_sheet.png"
SHEET_ROWS = 8  # test images on the contact sheet
PREDICT_BATCH = 16  # frames or slices predicted at a time


def build_segmenter(
    arch: Literal["beit", "unet"],
    backbone: BackboneConfig,
    classes: MaskClasses,
    *,
    decoder: Literal["progressive", "linear"] = "progressive",
    channels: int = 64,
    blocks: Sequence[int] | None = None,
) -> nn.Module:
    """The BEiT segmenter from random weights (an init is loaded after, by
    `engine.build.load_init`, as for the classifier) or the from-scratch MONAI U-Net (which
    takes only `backbone.in_chans`)."""
    if arch == "unet":
        return monai_unet(backbone.in_chans, classes.num_classes)
    # Fine-tuning gives every block its own relative position table (BEiT's recipe).
    cfg = backbone.replace(use_shared_rel_pos_bias=False)
    return BeitSegmenter.from_config(
        cfg, classes.num_classes, blocks=blocks, decoder=decoder, channels=channels
    )


def segment_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None
) -> torch.Tensor:
    """Cross-entropy plus soft Dice over the foreground classes (1 - mean Dice of the batch).

    Args:
        logits: ``[B, K, H, W]``.
        target: ``[B, H, W]`` class indices; pixels at `ignore_index` count in neither term.
    """
    ignore = -100 if ignore_index is None else ignore_index
    ce = F.cross_entropy(logits, target, ignore_index=ignore)
    keep = (target != ignore).unsqueeze(1).to(logits.dtype)  # [B, 1, H, W]
    probs = logits.softmax(1) * keep
    onehot = F.one_hot(target.where(target != ignore, 0), logits.shape[1]).permute(0, 3, 1, 2)
    onehot = onehot.to(logits.dtype) * keep
    inter = (probs * onehot).sum((0, 2, 3))[1:]
    total = (probs + onehot).sum((0, 2, 3))[1:]
    dice = (2 * inter + 1.0) / (total + 1.0)
    return ce + (1.0 - dice.mean())


class SegmentStep:
    """One step's loss on a batch (`segment_loss` in float32): a `StepFn` for `Trainer`."""

    def __init__(self, ignore_index: int | None = None) -> None:
        self.ignore_index = ignore_index

    def __call__(
        self, model: nn.Module, b: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return segment_loss(model(b["image"]).float(), b["mask"], self.ignore_index), {}


@torch.no_grad()
def evaluate_masks(
    model: nn.Module,
    dataset: Any,
    classes: MaskClasses,
    device: torch.device,
    batch_size: int = 16,
    amp_dtype: torch.dtype | None = None,
    keep: int = 0,
) -> tuple[dict[str, Any], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Per-class Dice and IoU of `model` over every pixel of `dataset` (a `MaskDataset` with
    an evaluation transform), and the first `keep` items as (image, truth, prediction)."""
    meter = SegmentationMeter(classes.names, classes.ignore_index)
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(dataset), batch_size):
        batch = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([b["image"] for b in batch]).to(device)
        masks = torch.stack([b["mask"] for b in batch])
        with D.autocast(device, amp_dtype):
            pred = model(images).float().argmax(1).cpu()
        meter.update(pred, masks)
        for x, y, p in zip(images.cpu().numpy(), masks.numpy(), pred.numpy()):
            if len(kept) < keep:
                kept.append((x, y, p))
    model.train(was_training)
    scored = int(meter.confusion.sum())  # annotated pixels (the ignore index left out)
    return {**meter.compute(), "n_items": len(dataset), "n_pixels": scored}, kept


def _score(metrics: dict[str, Any]) -> float:
    """What selection maximizes: the foreground mean Dice (0 when no class could be scored)."""
    v = metrics["mean_dice"]
    return 0.0 if math.isnan(v) else float(v)


@dataclass
class SegmentEvalHook(ValidationHook):
    """Validation of a segmenter: the foreground mean Dice on the validation split
    (`ValidationHook`: the best weights, early stopping, ranks agreeing)."""

    classes: MaskClasses | None = None
    metric_name = "mean Dice"

    def evaluate(self, trainer: Trainer) -> dict[str, Any]:
        assert self.classes is not None
        m, _ = evaluate_masks(
            self.model, self.val, self.classes, self.device, self.batch_size, trainer.amp_dtype
        )
        return m

    def score(self, m: dict[str, Any]) -> float:
        return _score(m)

    def logged(self, m: dict[str, Any]) -> dict[str, float]:
        return {"val_mean_dice": _score(m), "val_mean_iou": _finite(m["mean_iou"])}


def _finite(v: Any) -> Any:
    """NaN (a class nothing scored) as None, so results.json is strict JSON."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    return v


def _refuse_classification_options(recipe: Recipe) -> None:
    """Options that only mean something for a classifier, set away from their defaults."""
    ft = recipe.finetune
    set_here = {
        "finetune.linear_probe": ft.linear_probe,
        "finetune.head_init=probe": ft.head_init == "probe",
        "finetune.mixup": ft.mixup > 0,
        "finetune.cutmix": ft.cutmix > 0,
        "finetune.class_weighting": ft.class_weighting != "none",
        "finetune.lr_grid": bool(ft.lr_grid),
    }
    named = [k for k, v in set_here.items() if v]
    if named:
        raise UserError(
            f"{', '.join(named)}: not available with finetune.task=segment (a classifier's "
            "option); unset it"
        )


def _arch_and_init(init: str | None) -> tuple[Literal["beit", "unet"], str | None, str]:
    """(architecture, resolved init or None, the init's name for results.json)."""
    if init is not None and init.lower() in UNET_INITS:
        return "unet", None, "unet"
    resolved = resolve_init(init)
    if resolved is not None and timm_arch(resolved) is not None:
        raise UserError(
            f"finetune.init {init}: a timm network is a classifier here; a segmentation "
            "fine-tune takes scratch, a pretrain run folder, BEiT weights, or unet (MONAI's "
            "U-Net from scratch)"
        )
    return "beit", resolved, resolved or "scratch"


def finetune_segment(
    recipe: Recipe, out: str | Path, **options: Unpack[JobOptions]
) -> dict[str, Any]:
    """Fine-tunes a segmenter on `finetune.labels` of the train split's annotated images;
    returns the test metrics (results.json).

    `options` (`JobOptions`): device, resume, overwrite, quiet, trust_pickle.

    Raises:
        MaskError: a mask that is unreadable, not its image's size, or holds values outside
            `segment.classes` (names both files), before the run folder is created.
        UserError: classification-only options, an init that is not a BEiT backbone.
    """
    ft, seg = recipe.finetune, recipe.segment
    if ft.task != "segment":
        raise UserError(f"finetune_segment: finetune.task is {ft.task!r}, not 'segment'")
    _refuse_classification_options(recipe)
    classes = MaskClasses.from_config(seg)
    arch, init, init_name = _arch_and_init(ft.init)
    size = recipe.data.image_size
    if arch == "unet" and size % 8:
        raise UserError(f"data.image_size={size}: the U-Net needs a multiple of 8 (e.g. 32, 64)")
    job = Job.open("finetune", recipe, out, **options)
    data = segment_data(recipe, classes)  # every mask checked here, before any write
    cfg = backbone_config(
        recipe, grad_checkpointing=ft.train.grad_checkpointing, drop_path=ft.drop_path
    )
    model = build_segmenter(
        arch, cfg, classes, decoder=seg.decoder, channels=seg.decoder_channels, blocks=seg.blocks
    )
    report = load_init(model, init, recipe, trust_pickle=job.trust_pickle)
    if report is not None:
        job.say("%s", report)
    model.to(job.device)
    job.start(data.fingerprint, init=init_name, task="segment")
    job.write_labels_used(
        ["path", "mask", "split"],
        ([image, mask, split] for split, files in data.files.items() for image, mask in files),
        data.subset,
    )
    if report is not None:
        job.write_json("init_report.json", report.__dict__)

    plan = job.plan(data.train)
    if not job.quiet and job.device.type == "cpu":  # a long CPU run is said before it starts
        from beitdomain.engine.train.estimate import announce_cpu_time, model_forward_gflops

        gflops = model_forward_gflops(model, recipe.data.in_chans, size)
        announce_cpu_time(job, plan.total_steps, plan.global_batch, gflops)
    ema = weight_ema(model, ft.ema)
    hook = SegmentEvalHook.for_fine_tune(
        model if ema is None else ema.module,  # validation scores and keeps the average
        data.val,
        plan,
        ft,
        job.path / BEST_FILE,
        job.device,
        16,
        classes=classes,
    )
    # As for classification: layer decay keeps what a pre-trained backbone learned; a random
    # one (or the U-Net) trains every layer at the full lr.
    layer_decay = ft.optim.layer_decay if is_pretrained(init) else None
    if isinstance(model, BeitSegmenter):
        groups = layer_decay_param_groups(
            model, lr=1.0, weight_decay=ft.optim.weight_decay, layer_decay=layer_decay or 1.0
        )
    else:
        groups = param_groups_weight_decay(model, ft.optim.weight_decay)
    hooks = [hook] if ema is None else [ema, hook]  # the average first, as for classification
    trainer = job.trainer(model, plan, groups, SegmentStep(classes.ignore_index), hooks=hooks)
    state = job.fit(trainer)

    results: dict[str, Any] = {}
    if job.is_main:
        if (job.path / BEST_FILE).is_file() and data.val is not None:
            from beitdomain.engine.predict import load_weights

            load_weights(model, job.path / BEST_FILE)
        else:  # no validation: the final weights (or their average) are the result
            if ema is not None:
                ema.copy_to(model)
            save_weights(model, job.path / BEST_FILE)
        sub = data.subset
        results = {
            "task": "segment",
            "init": init_name,
            "arch": arch,
            "labels": sub["spec"],
            "n_labels": sub["n_labels"],  # annotated image files
            "n_train": sub["n_train"],
            "fraction": sub["fraction"],
            "splits": sub.get("splits"),
            "seed": recipe.seed,
            "lr": job.peak_lr,
            "steps": state.step,
            "best_step": hook.best_step or state.step,
            "val_best": hook.best,
            "select_metric": "mean_dice",
            "selection": sub.get("selection"),
            "layer_decay": layer_decay,
            "stopped_early": state.stop_reason,
            "classes": list(classes.names),
            "ignore_index": classes.ignore_index,
        }
        results["warnings"] = warnings = []
        shown = data.test
        if data.test is None:
            warnings.append(
                "no test images, so no test metrics: the labels' split column has no 'test' "
                "rows (or data.test_fraction is 0); add test rows to score the model"
            )
            shown = data.val or data.train
        assert shown is not None
        metrics, kept = evaluate_masks(
            model, shown, classes, job.device, hook.batch_size, job.amp_dtype, keep=SHEET_ROWS
        )
        if data.test is not None:
            metrics["n_images"] = len(data.files["test"])
            results["test"] = _finite(metrics)
        images, truths, preds = zip(*kept)
        mask_contact_sheet(images, truths, preds, job.path / SHEET_FILE, classes.ignore_index)
        for w in warnings:
            log.warning("%s: %s", job.path, w)
        job.write_json(RESULTS_FILE, results)
        try:
            from beitdomain.eval.plots import plot_training_curves

            keys = ["loss", "val_mean_dice"] if data.val is not None else ["loss"]
            plot_training_curves(job.path / "metrics.jsonl", job.path / "training_curves.png", keys)
        except Exception as e:  # a plot must never fail a finished run
            log.warning("could not draw training curves: %s", e)
    job.finish({k: v for k, v in results.items() if k != "classes"})
    return results


def predict_masks(
    run: str | Path,
    inputs: Sequence[str],
    out_dir: str | Path,
    device: str = "auto",
    *,
    on_error: str = "skip",
    nonfinite: str | None = None,
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Writes a predicted mask (pixel value = class index) for every image of `inputs` (files
    and folders) with a finished segmentation run: a PNG label map per 2D image or frame, a
    NIfTI label volume on the input's grid and affine per NIfTI volume; returns the written
    paths and the skipped files as (path, reason).

    Each image goes through the run's reader settings and is resized whole to the run's
    `data.image_size`, as its test split was; the logits are resized back (bilinear) to the
    image's own size before the argmax, so the mask has the image's grid. ``a/x.tif`` is
    written to ``out_dir/a/x.png``, frame k of a multi-frame file (or of an NRRD/MetaImage
    volume) to ``x_k.png``, ``a/v.nii.gz`` to ``out_dir/a/v.nii.gz``. Every frame and slice is
    predicted, whatever the run's `data.frames`.

    Raises:
        UserError: not a finished segmentation run, a missing input, a bad option; with
            ``on_error='fail'``, the first file that cannot be read.
    """
    import json

    from PIL import Image

    from beitdomain.config import load_recipe
    from beitdomain.data.index import scan
    from beitdomain.data.transforms import SegmentTransform
    from beitdomain.engine.job import RECIPE_FILE, is_finished
    from beitdomain.engine.predict import load_weights
    from beitdomain.fileio import atomic_write_bytes
    from beitdomain.io import IntensitySpec, ReaderError, load_image

    if on_error not in ("fail", "skip"):
        raise UserError(f"on_error={on_error!r}; valid: fail, skip")
    if nonfinite not in (None, "error", "zero"):
        raise UserError(f"nonfinite={nonfinite!r}; valid: error, zero")
    run = Path(run)
    if not is_finished(run, "finetune"):
        raise UserError(
            f"{run} is not a finished fine-tuning run (no {RESULTS_FILE} / {BEST_FILE})"
        )
    recipe = load_recipe(run / RECIPE_FILE)
    if recipe.finetune.task != "segment":
        raise UserError(f"{run} is a classification run; predict writes its CSV, not masks")
    if nonfinite is not None:
        recipe = replace(recipe, data=replace(recipe.data, nonfinite=nonfinite))
    classes = MaskClasses.from_config(recipe.segment)
    saved = json.loads((run / RESULTS_FILE).read_text())
    arch: Literal["beit", "unet"] = "unet" if saved.get("arch") == "unet" else "beit"
    seg = recipe.segment
    cfg = backbone_config(recipe, drop_path=0.0)
    model = build_segmenter(
        arch, cfg, classes, decoder=seg.decoder, channels=seg.decoder_channels, blocks=seg.blocks
    )
    load_weights(model, run / BEST_FILE)
    dev = D.resolve_device(device)
    model.to(dev).eval()
    amp_dtype = D.resolve_precision(recipe.finetune.train.precision, dev)
    # every frame and slice: a volume's mask covers the whole volume
    spec = replace(IntensitySpec.from_config(recipe.data), frames="all")
    view = SegmentTransform(train=False, image_size=recipe.data.image_size)
    files: list[tuple[str, Path]] = []
    skipped: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            m = scan(p, on_error=on_error)
            files += [(e.path, m.abspath(e)) for e in m.entries]
            skipped += m.errors
        elif p.is_file():
            files.append((p.name, p))
        else:
            raise UserError(f"{item}: no such file or folder")
    out_dir = Path(out_dir).expanduser()
    dtype = np.uint8 if classes.num_classes <= 256 else np.uint16
    written: list[Path] = []
    with torch.no_grad():
        for name, path in files:
            try:
                image, meta = load_image(path, spec)
            except ReaderError as e:
                if on_error == "fail":
                    raise
                skipped.append((name, e.reason))
                continue
            frames = image if image.ndim == 4 else image[None]  # [S, C, H, W]
            height, width = frames.shape[-2:]
            blank = np.zeros((height, width), np.int64)
            masks = np.empty((len(frames), height, width), dtype)
            for start in range(0, len(frames), PREDICT_BATCH):
                chunk = frames[start : start + PREDICT_BATCH]
                x = torch.stack([torch.from_numpy(view(f, blank)[0]) for f in chunk]).to(dev)
                with D.autocast(dev, amp_dtype):
                    logits = model(x).float()
                logits = F.interpolate(logits, size=(height, width), mode="bilinear")
                masks[start : start + len(chunk)] = logits.argmax(1).cpu().numpy()
            stem = Path(name).with_suffix("")
            if stem.suffix.lower() == ".nii":  # x.nii.gz
                stem = stem.with_suffix("")
            if meta.get("volume") and meta.get("format") == "nifti":
                # a NIfTI label volume on the input's grid, with its affine
                target = out_dir / f"{stem}.nii.gz"
                target.parent.mkdir(parents=True, exist_ok=True)
                written.append(write_nifti_mask(path, masks, spec.slice_axis, target))
                continue
            for k, mask in enumerate(masks):
                target = out_dir / (f"{stem}_{k}.png" if len(masks) > 1 else f"{stem}.png")
                buf = io.BytesIO()
                Image.fromarray(mask).save(buf, format="PNG")
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(target, buf.getvalue())
                written.append(target)
    return written, skipped


def is_segment_run(run: str | Path) -> bool:
    """Whether `run` holds a finished segmentation fine-tune (its results.json says so)."""
    import json

    path = Path(run) / RESULTS_FILE
    try:
        return json.loads(path.read_text()).get("task") == "segment"
    except (OSError, ValueError, AttributeError):
        return False
