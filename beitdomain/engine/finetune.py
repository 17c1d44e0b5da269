"""`beitdomain finetune`: a classifier from a few labels.

Mean-pooled patch features -> LayerNorm -> linear head (small init), layer-wise lr decay, drop
path, label smoothing; the validation split picks the best checkpoint; the test split is scored
once, at the end, with the best weights. The exact images used are written into the run folder.
`predict` (engine/predict.py) applies a finished run to new images; `finetune.lr_grid` runs one
fine-tune per learning rate (`finetune_lr_grid`, below).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from beitdomain.config import Recipe
from beitdomain.data.labeled import LabeledData, labeled_data
from beitdomain.data.transforms import FinetuneTransform
from beitdomain.engine.build import (
    backbone_config,
    build_classifier,
    is_pretrained,
    load_init,
    resolve_init,
)
from beitdomain.engine.job import (
    BEST_FILE,
    RESULTS_FILE,
    Job,
    JobOptions,
)
from beitdomain.engine.predict import load_weights, predict_probs, write_predictions
from beitdomain.engine.segment import finetune_segment
from beitdomain.engine.train.ema import weight_ema
from beitdomain.engine.train.estimate import (
    announce_cpu_time,
    backbone_forward_gflops,
    model_forward_gflops,
)
from beitdomain.engine.train.loop import Trainer
from beitdomain.engine.train.selection import ValidationHook, save_weights
from beitdomain.eval.metrics import classification_metrics
from beitdomain.eval.plots import plot_confusion_matrix, plot_training_curves
from beitdomain.models.classifier import (
    BeitClassifier,
    freeze_backbone,
    layer_decay_param_groups,
    param_groups_weight_decay,
)
from beitdomain.models.cnn import (
    TimmClassifier,
    freeze_timm_backbone,
    recalibrate_batchnorm,
)
from beitdomain.models.probe import dataset_features, fit_probe_head
from beitdomain.user import UserError

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger(__name__)


@dataclass
class EvalHook(ValidationHook):
    """Validation of a classifier: `select_metric` on the validation split (`ValidationHook`)."""

    classes: list[str] = field(default_factory=list)
    metric: str = "balanced_accuracy"

    @property
    def metric_name(self) -> str:  # type: ignore[override]
        return self.metric

    def evaluate(self, trainer: Trainer) -> dict[str, Any]:
        probs, y, _ = predict_probs(
            self.model, self.val, self.device, self.batch_size, trainer.amp_dtype
        )
        m = classification_metrics(y, probs, self.classes)
        m["loss"] = float(
            F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), torch.from_numpy(y))
        )
        return m

    def score(self, m: dict[str, Any]) -> float:
        score = -m["loss"] if self.metric == "loss" else m.get(self.metric)
        return m["balanced_accuracy"] if score is None else score  # AUROC can be undefined

    def logged(self, m: dict[str, Any]) -> dict[str, float]:
        keys = ("loss", "accuracy", "balanced_accuracy", "macro_f1", "auroc")
        return {f"val_{k}": m[k] for k in keys if m.get(k) is not None}


class SeededMixup:
    """timm's `Mixup`, its draws from a stream a checkpoint restores (a trainer hook).

    timm draws each batch's lambda, its mixup-or-cutmix choice and its box from NumPy's global
    RNG, which no checkpoint holds, so a resumed run mixed other batches than the run it
    continues. Here call n draws from NumPy's global RNG seeded from (seed, rank, n) for the
    call alone (the global state is put back after): a checkpoint records n, every rank mixes
    with its own draws, and the global RNG is left as it was.
    """

    def __init__(self, mixup: Any, seed: int, rank: int) -> None:
        self.mixup, self.seed, self.rank, self.calls = mixup, seed % 2**63, rank, 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq = np.random.SeedSequence([self.seed, self.rank, self.calls])
        draws = np.random.RandomState(np.random.MT19937(seq)).get_state()
        self.calls += 1
        outer = np.random.get_state()
        np.random.set_state(draws)
        try:
            return self.mixup(x, y)
        finally:
            np.random.set_state(outer)

    def on_step_end(self, trainer: Trainer) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.calls = int(s["calls"])


def _mixup(recipe: Recipe, data: LabeledData, rank: int) -> SeededMixup | None:
    """`finetune.mixup` / `finetune.cutmix` as a `SeededMixup`; None when both are off."""
    ft = recipe.finetune
    if ft.mixup <= 0 and ft.cutmix <= 0:
        return None
    from timm.data import Mixup

    mixup = Mixup(
        mixup_alpha=ft.mixup,
        cutmix_alpha=ft.cutmix,
        label_smoothing=ft.label_smoothing,
        num_classes=len(data.classes),
    )
    return SeededMixup(mixup, recipe.seed, rank)


class ClassifierStep:
    """One fine-tuning step's loss on a batch: cross-entropy of the logits (float32), with
    optional class weights and label smoothing; with mixup, the soft labels' cross-entropy on
    even batches.

    A `StepFn` (`step(model, batch) -> (loss, metrics)`): the job and
    `benchmarks/finetune_step.py` run this one step.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        mixup: SeededMixup | None = None,
    ) -> None:
        self.weight = weight
        self.label_smoothing = label_smoothing
        self.mixup = mixup

    @classmethod
    def of(
        cls, recipe: Recipe, data: LabeledData, device: torch.device, mixup: SeededMixup | None
    ) -> ClassifierStep:
        """The step `finetune.class_weighting` and `finetune.label_smoothing` ask for."""
        ft = recipe.finetune
        weight = None
        if ft.class_weighting == "loss":
            counts = torch.tensor(data.class_counts, dtype=torch.float32).clamp_min(1)
            weight = (counts.sum() / (len(counts) * counts)).to(device)
        return cls(weight, ft.label_smoothing, mixup)

    def __call__(
        self, model: nn.Module, b: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = b["image"], b["label"]
        if self.mixup is not None and x.shape[0] % 2 == 0:
            x, soft = self.mixup(x, y)
            logits = model(x)
            per = -(soft * F.log_softmax(logits.float(), -1))
            if self.weight is not None:
                per = per * self.weight
            return per.sum(-1).mean(), {}
        logits = model(x)
        ce = F.cross_entropy(
            logits.float(), y, weight=self.weight, label_smoothing=self.label_smoothing
        )
        return ce, {"train_acc": (logits.argmax(-1) == y).float().mean().detach()}


def _build_model(job: Job, data: LabeledData) -> tuple[BeitClassifier | TimmClassifier, Any]:
    """The classifier, its backbone loaded from `finetune.init`, its head from a probe if asked."""
    recipe, ft = job.recipe, job.recipe.finetune
    init = resolve_init(ft.init)
    model = build_classifier(replace(recipe, finetune=replace(ft, init=init)), len(data.classes))
    report = load_init(model, init, recipe, trust_pickle=job.trust_pickle)
    if report is not None:
        job.say("%s", report)
    if ft.linear_probe:
        if isinstance(model, TimmClassifier):
            freeze_timm_backbone(model)
        else:
            freeze_backbone(model)
    model.to(job.device)
    plain = copy.copy(data.train)  # the training labels without augmentation
    plain.transform = FinetuneTransform(train=False, image_size=recipe.data.image_size)
    # A random CNN's BatchNorm statistics (0 and 1) describe no image: a probe head, or a
    # frozen backbone's features, read them. (A resumed run loads its checkpoint over both.)
    if (
        isinstance(model, TimmClassifier)
        and (ft.head_init == "probe" or ft.linear_probe)
        and recalibrate_batchnorm(model, plain, job.device, amp_dtype=job.amp_dtype)
    ):
        job.say("BatchNorm statistics of the random network set from the training images")
    if ft.head_init == "probe":
        X, y = dataset_features(model, plain, job.device, amp_dtype=job.amp_dtype)
        probe = fit_probe_head(model, X, y, c=ft.probe_c, balanced=ft.class_weighting != "none")
        job.say("head from a linear probe: %s", probe)
        job.write_json("head_probe.json", probe)
    return model, report


def finetune(recipe: Recipe, out: str | Path, **options: Unpack[JobOptions]) -> dict[str, Any]:
    """Fine-tunes on `finetune.labels` of the train split; returns the test metrics.

    With `finetune.task: segment` it is `engine.segment.finetune_segment` (masks as labels).

    Writes `results.json`, `confusion_matrix.png`, `test_predictions.csv`, `labels_used.csv`,
    `labels.json`, `best.safetensors`, `training_curves.png`, metrics and checkpoints.
    `options` (`JobOptions`): device, resume, overwrite, quiet, and trust_pickle, which allows
    a pickle-based `finetune.init` (it can run code: trusted files only).
    """
    ft = recipe.finetune
    if ft.task == "segment":  # masks as labels: the same job on (image, mask) pairs
        return finetune_segment(recipe, out, **options)
    if ft.lr_grid:
        return finetune_lr_grid(recipe, out, **options)
    job = Job.open("finetune", recipe, out, **options)
    # impossible label requests fail here, before any training
    data = labeled_data(recipe, progress=not job.quiet, report_dir=job.path)
    model, report = _build_model(job, data)
    init = resolve_init(ft.init) or "scratch"
    job.start(data.fingerprint, init=init)
    job.write_labels_used(
        ["path", "split"],
        ([f, split] for split, files in data.files.items() for f in files),
        {**data.subset, "classes": data.classes},
    )
    if report is not None:
        job.write_json("init_report.json", report.__dict__)

    weights = None
    if ft.class_weighting == "sampler":
        counts = np.asarray(data.class_counts, dtype=float)
        labels = [
            data.train.label_index(data.train.source.label(int(i))) for i in data.train.indices
        ]
        weights = (1.0 / np.maximum(counts[labels], 1)).tolist()
    plan = job.plan(data.train, weights=weights)
    if not job.quiet:  # a curve's cells run quietly; one warning per cell would drown the log
        gflops = (
            model_forward_gflops(model, recipe.data.in_chans, recipe.data.image_size)
            if isinstance(model, TimmClassifier)
            else backbone_forward_gflops(backbone_config(recipe))
        )
        announce_cpu_time(job, plan.total_steps, plan.global_batch, gflops)
    ema = weight_ema(model, ft.ema)  # after the head's probe: it averages from the start
    hook = EvalHook.for_fine_tune(
        model if ema is None else ema.module,  # validation scores and keeps the average
        data.val,
        plan,
        ft,
        job.path / BEST_FILE,
        job.device,
        32,
        classes=data.classes,
        metric=ft.select_metric,
    )
    eval_batch = hook.batch_size
    # Layer decay keeps pre-trained lower layers close to what they learned; a random backbone
    # has nothing to keep (at depth 12 and 0.65 its patch embedding would train at 0.4% of the
    # head's lr), so it trains every layer at the full lr, as unilm's and DeiT's scratch runs do.
    layer_decay = ft.optim.layer_decay if is_pretrained(resolve_init(ft.init)) else None
    if isinstance(model, TimmClassifier):
        groups = param_groups_weight_decay(model, ft.optim.weight_decay)
    else:
        groups = layer_decay_param_groups(
            model, lr=1.0, weight_decay=ft.optim.weight_decay, layer_decay=layer_decay or 1.0
        )
    mixup = _mixup(recipe, data, job.dist.rank)
    loss = ClassifierStep.of(recipe, data, job.device, mixup)
    # the hooks' order is their checkpoint key: the mixup stream comes after the EvalHook; the
    # average, when there is one, before it (it is updated first, so validation sees this step)
    hooks = [] if ema is None else [ema]
    hooks += [hook] if mixup is None else [hook, mixup]
    trainer = job.trainer(model, plan, groups, loss, hooks=hooks)
    state = job.fit(trainer)

    results: dict[str, Any] = {}
    if job.is_main:
        if (job.path / BEST_FILE).is_file():
            load_weights(model, job.path / BEST_FILE)
        else:  # no validation split: the final weights (or their average) are the result
            if ema is not None:
                ema.copy_to(model)
            save_weights(model, job.path / BEST_FILE)
        results = {
            "init": init,
            "labels": data.subset["spec"],
            "n_labels": data.subset["n_labels"],
            "n_train": data.subset["n_train"],
            "fraction": data.subset["fraction"],
            "splits": data.subset.get("splits"),  # images, items and groups per split
            "seed": recipe.seed,
            "lr": job.peak_lr,  # the schedule's peak learning rate
            "steps": state.step,
            "best_step": hook.best_step or state.step,
            "val_best": hook.best,  # the selection score (-loss when select_metric is loss)
            "select_metric": ft.select_metric,
            "selection": data.subset.get("selection"),  # what selection looked at
            "layer_decay": layer_decay,
            "ema": ft.ema or None,
            "stopped_early": state.stop_reason,
            "classes": data.classes,
        }
        results["warnings"] = warnings = []
        if data.test is None:
            warnings.append(
                "no test images, so no test metrics: the labels' split column has no 'test' "
                "rows (or data.test_fraction is 0); add test rows to score the model"
            )
        if data.test is not None:
            probs, y, idx = predict_probs(model, data.test, job.device, eval_batch, job.amp_dtype)
            metrics = classification_metrics(y, probs, data.classes)
            results["test"] = metrics
            absent = [c for k, c in enumerate(data.classes) if not np.any(np.asarray(y) == k)]
            if absent:
                metrics["absent_classes"] = absent
                warnings.append(
                    f"the test split has no images of {absent}: balanced accuracy, macro F1 and "
                    f"AUROC average over classes it cannot score; add test images of every class"
                )
            plot_confusion_matrix(
                metrics["confusion_matrix"], data.classes, job.path / "confusion_matrix.png"
            )
            write_predictions(
                job.path / "test_predictions.csv", data.test, idx, probs, data.classes
            )
        for w in warnings:
            log.warning("%s: %s", job.path, w)
        job.write_json(RESULTS_FILE, results)
        try:
            plot_training_curves(
                job.path / "metrics.jsonl",
                job.path / "training_curves.png",
                ["loss", "val_balanced_accuracy"],
            )
        except Exception as e:  # a plot must never fail a finished run
            log.warning("could not draw training curves: %s", e)
    job.finish({k: v for k, v in results.items() if k != "classes"})
    return results


# --- finetune.lr_grid: one fine-tune per learning rate, the best on validation is the result.
# Each learning rate is an ordinary fine-tune in `out/lr-<value>/`; the one with the best
# validation `finetune.select_metric` is copied into `out`, so `predict` and `curve` read a grid's
# folder like any fine-tuning run. A grid that was cut off skips the learning rates it finished.

# What a grid's chosen fine-tune leaves in the grid's own folder.
CHOSEN_FILES = (
    BEST_FILE,
    "test_predictions.csv",
    "confusion_matrix.png",
    "labels_used.csv",
    "labels.json",
    "training_curves.png",
    "head_probe.json",
)


def finetune_lr_grid(
    recipe: Recipe, out: str | Path, **options: Unpack[JobOptions]
) -> dict[str, Any]:
    """Runs the grid in `out/lr-<value>/`; returns the chosen fine-tune's results plus
    `lr_grid` (every learning rate's best validation score)."""
    ft = recipe.finetune
    job = Job.open("finetune", recipe, out, **options)
    if labeled_data(recipe, progress=False, report_dir=job.path).val is None:  # before training
        if recipe.finetune.selection == "none":
            raise UserError(
                f"finetune.lr_grid {list(ft.lr_grid)} picks a learning rate on validation, and "
                "finetune.selection is 'none' (a fixed schedule: nothing to select on). Give one "
                "lr (finetune.optim.lr), or set finetune.selection=carve (validate on a fifth of "
                "the labels) or outside (the split's validation images, beyond the budget)"
            )
        raise UserError(
            "finetune.lr_grid picks the learning rate on the validation split, and this run has "
            "none: set data.val_fraction > 0, or give val rows in the labels CSV"
        )
    job.start()
    tried: list[dict[str, Any]] = []
    chosen: tuple[float, Path, dict[str, Any]] | None = None
    for lr in ft.lr_grid:
        sub = job.path / f"lr-{lr:g}"
        one = replace(recipe, finetune=replace(ft, lr_grid=[], optim=replace(ft.optim, lr=lr)))
        if (sub / RESULTS_FILE).is_file():  # finished before an interruption
            res = json.loads((sub / RESULTS_FILE).read_text())
        else:
            res = finetune(one, sub, **{**options, "resume": True, "overwrite": False})
        tried.append({"lr": lr, "val_best": res.get("val_best"), "best_step": res.get("best_step")})
        if job.is_main and (chosen is None or res["val_best"] > chosen[2]["val_best"]):
            chosen = (lr, sub, res)
    results: dict[str, Any] = {}
    if job.is_main and chosen is not None:
        lr, sub, res = chosen
        for name in CHOSEN_FILES:
            if (sub / name).is_file():
                shutil.copyfile(sub / name, job.path / name)
        results = {**res, "lr": lr, "lr_grid": tried}
        job.write_json(RESULTS_FILE, results)
        job.say(
            "lr grid: %s -> lr %g",
            ", ".join(f"{t['lr']:g}: {t['val_best']:.4f}" for t in tried),
            lr,
        )
    job.finish({k: v for k, v in results.items() if k != "classes"})
    return results
