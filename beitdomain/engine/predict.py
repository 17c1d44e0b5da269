"""`beitdomain predict`: a finished fine-tuning run applied to new images.

Images go through the run's own reader settings and evaluation transform, in the precision its
test split was scored in; one CSV row per image (per frame for multi-frame files).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from beitdomain.config import load_recipe
from beitdomain.data.index import ScanError, errors_path, scan
from beitdomain.data.transforms import FinetuneTransform
from beitdomain.engine.build import build_classifier
from beitdomain.engine.job import BEST_FILE, RECIPE_FILE, RESULTS_FILE, is_finished
from beitdomain.engine.train import distributed as D
from beitdomain.fileio import atomic_write_text, printable, spreadsheet_text
from beitdomain.io import IntensitySpec, ReaderError, load_image
from beitdomain.models.cnn import timm_arch
from beitdomain.models.probe import eval_outputs
from beitdomain.user import UserError

log = logging.getLogger(__name__)


def predict_probs(
    model: nn.Module,
    dataset: Any,
    device: torch.device,
    batch_size: int = 64,
    amp_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class probabilities for a dataset, in order: (probs [N, K], labels [N], source index [N])."""
    logits, labels, index = eval_outputs(model, model, dataset, device, batch_size, amp_dtype)
    return logits.softmax(-1).numpy(), labels, index


def load_weights(model: nn.Module, path: Path) -> None:
    """Loads a fine-tune's `best.safetensors` into the (possibly wrapped) model."""
    from safetensors.torch import load_file

    D.unwrap(model).load_state_dict(load_file(str(path)))


def write_predictions(
    path: Path, dataset: Any, idx: np.ndarray, probs: np.ndarray, classes: list[str]
) -> None:
    """A labelled split's predictions: path, frame, label, predicted class, probabilities."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "frame", "label", "predicted", *[f"p_{c}" for c in classes]])
    for i, p in zip(idx, probs):
        path_i, frame = dataset.source.source(int(i))
        w.writerow(
            [
                spreadsheet_text(path_i),  # names and labels stay text in a spreadsheet
                frame,
                spreadsheet_text(dataset.source.label(int(i))),
                spreadsheet_text(classes[int(p.argmax())]),
                *[f"{v:.6f}" for v in p],
            ]
        )
    atomic_write_text(path, buf.getvalue())


def predict(
    run: str | Path, inputs: list[str], out_csv: str | Path, device: str = "auto", **options: Any
) -> Path:
    """Writes a CSV of predicted class and probabilities for images, files or folders.

    `predict_files` without the list of skipped files; `options` are its keywords
    (`on_error`, `nonfinite`).
    """
    return predict_files(run, inputs, out_csv, device, **options)[0]


PREDICTIONS_HEADER = "path,frame,predicted,"  # how a predictions CSV starts


def _check_predictions_target(out: Path, inputs: list[str]) -> None:
    """Refuses an --out that is one of the inputs, or an existing file that is not a
    predictions CSV (predict replaces only what it wrote), before the model loads."""
    target = out.resolve()
    for item in inputs:
        if Path(item).is_file() and Path(item).resolve() == target:
            raise UserError(f"--out {out} is one of the images to predict; nothing was written")
    if out.exists():
        try:
            with open(out, "rb") as f:
                ours = f.read(len(PREDICTIONS_HEADER)).decode("utf-8", "replace")
        except OSError:
            ours = ""
        if ours != PREDICTIONS_HEADER:
            raise UserError(
                f"--out {out} exists and is not a predictions CSV that predict wrote; nothing "
                "was written. Choose another --out file"
            )


def predict_files(
    run: str | Path,
    inputs: list[str],
    out_csv: str | Path,
    device: str = "auto",
    *,
    on_error: str = "skip",
    nonfinite: str | None = None,
) -> tuple[Path, list[tuple[str, str]]]:
    """Writes a CSV of predicted class and probabilities for images, files or folders; returns
    its path and the skipped files as (path, reason).

    Images go through the run's own reader settings and evaluation transform. A file that
    cannot be used (unreadable, NaN/Inf under `nonfinite='error'`) is skipped with a warning
    and listed in `<out>.errors.csv` (with `on_error='fail'` it stops the run instead, naming
    every such file).
    """
    if on_error not in ("fail", "skip"):
        raise UserError(f"--on-error {on_error!r}; valid: fail, skip")
    if nonfinite not in (None, "error", "zero"):
        raise UserError(f"--nonfinite {nonfinite!r}; valid: error, zero")
    run = Path(run)
    if not is_finished(run, "finetune"):
        raise UserError(
            f"{run} is not a finished fine-tuning run (no {RESULTS_FILE} / {BEST_FILE})"
        )
    out_csv = Path(out_csv).expanduser()  # a quoted '~/p.csv' means the home folder
    _check_predictions_target(out_csv, inputs)
    recipe = load_recipe(run / RECIPE_FILE)
    if nonfinite is not None:
        recipe = replace(recipe, data=replace(recipe.data, nonfinite=nonfinite))
    classes = json.loads((run / RESULTS_FILE).read_text())["classes"]
    dev = D.resolve_device(device)
    init = recipe.finetune.init  # the weights come from the run; a timm:<arch> init names the net
    arch_only = init if init is not None and timm_arch(init) is not None else None
    model = build_classifier(
        replace(recipe, finetune=replace(recipe.finetune, init=arch_only)), len(classes)
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
            # named as the predictions name the folder's files: from inside the folder
            skipped += m.errors
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
                predicted = classes[int(p.argmax())]
                w.writerow(
                    [
                        spreadsheet_text(name),  # a name or label '=HYPERLINK(..)' stays text
                        k,
                        spreadsheet_text(predicted),
                        *[f"{v:.6f}" for v in p],
                    ]
                )
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
        rows = [(spreadsheet_text(a), spreadsheet_text(b)) for a, b in skipped]
        csv.writer(err).writerows([("path", "reason"), *rows])  # \r\n quotes a \r in a name
        atomic_write_text(errors_path(out_csv), err.getvalue())
    return Path(out_csv), skipped
