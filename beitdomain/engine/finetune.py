"""`beitdomain finetune`: a classifier from a few labels, and `beitdomain predict`.

Mean-pooled patch features -> LayerNorm -> linear head (small init), layer-wise lr decay, drop
path, label smoothing; the validation split picks the best checkpoint; the test split is scored
once, at the end, with the best weights. The exact images used are written into the run folder.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from beitdomain.config import Recipe, load_recipe
from beitdomain.data.transforms import FinetuneTransform
from beitdomain.engine import distributed as D
from beitdomain.engine.build import backbone_config
from beitdomain.engine.data import LabeledData, labeled_data
from beitdomain.engine.loop import Trainer, plan_run, prepare_for_training
from beitdomain.engine.optim import build_adamw, lr_schedule
from beitdomain.engine.pretrain import BACKBONE_FILE
from beitdomain.engine.rundir import RunDir
from beitdomain.eval.metrics import classification_metrics
from beitdomain.eval.plots import plot_confusion_matrix, plot_training_curves
from beitdomain.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from beitdomain.models.classifier import BeitClassifier, freeze_backbone, layer_decay_param_groups
from beitdomain.models.convert import load_backbone_weights
from beitdomain.user import UserError

log = logging.getLogger(__name__)
BEST_FILE = "best.safetensors"
SCRATCH = ("scratch", "none", "random")


def resolve_init(init: str | None) -> str | None:
    """`scratch` -> None; a pre-training run folder -> its exported backbone; else the path."""
    if init is None or init.lower() in SCRATCH:
        return None
    p = Path(init)
    if p.is_dir() and (p / BACKBONE_FILE).is_file():
        return str(p / BACKBONE_FILE)
    if p.is_dir() and (p / "recipe.yaml").is_file() and not (p / "config.json").is_file():
        raise UserError(
            f"{p} is a run folder without {BACKBONE_FILE}: it has not finished pre-training. "
            f"Resume it (beitdomain pretrain --out {p} --resume) or export its newest checkpoint "
            f"(beitdomain pretrain export {p})"
        )
    if not p.exists():
        raise UserError(f"--init {init}: no such file or folder (or use --init scratch)")
    return str(p)


def build_classifier(recipe: Recipe, num_classes: int) -> BeitClassifier:
    ft = recipe.finetune
    # Fine-tuning gives every block its own relative position table (BEiT's recipe); a shared
    # pre-trained table is copied into each by the weight loader.
    cfg = backbone_config(recipe, drop_path=ft.drop_path).replace(use_shared_rel_pos_bias=False)
    return BeitClassifier.from_config(cfg, num_classes, head_init_scale=ft.head_init_scale)


@torch.no_grad()
def _eval_outputs(
    forward: Any,
    model: nn.Module,
    dataset: Any,
    device: torch.device,
    batch_size: int,
    amp_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """`forward(images)` over a dataset in eval mode, in order: (outputs, labels, source index)."""
    was = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=0
    )
    outs, labels, index = [], [], []
    for b in loader:
        with D.autocast(device, amp_dtype):
            outs.append(forward(b["image"].to(device, non_blocking=True)).float().cpu())
        labels.append(b["label"])
        index.append(b["index"])
    model.train(was)
    return torch.cat(outs), torch.cat(labels).numpy(), torch.cat(index).numpy()


def predict_probs(
    model: nn.Module,
    dataset: Any,
    device: torch.device,
    batch_size: int = 64,
    amp_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class probabilities for a dataset, in order: (probs [N, K], labels [N], source index [N])."""
    logits, labels, index = _eval_outputs(model, model, dataset, device, batch_size, amp_dtype)
    return logits.softmax(-1).numpy(), labels, index


