"""The training loop every job shares: steps, accumulation, bf16, clipping, logging, checkpoints.

A job (tokenizer, pre-training, fine-tuning) builds its model, optimizer and loader (`plan.py`),
and gives `Trainer` a `step_fn(model, batch) -> (loss, metrics)`. The trainer owns everything that
must be the same for all of them: the lr schedule applied per parameter group (times the group's
`lr_scale`, used by layer-wise decay), gradient accumulation with DDP's no_sync, non-finite loss
skipping, gradient clipping, metrics.jsonl, a progress bar, atomic checkpoints and exact resume.

Resume is exact: a checkpoint holds the model, optimizer, loop position (epoch, batch within
epoch), torch RNG states and the hooks' states; batches are a pure function of (seed, epoch),
so on CPU with deterministic kernels a resumed run ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from beitdomain.config import TrainConfig
from beitdomain.data.sampler import ResumableBatchSampler
from beitdomain.engine.run.checkpoint import CheckpointManager, rng_state, set_rng_state
from beitdomain.engine.run.folder import RunDir
from beitdomain.engine.run.metrics_log import MetricsLog
from beitdomain.engine.train import distributed as D
from beitdomain.engine.train.plan import CompiledWithFallback
from beitdomain.engine.train.signals import stop_on_signals
from beitdomain.progress import StepProgress
from beitdomain.user import UserError

log = logging.getLogger(__name__)

StepFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]]


class NonFiniteLossError(UserError):
    """Too many consecutive non-finite losses; the checkpoints written before are intact."""


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived; a checkpoint of the last finished step was written."""


