"""Validation during fine-tuning: the best weights so far, and early stopping (a trainer hook).

One hook for every task: a subclass says what a validation is (`evaluate`), what selection
maximizes (`score`) and what is logged (`logged`); keeping the best weights, early stopping and
agreeing on both across ranks are the same for classification and segmentation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from beitdomain.engine.train import distributed as D
from beitdomain.fileio import atomic_write_safetensors

if TYPE_CHECKING:
    import torch

    from beitdomain.engine.train.loop import Trainer

log = logging.getLogger(__name__)


def validation_every(eval_every: int | None, steps_per_epoch: int, total_steps: int) -> int:
    """Steps between validations: `train.eval_every`, else once an epoch or 20 times a run,
    whichever is rarer."""
    return eval_every or max(steps_per_epoch, total_steps // 20)


def save_weights(model: nn.Module, path: Path) -> None:
    atomic_write_safetensors(path, D.unwrap(model).state_dict())


@dataclass
class ValidationHook:
    """Validates every `every` steps (and after the last); writes the best weights to
    `best_path`; stops after `patience` evaluations without a better score (None: never).

    Every rank evaluates (none waits idle in a collective); rank 0 decides, and every rank takes
    its best score and stop from it, so all stop on the same step (a rank stopping alone would
    leave the others waiting in the next all-reduce). Its state is checkpointed (exact resume).
    """

    model: nn.Module
    val: Any
    every: int
    best_path: Path | None
    patience: int | None
    device: torch.device
    batch_size: int
    best: float | None = None
    best_step: int = 0
    bad_evals: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    metric_name = "score"  # in the early-stopping message

    @classmethod
    def for_fine_tune(
        cls,
        model: nn.Module,
        val: Any,
        plan: Any,
        finetune: Any,
        best_path: Path,
        device: torch.device,
        min_batch: int,
        **task: Any,
    ) -> ValidationHook:
        """The hook of a fine-tuning job that trains on `plan` (a `RunPlan`): the cadence of
        `validation_every`, `finetune.early_stopping` as patience, evaluation batches of at
        least `min_batch` images; `task` holds the subclass's own fields (its classes...)."""
        every = validation_every(finetune.train.eval_every, len(plan.loader), plan.total_steps)
        batch = max(plan.loader.batch_sampler.batch_size, min_batch)
        return cls(model, val, every, best_path, finetune.early_stopping, device, batch, **task)

    def evaluate(self, trainer: Trainer) -> dict[str, Any]:
        """The validation split's metrics."""
        raise NotImplementedError

    def score(self, metrics: dict[str, Any]) -> float:
        """What selection maximizes."""
        raise NotImplementedError

    def logged(self, metrics: dict[str, Any]) -> dict[str, float]:
        """What goes into metrics.jsonl (as `val_*`)."""
        raise NotImplementedError

    def on_step_end(self, trainer: Trainer) -> None:
        step = trainer.state.step
        if self.val is None or not (step % self.every == 0 or step == trainer.total_steps):
            return
        m = self.evaluate(trainer)
        if trainer.dist.is_main:
            self._decide(step, m)
        decision = D.broadcast_object({**self.state_dict(), "history": self.history[-1:]})
        if not trainer.dist.is_main:
            self.load_state_dict(decision)
            self.history.extend(decision["history"])
        trainer.log(**self.logged(m))
        if self.best_step == step:
            if self.best_path is not None and trainer.dist.is_main:
                save_weights(self.model, self.best_path)
        elif self.patience is not None and self.bad_evals >= self.patience:
            trainer.state.stop = True
            trainer.state.stop_reason = (
                f"early stopping: no better validation {self.metric_name} for {self.bad_evals} "
                f"evaluations (best {self.best:.4f} at step {self.best_step})"
            )
            log.info("%s", trainer.state.stop_reason)

    def _decide(self, step: int, m: dict[str, Any]) -> None:
        """Records this evaluation's score and whether it is the best so far (rank 0's call)."""
        score = self.score(m)
        self.history.append({"step": step, "score": score})
        if self.best is None or score > self.best:
            self.best, self.best_step, self.bad_evals = score, step, 0
        else:
            self.bad_evals += 1

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.best, self.best_step = s["best"], int(s["best_step"])
        self.bad_evals = int(s["bad_evals"])