def pooled_features(
    model: BeitClassifier,
    dataset: Any,
    device: torch.device,
    batch_size: int = 64,
    amp_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The head's inputs (pooled, normalized features) for a dataset in eval mode: (X [N, D], y)."""
    feats, labels, _ = _eval_outputs(
        model.forward_features, model, dataset, device, batch_size, amp_dtype
    )
    return feats.numpy().astype(np.float64), labels


def fit_probe_head(
    model: BeitClassifier,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    c: float = 0.1,
    balanced: bool = False,
) -> dict[str, Any]:
    """Sets the head to an L2-regularized logistic regression fitted on frozen features.

    The features are standardized for the fit and the standardization is folded into the
    head's weights, so `head(x) = w . (x - mu) / sigma + b` exactly. With two classes, the
    binary model's logit `z` becomes the logits `(-z/2, z/2)`, the same softmax. Returns what
    was fitted (accuracy on the features it was fitted on); leaves the head untouched, with a
    reason, when the labels hold a single class.
    """
    from sklearn.linear_model import LogisticRegression

    classes = np.unique(labels)
    if len(classes) < 2:
        return {"fitted": False, "reason": f"one class only in {len(labels)} labels"}
    mu = features.mean(0)
    sigma = features.std(0) + 1e-6
    z = (features - mu) / sigma
    clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced" if balanced else None).fit(
        z, labels
    )
    k = model.num_classes
    coef = np.zeros((k, features.shape[1]))
    bias = np.full(k, -30.0)  # a class with no training label starts (almost) never predicted
    if clf.coef_.shape[0] == 1:  # binary: one logit for classes_[1] against classes_[0]
        coef[classes[1]], bias[classes[1]] = clf.coef_[0] / 2, clf.intercept_[0] / 2
        coef[classes[0]], bias[classes[0]] = -clf.coef_[0] / 2, -clf.intercept_[0] / 2
    else:
        coef[classes], bias[classes] = clf.coef_, clf.intercept_
    weight = coef / sigma
    bias = bias - weight @ mu
    head = model.head
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
    return {"fitted": True, "c": c, "n": len(labels), "train_accuracy": float(clf.score(z, labels))}


@dataclass
class EvalHook:
    """Validates every `every` steps; keeps the best weights; optional early stopping."""

    model: BeitClassifier
    val: Any
    classes: list[str]
    metric: str
    every: int
    out: Path | None
    patience: int | None
    device: torch.device
    batch_size: int
    best: float | None = None
    best_step: int = 0
    bad_evals: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def evaluate(self, trainer: Trainer) -> dict[str, Any]:
        probs, y, _ = predict_probs(
            self.model, self.val, self.device, self.batch_size, trainer.amp_dtype
        )
        m = classification_metrics(y, probs, self.classes)
        m["loss"] = float(
            F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), torch.from_numpy(y))
        )
        return m

    def on_step_end(self, trainer: Trainer) -> None:
        step = trainer.state.step
        if self.val is None or not (step % self.every == 0 or step == trainer.total_steps):
            return
        m = self.evaluate(trainer)
        score = -m["loss"] if self.metric == "loss" else m.get(self.metric)
        if score is None:  # e.g. AUROC undefined on this validation split
            score = m["balanced_accuracy"]
        trainer.log(
            **{
                f"val_{k}": m[k]
                for k in ("loss", "accuracy", "balanced_accuracy", "macro_f1", "auroc")
                if m.get(k) is not None
            }
        )
        self.history.append({"step": step, "score": score})
        if self.best is None or score > self.best:
            self.best, self.best_step, self.bad_evals = score, step, 0
            if self.out is not None and trainer.dist.is_main:
                save_weights(self.model, self.out / BEST_FILE)
        else:
            self.bad_evals += 1
            if self.patience is not None and self.bad_evals >= self.patience:
                trainer.state.stop = True
                trainer.state.stop_reason = (
                    f"early stopping: no better validation {self.metric} for {self.bad_evals} "
                    f"evaluations (best {self.best:.4f} at step {self.best_step})"
                )
                log.info("%s", trainer.state.stop_reason)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.best, self.best_step, self.bad_evals = s["best"], s["best_step"], s["bad_evals"]


def save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in D.unwrap(model).state_dict().items()}
    atomic_write_bytes(path, save(state))


def load_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    D.unwrap(model).load_state_dict(load_file(str(path)))


def _write_labels_used(data: LabeledData, folder: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "split"])
    for split, files in data.files.items():
        for f in files:
            w.writerow([f, split])
    atomic_write_text(folder / "labels_used.csv", buf.getvalue())
    atomic_write_json(folder / "labels.json", {**data.subset, "classes": data.classes})


def _loss_fn(recipe: Recipe, data: LabeledData, device: torch.device):
    ft = recipe.finetune
    weight = None
    if ft.class_weighting == "loss":
        counts = torch.tensor(data.class_counts, dtype=torch.float32).clamp_min(1)
        weight = (counts.sum() / (len(counts) * counts)).to(device)
    mixup = None
    if ft.mixup > 0 or ft.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(
            mixup_alpha=ft.mixup,
            cutmix_alpha=ft.cutmix,
            label_smoothing=ft.label_smoothing,
            num_classes=len(data.classes),
        )

    def loss(model: nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = b["image"], b["label"]
        if mixup is not None and x.shape[0] % 2 == 0:
            x, soft = mixup(x, y)
            logits = model(x)
            per = -(soft * F.log_softmax(logits.float(), -1))
            if weight is not None:
                per = per * weight
            return per.sum(-1).mean(), {}
        logits = model(x)
        ce = F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=ft.label_smoothing)
        return ce, {"train_acc": (logits.argmax(-1) == y).float().mean().detach()}

    return loss