def _cloned(tree: Any) -> Any:
    """`tree` with its tensors copied (on their device: no host sync) and its containers new."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _cloned(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cloned(v) for v in tree)
    return tree


def _on_cpu(tree: Any) -> Any:
    """`tree` with its tensors on the CPU, so a checkpoint's hook states load anywhere."""
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: _on_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_on_cpu(v) for v in tree)
    return tree


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` consumed
    nonfinite_streak: int = 0
    nonfinite_total: int = 0
    stop: bool = False  # set by a hook (early stopping)
    stop_reason: str | None = None


class Hook(Protocol):
    """Called after every optimizer step; may log, evaluate, save artefacts or stop the run.

    Hooks with `state_dict`/`load_state_dict` have their state checkpointed and restored. The
    state may change during a step (a counter the step function advances): the trainer copies
    it after every step, so a checkpoint written mid-step on a signal holds the finished step's.
    """

    def on_step_end(self, trainer: Trainer) -> None: ...


@dataclass
class Trainer:
    """Runs `total_steps` optimizer steps of `step_fn` over `loader`.

    Args:
        model: the module to train (DDP-wrapped by the caller when distributed).
        optimizer: its optimizer; groups may carry `lr_scale` (layer-wise decay).
        loader: a DataLoader whose `batch_sampler` is a `ResumableBatchSampler`.
        step_fn: computes (loss, metrics) for one micro-batch, called under autocast.
        lr_at: the base learning rate for an optimizer step (a pure function).
        total_steps: length of the run.
        train: accumulation, precision, logging, checkpoint and TensorBoard settings.
        grad_clip: max gradient norm, or None.
        device: where batches go.
        run: the run directory (None: no files written, e.g. in tests).
        hooks: called after each step.
        desc: the progress bar's label.
        quiet: no progress bar.
        tracker_config: what experiment trackers record as the run's parameters (the recipe).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    step_fn: StepFn
    lr_at: Callable[[int], float]
    total_steps: int
    train: TrainConfig
    grad_clip: float | None
    device: torch.device
    run: RunDir | None = None
    hooks: Sequence[Any] = ()
    desc: str = "train"
    quiet: bool = False
    tracker_config: dict[str, Any] | None = None
    state: LoopState = field(default_factory=LoopState)
    metrics: MetricsLog | None = None
    amp_dtype: torch.dtype | None = None
    dist: D.DistInfo = field(default_factory=D.dist_info)
    last_metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.loader.batch_sampler, ResumableBatchSampler):
            raise TypeError("Trainer needs a DataLoader built with a ResumableBatchSampler")
        self.amp_dtype = D.resolve_precision(self.train.precision, self.device)
        self.ckpt = (
            CheckpointManager(self.run.checkpoints, keep=self.train.keep_checkpoints)
            if self.run is not None
            else None
        )
        self._stop_signal = threading.Event()
        # Signals: the model and optimizer change only in an update (optimizer step to the
        # step's checkpoint), under `_update`; what changes during a step (loop position, RNG,
        # hook states) is copied into `_snapshot` after each one. A checkpoint of the last
        # finished step can then be written at any moment outside an update.
        self._update = threading.RLock()
        self._in_update = False
        self._snapshot: dict[str, Any] | None = None
        self._saved_step = -1  # the step of the newest checkpoint this trainer wrote or read
        self._signal_name = "a signal"

    # ---- checkpoints ----------------------------------------------------------------------
    def _progress_state(self) -> dict[str, Any]:
        """What changes during a step: the loop position, the RNG, the hooks' states."""
        hooks = {
            f"{i}:{type(h).__name__}": h.state_dict()
            for i, h in enumerate(self.hooks)
            if hasattr(h, "state_dict")
        }
        return {
            "step": self.state.step,
            "loop": dataclasses.asdict(self.state),
            "rng": rng_state(),
            "hooks": hooks,
        }

    def checkpoint_state(self, progress: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint of now, or of the finished step whose `_progress_state` is given."""
        p = progress if progress is not None else self._progress_state()
        return {
            "format": "beitdomain-checkpoint/1",
            "step": p["step"],
            "model": D.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loop": p["loop"],
            "rng": p["rng"],
            "hooks": _on_cpu(p["hooks"]),
        }

    def save_checkpoint(self) -> None:
        if self.ckpt is not None and self.dist.is_main:
            self.ckpt.save(self.checkpoint_state(), self.state.step)
            self._saved_step = self.state.step
        D.barrier()

    def _save_last_finished(self) -> None:
        """Checkpoints the last finished step, once (rank 0; no barrier: called on a signal,
        from the watcher thread or the main thread's handler)."""
        with self._update:
            snap = self._snapshot
            if snap is None or self.ckpt is None or not self.dist.is_main:
                return
            if snap["step"] in (0, self._saved_step):
                return  # nothing done yet, or already on disk
            self.ckpt.save(self.checkpoint_state(snap), snap["step"])
            self._saved_step = snap["step"]
            log.warning(
                "%s: checkpoint of step %d written to %s",
                self._signal_name,
                snap["step"],
                self.ckpt.folder,
            )

    @contextlib.contextmanager
    def _updating(self) -> Iterator[None]:
        """An update: a signal's checkpoint waits for it; what it leaves is copied at its end."""
        with self._update:
            self._in_update = True
            try:
                yield
                self._snapshot = _cloned(self._progress_state())  # also after a skipped step
            finally:
                self._in_update = False

    def _on_wakeup(self, signum: int) -> None:
        """The watcher thread: the checkpoint lands while the main thread may still be in a
        long C++ call (a backward pass), inside a scheduler's grace period."""
        self._signal_name = signal.Signals(signum).name
        try:
            self._save_last_finished()
        except Exception:  # e.g. disk full; the main thread's stop tries again and says why
            log.exception("%s: the checkpoint of the last finished step failed", self._signal_name)

    def _on_signal(self, signum: int) -> None:
        """The main thread's handler: outside an update, stop at once (single process; ranks of
        a distributed run stop together at the step's end)."""
        self._signal_name = signal.Signals(signum).name
        if self._in_update or self.dist.world_size > 1:
            return
        self._stop_now()

    def _stop_now(self) -> None:
        self._save_last_finished()
        step = self._snapshot["step"] if self._snapshot is not None else self.state.step
        if step == 0:
            raise Interrupted(
                f"interrupted ({self._signal_name}) before the first step finished; "
                "nothing to resume from: start the run again"
            )
        if self.ckpt is None:  # no run folder (a library call): nothing is written anywhere
            raise Interrupted(f"interrupted ({self._signal_name}) at step {step}")
        raise Interrupted(
            f"interrupted ({self._signal_name}) at step {step}; checkpoint saved, "
            "continue with --resume"
        )

    def _checkpoint_left(self) -> str:
        """What a stopped run leaves to resume from, in a sentence."""
        mgr = self.ckpt
        steps = [s for s in mgr.steps() if mgr.verify(mgr.path_for(s)) is None] if mgr else []
        if not steps or mgr is None:
            return "No checkpoint was written yet, so there is nothing to resume from."
        return f"The last good checkpoint (step {steps[-1]}) is intact in {mgr.folder}."

    def resume(self) -> bool:
        """Restores the newest usable checkpoint; False when there is none (a fresh start)."""
        if self.ckpt is None:
            return False
        found = self.ckpt.load_latest(map_location="cpu")
        if found is None:
            if self.run is not None and self.dist.is_main:
                self.run.check_nothing_to_resume()
            return False
        step, ck = found
        D.unwrap(self.model).load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.state = LoopState(**ck["loop"])
        self.state.stop, self.state.stop_reason = False, None
        for i, h in enumerate(self.hooks):
            key = f"{i}:{type(h).__name__}"
            if hasattr(h, "load_state_dict") and key in ck["hooks"]:
                h.load_state_dict(ck["hooks"][key])
        if self.dist.world_size == 1:
            set_rng_state(ck["rng"])  # per-rank RNG streams differ; only restored single-process
        else:
            torch.manual_seed(hash((step, self.dist.rank)) % 2**31)
        log.info("resumed from step %d (epoch %d)", step, self.state.epoch)
        return True

    # ---- data -----------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        sampler: ResumableBatchSampler = self.loader.batch_sampler  # type: ignore[assignment]
        while True:
            if self.state.batch_in_epoch >= len(sampler):
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
            sampler.set_position(self.state.epoch, self.state.batch_in_epoch)
            ds = self.loader.dataset
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(self.state.epoch)
            yield from self.loader
            if self.state.batch_in_epoch < len(sampler):
                raise RuntimeError("the data loader ended before the sampler's epoch did")

    def _to_device(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(v) for v in batch)
        return batch

    # ---- the loop -------------------------------------------------------------------------
    def set_lr(self, step: int) -> float:
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def _forward_backward(
        self, batch: Any, skip_sync: bool, accum: int
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """One micro-batch's loss and backward; its (loss, metrics).

        A compiled model whose backward fails to compile (torch compiles it at the first
        backward) falls back to eager, and the micro-batch runs again: nothing of the failed
        backward reached the gradients.
        """
        while True:
            try:
                with (
                    D.maybe_no_sync(self.model, skip_sync),
                    D.autocast(self.device, self.amp_dtype),
                ):
                    loss, m = self.step_fn(self.model, batch)
                (loss.float() / accum).backward()
            except Exception as err:
                if not (
                    isinstance(self.model, CompiledWithFallback) and self.model.can_fall_back(err)
                ):
                    raise
                self.model.fall_back(err)
                continue
            if isinstance(self.model, CompiledWithFallback):
                self.model.proven = True
            return loss, m

    def log(self, **values: Any) -> None:
        """Writes a metrics record for the current step (rank 0 only)."""
        if self.metrics is not None and self.dist.is_main:
            self.metrics.log(self.state.step, epoch=self.state.epoch, **values)

    def fit(self, resume: bool = False) -> LoopState:
        """Trains until `total_steps` (or a hook stops the run); returns the final loop state.

        Raises:
            NonFiniteLossError: `train.max_nonfinite` non-finite losses in a row.
            Interrupted: on SIGINT/SIGTERM, after checkpointing the last finished step.
        """
        resumed = self.resume() if resume else False
        if resumed:
            self._saved_step = self.state.step
        if self.run is not None and self.dist.is_main:
            self.metrics = MetricsLog(
                self.run.path / "metrics.jsonl",
                resume_step=self.state.step if resumed else None,
                tensorboard=self.train.tensorboard,
                trackers=self.train.trackers,
                config=self.tracker_config,
            )
        accum = max(1, self.train.accum_steps)
        batches = self._batches()
        window: dict[str, float] = {}
        window_n = 0
        images = 0
        t_window = time.perf_counter()
        progress = StepProgress(
            self.desc, self.total_steps, self.state.step, self.quiet or not self.dist.is_main
        )
        self.model.train()
        params = list(self.model.parameters())  # walked once, not every step
        self._snapshot = _cloned(self._progress_state())
        signals = stop_on_signals(self._stop_signal, self._on_signal, self._on_wakeup)
        with progress, signals:
            while self.state.step < self.total_steps and not self.state.stop:
                if self._stop_signal.is_set():  # it came during the last update
                    if self.dist.world_size == 1:
                        self._stop_now()
                    if self.state.step % self.train.ckpt_every:  # every rank, as the barrier
                        self.save_checkpoint()
                    raise Interrupted(
                        f"interrupted ({self._signal_name}) at step {self.state.step}; "
                        "checkpoint saved, continue with --resume"
                    )
                lr = self.set_lr(self.state.step)
                losses = []
                # Metrics stay tensors until one host transfer per step (each float() of a
                # CUDA tensor waits for the GPU to finish its queue). Python numbers (a
                # schedule's temperature) stay on the host: made into a CUDA tensor, each
                # would be a copy that waits for the queue too.
                step_metrics: dict[str, torch.Tensor] = {}
                host_metrics: dict[str, float] = {}
                order: dict[str, None] = {}  # the step_fn's order of metric names
                for micro in range(accum):
                    batch = self._to_device(next(batches))
                    self.state.batch_in_epoch += 1
                    # every rank trains on a batch of the same size: the global count
                    images += _batch_len(batch) * self.dist.world_size
                    loss, m = self._forward_backward(batch, micro < accum - 1, accum)
                    losses.append(loss.detach().float())
                    for k, v in m.items():
                        order[k] = None
                        if isinstance(v, torch.Tensor):
                            v = v.detach().float() / accum
                            step_metrics[k] = step_metrics[k] + v if k in step_metrics else v
                        else:
                            host_metrics[k] = host_metrics.get(k, 0.0) + float(v) / accum
                loss_value = torch.stack(losses).mean()
                finite = torch.isfinite(loss_value)
                grad_norm = None
                if self.grad_clip is not None:
                    # Non-finite gradients make the norm non-finite; the step is then skipped
                    # and its (scaled) gradients dropped, as if clipping had not run.
                    grad_norm = nn.utils.clip_grad_norm_(params, self.grad_clip)
                    finite = finite & torch.isfinite(grad_norm)
                finite = finite.float()
                if self.dist.enabled:
                    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
                names = list(step_metrics)
                values = [finite, loss_value, *(step_metrics[k] for k in names)]
                if grad_norm is not None:
                    values.append(grad_norm.float())
                host = torch.stack([v.reshape(()).to(loss_value.device) for v in values]).tolist()
                from_device = dict(zip(names, host[2 : 2 + len(names)]))
                metrics_sum = {
                    k: from_device[k] if k in from_device else host_metrics[k] for k in order
                }
                finite_host, loss_host = host[0], host[1]
                grad_host = host[-1] if grad_norm is not None else None
                # The update: the model and optimizer change, so a signal's checkpoint waits.
                with self._updating():
                    if finite_host == 0:
                        self.optimizer.zero_grad(set_to_none=True)
                        self.state.nonfinite_streak += 1
                        self.state.nonfinite_total += 1
                        log.warning(
                            "non-finite loss or gradient at step %d: step skipped", self.state.step
                        )
                        if self.state.nonfinite_streak >= self.train.max_nonfinite:
                            raise NonFiniteLossError(
                                f"{self.state.nonfinite_streak} non-finite losses in a row at step "
                                f"{self.state.step}; stopping. {self._checkpoint_left()} Lower the "
                                f"lr ({self.desc}.optim.lr), set {self.desc}.optim.grad_clip, or "
                                "look at the data with `beitdomain data inspect`."
                            )
                        continue
                    self.state.nonfinite_streak = 0
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.state.step += 1
                    metrics_sum["loss"] = loss_host
                    if grad_host is not None:
                        metrics_sum["grad_norm"] = grad_host
                    for k, v in metrics_sum.items():
                        window[k] = window.get(k, 0.0) + v
                    window_n += 1
                    self.last_metrics = metrics_sum
                    progress.update(
                        self.state.step,
                        metrics_sum.get("loss"),
                        images / max(1e-9, time.perf_counter() - t_window),
                    )
                    last = self.state.step == self.total_steps
                    if self.state.step % self.train.log_every == 0 or last:
                        elapsed = time.perf_counter() - t_window
                        avg = {k: v / window_n for k, v in window.items()}
                        avg = D.all_reduce_mean(avg, self.device)
                        self.log(
                            lr=lr,
                            **avg,
                            img_per_s=images / max(elapsed, 1e-9),
                            nonfinite_skipped=self.state.nonfinite_total,
                        )
                        window, window_n, images, t_window = {}, 0, 0, time.perf_counter()
                    for h in self.hooks:
                        h.on_step_end(self)
                    done = last or self.state.stop
                    if done or self.state.step % self.train.ckpt_every == 0:
                        self.save_checkpoint()
        if self.metrics is not None:
            self.metrics.close()
        return self.state


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return _batch_len(batch[0])
    return 1
