"""A run, once for every job: what tokenizer training, pre-training and fine-tuning share.

A job is its own `build` (data, model, loss) and `finish` (what it leaves behind) on top of this:

    job = Job.open("pretrain", recipe, out, **options)  # device, resume, overwrite, quiet, ...
    dataset, fingerprint = ...           # the job's data (its errors come before any write)
    job.start(fingerprint)               # the run folder, its lock, recipe.yaml + manifest (main)
    plan = job.plan(dataset)             # loader and run length, from the job's own `train`
    trainer = job.trainer(model, plan, groups, step_fn, hooks=[...])  # its own `optim`
    job.fit(trainer)                     # a failure marks the manifest, then raises
    job.finish(result)                   # manifest "completed" (main), then a barrier

`Job.open` checks the folder and writes nothing; the folder is created (locked, marked, and
cleared by --overwrite) at the job's first write, `start` or `write_json`. A job refused before
then (its data, labels, augmentations, tokenizer or model) leaves `out` as it found it, missing
or not, and a start that fails in a folder it created removes what it wrote. From `start` on,
a failure in `plan`, `trainer`, `write_json` or `fit` marks the manifest "failed" with its error
before it raises; what a job can check without the folder (labels, a k-NN check's data) it
checks before `start`.

Each job reads only its own recipe section (`recipe.tokenizer`, `recipe.pretrain`,
`recipe.finetune`), which all have the same `train` + `optim` shape.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

import torch
from torch import nn

from beitdomain.config import OptimConfig, Recipe, TrainConfig, recipe_to_dict
from beitdomain.engine.run.folder import RunDir, check_same_data
from beitdomain.engine.train import distributed as D
from beitdomain.engine.train.loop import LoopState, StepFn, Trainer
from beitdomain.engine.train.optim import build_adamw, lr_schedule, peak_lr
from beitdomain.engine.train.plan import RunPlan, plan_run, prepare_for_training
from beitdomain.fileio import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

JobKind = Literal["tokenizer", "pretrain", "finetune"]

# ---- what a finished run holds ----------------------------------------------------------------
RECIPE_FILE = "recipe.yaml"  # the resolved recipe (loads back with --recipe)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.safetensors")  # what `pretrain` loads
MIM_FILE = "mim.safetensors"  # the whole MIM model of a pre-training run
BACKBONE_FILE = "backbone.safetensors"  # timm-compatible export: what fine-tuning loads
BACKBONE_META = "backbone.json"  # its timm model name and keyword arguments
BEST_FILE = "best.safetensors"  # a fine-tune's weights chosen on validation
RESULTS_FILE = "results.json"  # a fine-tune's test metrics; a curve cell is done when present

# A run of each kind is finished when all of its files are there (written last, atomically).
FINISHED_FILES: dict[str, tuple[str, ...]] = {
    "tokenizer": TOKENIZER_FILES,
    "pretrain": (BACKBONE_FILE,),
    "finetune": (RESULTS_FILE, BEST_FILE),
}
# The command a run of each kind is recorded under in its manifest.
COMMANDS: dict[str, str] = {
    "tokenizer": "tokenizer train",
    "pretrain": "pretrain",
    "finetune": "finetune",
}


def is_finished(folder: str | Path, kind: JobKind) -> bool:
    """True when `folder` holds a finished run of `kind` (its final files are all written)."""
    return all((Path(folder) / name).is_file() for name in FINISHED_FILES[kind])


class JobOptions(TypedDict, total=False):
    """How a job runs, not what it computes: the keyword arguments every job function takes
    (`train_tokenizer(recipe, out, **options)`, `pretrain(...)`, `finetune(...)`)."""

    device: str  # auto | cpu | cuda | cuda:N
    resume: bool  # continue the run in `out` from its newest checkpoint
    overwrite: bool  # delete the run in `out` and start over
    quiet: bool  # no progress bars; the job's info lines at debug level
    trust_pickle: bool  # allow pickle-based weights (they can run code): trusted files only
    resume_other_data: bool  # let --resume continue on data other than its checkpoints saw


@dataclass
class Job:
    """One run of a job in its run folder. Create it with `Job.open`."""

    kind: JobKind
    recipe: Recipe
    device: torch.device
    dist: D.DistInfo
    opened: RunDir | None  # the run folder, once the job has written to it (see `run`)
    resume: bool
    quiet: bool
    trust_pickle: bool = False  # from the caller only: a recipe never grants trust
    peak_lr: float | None = None  # set by `trainer`: the schedule's highest learning rate
    out: Path | None = None  # where `run` opens the folder (None: `opened` is given)
    overwrite: bool = False
    # When `open` found no run in `out`: the time it looked (None: a run was there), and
    # whether `out` was missing (False) or empty (True; None: it held a died run's marker).
    # A start failing in a missing or empty folder takes back what it wrote.
    fresh_since_ns: int | None = None
    found_empty: bool | None = None
    resume_other_data: bool = False

    @classmethod
    def open(
        cls,
        kind: JobKind,
        recipe: Recipe,
        out: str | Path,
        *,
        device: str = "auto",
        resume: bool = False,
        overwrite: bool = False,
        quiet: bool = False,
        trust_pickle: bool = False,
        resume_other_data: bool = False,
    ) -> Job:
        """Resolves the device, joins the process group, checks the run folder and seeds.

        Nothing is written: `out` is created at the job's first write (`start`).

        Raises:
            RunDirError: the folder cannot be used as asked (another kind of run, files the
                run did not write, a run and neither --resume nor --overwrite).
            RunLockedError: another process is writing the folder.
        """
        dev = D.resolve_device(device)
        info = D.init_distributed(dev)
        out = Path(out).expanduser()  # a quoted '~/runs/x' means the home folder
        found_empty: bool | None = None
        fresh_since_ns: int | None = None
        if info.is_main:  # refuses other kinds of run and folders it did not write
            since = time.time_ns()
            found = RunDir.check(out, kind=kind, resume=resume, overwrite=overwrite, recipe=recipe)
            if found is None:
                fresh_since_ns = since
                if not (out.is_dir() and any(out.iterdir())):
                    found_empty = out.is_dir()
        train = getattr(recipe, kind).train
        D.seed_everything(recipe.seed, train.deterministic)  # the same on every rank, see trainer
        D.use_tf32(dev, train.precision)
        return cls(
            kind,
            recipe,
            dev,
            info,
            None,
            resume,
            quiet,
            trust_pickle,
            out=out,
            overwrite=overwrite,
            fresh_since_ns=fresh_since_ns,
            found_empty=found_empty,
            resume_other_data=resume_other_data,
        )

    @property
    def run(self) -> RunDir:
        """The run folder, created and locked on first use (checked again under the lock)."""
        if self.opened is None:
            assert self.out is not None
            self.opened = RunDir.open(  # refuses other kinds of run and folders it did not write
                self.out,
                kind=self.kind,
                resume=self.resume,
                overwrite=self.overwrite,
                is_main=self.is_main,
                recipe=self.recipe,
                fresh_since_ns=self.fresh_since_ns,
            )
        return self.opened

    @property
    def train_config(self) -> TrainConfig:
        return getattr(self.recipe, self.kind).train

    @property
    def optim_config(self) -> OptimConfig:
        return getattr(self.recipe, self.kind).optim

    @property
    def path(self) -> Path:
        """The run folder's path (it exists once the job has started)."""
        return self.opened.path if self.opened is not None else Path(self.out or ".")

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype of this job's `train.precision` (None: fp32)."""
        return D.resolve_precision(self.train_config.precision, self.device)

    def say(self, msg: str, *args: Any) -> None:
        """An info line, or a debug one when the job runs quietly (e.g. a curve's cells)."""
        log.log(logging.DEBUG if self.quiet else logging.INFO, msg, *args)

    def start(self, data_fingerprint: str | None = None, **extra: Any) -> None:
        """Creates the run folder (see `RunDir.open`), then writes recipe.yaml and the
        manifest's start fields (main process only). When writing them fails in a folder that
        was missing or empty, what this start wrote is removed again."""
        if not self.is_main:
            return
        if self.resume and self.opened is None:  # before the folder is opened: refused as found
            check_same_data(self.path, data_fingerprint, self.resume_other_data)
        run = self.run
        try:
            run.start(
                COMMANDS[self.kind],
                self.recipe,
                str(self.device),
                data_fingerprint=data_fingerprint,
                **extra,
            )
        except BaseException:
            if self.found_empty is not None:
                run.discard(remove_folder=not self.found_empty)
            raise

    @contextlib.contextmanager
    def recording_failures(self) -> Iterator[None]:
        """Once the run has started (its manifest says "running"), a failure or Ctrl-C in the
        body is written to the manifest ("failed" with the error, or "interrupted") before it
        raises, so a run refused after its start (its plan, its trainer, a file it writes
        before training) does not read as one still running."""
        if self.opened is None or not self.is_main:
            yield
            return
        with self.opened.recording_failures(self.is_main):
            yield

    def write_json(self, name: str, obj: Any) -> None:
        """A JSON file in the run folder (main process only)."""
        if self.is_main:
            with self.recording_failures():
                atomic_write_json(self.path / name, obj)

    def write_labels_used(
        self, columns: Sequence[str], rows: Iterable[Sequence[str]], labels: dict[str, Any]
    ) -> None:
        """`labels_used.csv` (one row per labelled item and its split) and `labels.json` (what
        the label budget got): which labels a fine-tune saw, written before it trains."""
        if not self.is_main:
            return
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(columns)
        w.writerows(rows)
        with self.recording_failures():
            atomic_write_text(self.path / "labels_used.csv", buf.getvalue())
        self.write_json("labels.json", labels)

    def plan(self, dataset: Any, weights: Sequence[float] | None = None) -> RunPlan:
        """The loader and run length from this job's `train` section."""
        with self.recording_failures():
            return plan_run(
                dataset,
                self.train_config,
                seed=self.recipe.seed,
                num_workers=self.recipe.data.num_workers,
                device=self.device,
                weights=weights,
            )

    def trainer(
        self,
        model: nn.Module,
        plan: RunPlan,
        param_groups: Iterable[dict[str, Any]] | Iterable[nn.Parameter],
        step_fn: StepFn,
        *,
        hooks: Sequence[Any] = (),
        wrap: Callable[[nn.Module], nn.Module] | None = None,
    ) -> Trainer:
        """AdamW over `param_groups` with this job's schedule, and the `Trainer` that runs it.

        `wrap` turns the model into what the loop calls (e.g. a loss module around it); the
        result is DDP-wrapped and compiled as `train` asks.
        """
        with self.recording_failures():
            return self._trainer(model, plan, param_groups, step_fn, hooks, wrap)

    def _trainer(
        self,
        model: nn.Module,
        plan: RunPlan,
        param_groups: Iterable[dict[str, Any]] | Iterable[nn.Parameter],
        step_fn: StepFn,
        hooks: Sequence[Any],
        wrap: Callable[[nn.Module], nn.Module] | None,
    ) -> Trainer:
        opt, train = self.optim_config, self.train_config
        optimizer = build_adamw(param_groups, opt, self.device)
        self.peak_lr = peak_lr(opt, plan.global_batch)
        trained = prepare_for_training(wrap(model) if wrap else model, train, self.device)
        # Built and DDP-wrapped alike on every rank; from here each rank draws its own noise.
        D.seed_this_rank(self.recipe.seed, self.dist)
        return Trainer(
            model=trained,
            optimizer=optimizer,
            loader=plan.loader,
            step_fn=step_fn,
            lr_at=lr_schedule(opt, plan.total_steps, plan.global_batch),
            total_steps=plan.total_steps,
            train=train,
            grad_clip=opt.grad_clip,
            device=self.device,
            run=self.run,
            hooks=hooks,
            desc=self.kind,
            quiet=self.quiet,
            tracker_config=recipe_to_dict(self.recipe) if train.trackers else None,
        )

    def fit(self, trainer: Trainer) -> LoopState:
        """Runs the loop (resuming when asked); a failure or Ctrl-C is written to the manifest."""
        with self.recording_failures():
            return trainer.fit(resume=self.resume)

    def finish(self, result: dict[str, Any]) -> None:
        """Marks the run completed with `result` (main process), then waits for every process."""
        if self.is_main:
            self.run.finish(result=result)
        D.barrier()