def finetune(
    recipe: Recipe,
    out: str | Path,
    *,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Fine-tunes on `finetune.labels` of the train split; returns the test metrics.

    Writes `results.json`, `confusion_matrix.png`, `test_predictions.csv`, `labels_used.csv`,
    `labels.json`, `best.safetensors`, `training_curves.png`, metrics and checkpoints.
    """
    ft = recipe.finetune
    if ft.lr_grid:
        return _finetune_lr_grid(
            recipe, out, device=device, resume=resume, overwrite=overwrite, quiet=quiet
        )
    dev = D.resolve_device(device)
    info = D.init_distributed(dev)
    run = RunDir.open(
        out,
        kind="finetune",
        resume=resume,
        overwrite=overwrite,
        is_main=info.is_main,
        recipe=recipe,
    )
    D.seed_everything(recipe.seed, ft.train.deterministic)
    data = labeled_data(
        recipe, progress=not quiet, report_dir=run.path
    )  # impossible label requests fail here, before any training
    init = resolve_init(ft.init)
    model = build_classifier(recipe, len(data.classes))
    report = None
    if init is not None:
        report = load_backbone_weights(
            model, init, in_chans=recipe.data.in_chans, trust_pickle=recipe.model.trust_pickle
        )
        log.log(logging.DEBUG if quiet else logging.INFO, "%s", report)
    if ft.linear_probe:
        freeze_backbone(model)
    model.to(dev)
    if ft.head_init == "probe":  # (a resumed run then loads its checkpoint over this head)
        plain = copy.copy(data.train)  # the training labels without augmentation
        plain.transform = FinetuneTransform(train=False, image_size=recipe.data.image_size)
        X, y = pooled_features(
            model, plain, dev, amp_dtype=D.resolve_precision(ft.train.precision, dev)
        )
        probe = fit_probe_head(model, X, y, c=ft.probe_c, balanced=ft.class_weighting != "none")
        log.log(logging.DEBUG if quiet else logging.INFO, "head from a linear probe: %s", probe)
        if info.is_main:
            atomic_write_json(run.path / "head_probe.json", probe)
    if info.is_main:
        run.start(
            "finetune", recipe, str(dev), data_fingerprint=data.fingerprint, init=init or "scratch"
        )
        _write_labels_used(data, run.path)
        if report is not None:
            atomic_write_json(run.path / "init_report.json", report.__dict__)

    t = ft.train
    weights = None
    if ft.class_weighting == "sampler":
        counts = np.asarray(data.class_counts, dtype=float)
        labels = [
            data.train.label_index(data.train.source.label(int(i))) for i in data.train.indices
        ]
        weights = (1.0 / np.maximum(counts[labels], 1)).tolist()
    plan = plan_run(
        data.train,
        t,
        seed=recipe.seed,
        num_workers=recipe.data.num_workers,
        device=dev,
        weights=weights,
    )
    total, global_batch, loader = plan.total_steps, plan.global_batch, plan.loader
    batch = loader.batch_sampler.batch_size
    groups = layer_decay_param_groups(
        model, lr=1.0, weight_decay=ft.optim.weight_decay, layer_decay=ft.optim.layer_decay or 1.0
    )
    optimizer = build_adamw(groups, ft.optim, dev)
    every = t.eval_every or max(len(loader), total // 20)
    hook = EvalHook(
        model,
        data.val,
        data.classes,
        ft.select_metric,
        every,
        run.path,
        ft.early_stopping,
        dev,
        max(batch, 32),
    )
    train_model = prepare_for_training(model, t, dev)
    trainer = Trainer(
        model=train_model,
        optimizer=optimizer,
        loader=loader,
        step_fn=_loss_fn(recipe, data, dev),
        lr_at=lr_schedule(ft.optim, total, global_batch),
        total_steps=total,
        train=t,
        grad_clip=ft.optim.grad_clip,
        device=dev,
        run=run,
        hooks=[hook],
        desc="finetune",
        quiet=quiet,
        tensorboard=t.tensorboard,
    )
    with run.recording_failures(info.is_main):
        state = trainer.fit(resume=resume)

    results: dict[str, Any] = {}
    if info.is_main:
        if (run.path / BEST_FILE).is_file():
            load_weights(model, run.path / BEST_FILE)
        else:  # no validation split: the final weights are the result
            save_weights(model, run.path / BEST_FILE)
        results = {
            "init": init or "scratch",
            "labels": data.subset["spec"],
            "n_labels": data.subset["n_labels"],
            "n_train": data.subset["n_train"],
            "fraction": data.subset["fraction"],
            "seed": recipe.seed,
            "lr": ft.optim.lr,  # the peak learning rate (an lr grid's choice, in a grid's run)
            "steps": state.step,
            "best_step": hook.best_step or state.step,
            "val_best": hook.best,  # the selection score (-loss when select_metric is loss)
            "select_metric": ft.select_metric,
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
            probs, y, idx = predict_probs(model, data.test, dev, max(batch, 32), trainer.amp_dtype)
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
                metrics["confusion_matrix"], data.classes, run.path / "confusion_matrix.png"
            )
            _write_predictions(
                run.path / "test_predictions.csv", data.test, idx, probs, data.classes
            )
        for w in warnings:
            log.warning("%s: %s", run.path, w)
        atomic_write_json(run.path / "results.json", results)
        try:
            plot_training_curves(
                run.path / "metrics.jsonl",
                run.path / "training_curves.png",
                ["loss", "val_balanced_accuracy"],
            )
        except Exception as e:  # a plot must never fail a finished run
            log.warning("could not draw training curves: %s", e)
        run.finish(result={k: v for k, v in results.items() if k != "classes"})
    D.barrier()
    return results


# What a grid's chosen fine-tune leaves in the grid's own folder, so `predict` and `curve` read
# it like any fine-tuning run.
_CHOSEN_FILES = (
    BEST_FILE,
    "test_predictions.csv",
    "confusion_matrix.png",
    "labels_used.csv",
    "labels.json",
    "training_curves.png",
    "head_probe.json",
)


def _finetune_lr_grid(
    recipe: Recipe,
    out: str | Path,
    *,
    device: str,
    resume: bool,
    overwrite: bool,
    quiet: bool,
) -> dict[str, Any]:
    """One fine-tune per `finetune.lr_grid` value in `out/lr-<value>/`; the best on validation
    is the result (its weights, predictions and metrics are copied into `out`)."""
    import shutil

    ft = recipe.finetune
    info = D.init_distributed(D.resolve_device(device))
    run = RunDir.open(
        out,
        kind="finetune",
        resume=resume,
        overwrite=overwrite,
        is_main=info.is_main,
        recipe=recipe,
    )
    if labeled_data(recipe, progress=False, report_dir=run.path).val is None:  # before training
        raise UserError(
            "finetune.lr_grid picks the learning rate on the validation split, and this run has "
            "none: set data.val_fraction > 0, or give val rows in the labels CSV"
        )
    if info.is_main:
        run.start("finetune", recipe, device)
    tried: list[dict[str, Any]] = []
    chosen: tuple[float, Path, dict[str, Any]] | None = None
    for lr in ft.lr_grid:
        sub = run.path / f"lr-{lr:g}"
        one = replace(recipe, finetune=replace(ft, lr_grid=[], optim=replace(ft.optim, lr=lr)))
        if (sub / "results.json").is_file():  # finished before an interruption
            res = json.loads((sub / "results.json").read_text())
        else:
            res = finetune(one, sub, device=device, resume=True, quiet=quiet)
        tried.append({"lr": lr, "val_best": res.get("val_best"), "best_step": res.get("best_step")})
        if info.is_main and (chosen is None or res["val_best"] > chosen[2]["val_best"]):
            chosen = (lr, sub, res)
    results: dict[str, Any] = {}
    if info.is_main and chosen is not None:
        lr, sub, res = chosen
        for name in _CHOSEN_FILES:
            if (sub / name).is_file():
                shutil.copyfile(sub / name, run.path / name)
        results = {**res, "lr": lr, "lr_grid": tried}
        atomic_write_json(run.path / "results.json", results)
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "lr grid: %s -> lr %g",
            ", ".join(f"{t['lr']:g}: {t['val_best']:.4f}" for t in tried),
            lr,
        )
        run.finish(result={k: v for k, v in results.items() if k != "classes"})
    D.barrier()
    return results


def _write_predictions(
    path: Path, dataset: Any, idx: np.ndarray, probs: np.ndarray, classes: list[str]
) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "frame", "label", "predicted", *[f"p_{c}" for c in classes]])
    for i, p in zip(idx, probs):
        path_i, frame = dataset.source.source(int(i))
        w.writerow(
            [
                path_i,
                frame,
                dataset.source.label(int(i)),
                classes[int(p.argmax())],
                *[f"{v:.6f}" for v in p],
            ]
        )
    atomic_write_text(path, buf.getvalue())


def predict(
    run: str | Path,
    inputs: list[str],
    out_csv: str | Path,
    device: str = "auto",
    *,
    on_error: str = "skip",
    nonfinite: str | None = None,
) -> Path:
    """Writes a CSV of predicted class and probabilities for images, files or folders.

    Images go through the run's own reader settings and evaluation transform. A file that
    cannot be used (unreadable, NaN/Inf under `nonfinite='error'`) is skipped with a warning
    and listed in `<out>.errors.csv` (with `on_error='fail'` it stops the run instead, naming
    every such file).
    """
    return predict_files(run, inputs, out_csv, device, on_error=on_error, nonfinite=nonfinite)[0]


def predict_files(
    run: str | Path,
    inputs: list[str],
    out_csv: str | Path,
    device: str = "auto",
    *,
    on_error: str = "skip",
    nonfinite: str | None = None,
) -> tuple[Path, list[tuple[str, str]]]:
    """`predict`, also returning the skipped files as (path, reason)."""
    from beitdomain.data.index import ScanError, errors_path, scan
    from beitdomain.fileio import printable
    from beitdomain.io import IntensitySpec, ReaderError, load_image

    if on_error not in ("fail", "skip"):
        raise UserError(f"--on-error {on_error!r}; valid: fail, skip")
    if nonfinite not in (None, "error", "zero"):
        raise UserError(f"--nonfinite {nonfinite!r}; valid: error, zero")
    run = Path(run)
    if not (run / "results.json").is_file() or not (run / BEST_FILE).is_file():
        raise UserError(f"{run} is not a finished fine-tuning run (no results.json / {BEST_FILE})")
    recipe = load_recipe(run / "recipe.yaml")
    if nonfinite is not None:
        recipe = replace(recipe, data=replace(recipe.data, nonfinite=nonfinite))
    classes = json.loads((run / "results.json").read_text())["classes"]
    dev = D.resolve_device(device)
    model = build_classifier(
        replace(recipe, finetune=replace(recipe.finetune, init=None)), len(classes)
    )
    load_weights(model, run / BEST_FILE)
    model.to(dev).eval()
    amp_dtype = D.resolve_precision(recipe.finetune.train.precision, dev)
    spec = IntensitySpec.from_config(recipe.data)
    ev = FinetuneTransform(train=False, image_size=recipe.data.image_size)
    files: list[tuple[str, Path]] = []
    skipped: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            m = scan(p, on_error="skip")
            files += [(e.path, m.abspath(e)) for e in m.entries]
            skipped += [(str(p / bad), why) for bad, why in m.errors]
        elif p.is_file():
            files.append((str(p), p))
        else:
            raise UserError(f"{item}: no such file or folder")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "frame", "predicted", *[f"p_{c}" for c in classes]])
    with torch.no_grad():
        for name, path in files:
            try:
                image, _ = load_image(path, spec)
            except ReaderError as e:  # like a file a folder scan could not read
                skipped.append((name, e.reason))
                continue
            frames = image if image.ndim == 4 else image[None]
            x = torch.stack([torch.from_numpy(ev(f)) for f in frames]).to(dev)
            with D.autocast(dev, amp_dtype):  # the precision the test split was scored in
                probs = model(x).float().softmax(-1).cpu().numpy()
            for k, p in enumerate(probs):
                w.writerow([name, k, classes[int(p.argmax())], *[f"{v:.6f}" for v in p]])
    if skipped and on_error == "fail":
        raise ScanError(
            f"{len(skipped)} of {len(files) + len(skipped)} files could not be used:",
            [(printable(a), b) for a, b in skipped],
            "Fix or remove them, or pass --on-error skip to predict the others.",
        )
    for bad, why in skipped:
        log.warning("skipped %s: %s", printable(bad), why)
    atomic_write_text(out_csv, buf.getvalue())
    if skipped:
        err = io.StringIO()
        csv.writer(err, lineterminator="\n").writerows([("path", "reason"), *skipped])
        atomic_write_text(errors_path(out_csv), err.getvalue())
    return Path(out_csv), skipped
