"""What a job sets up before the loop runs: the loader, the run length, the model to train.

`plan_run` turns a dataset and a job's `train` section into a loader over a
`ResumableBatchSampler` (what `Trainer` needs), the number of optimizer steps and the global
batch; `prepare_for_training` readies the model for the device (attention and patch-embedding
kernels, DDP, compile).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from beitdomain.config import TrainConfig
from beitdomain.data.sampler import ResumableBatchSampler
from beitdomain.engine.train import distributed as D
from beitdomain.engine.train.schedule import steps_for
from beitdomain.models.kernels import select_kernels

log = logging.getLogger(__name__)


def build_loader(
    dataset: Any,
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int | None = None,
    weights: Sequence[float] | None = None,
    dist: D.DistInfo | None = None,
    pin_memory: bool = False,
    device: torch.device | None = None,
) -> DataLoader:
    """A DataLoader over a `ResumableBatchSampler` (what `Trainer` needs).

    `num_workers=None` picks `default_num_workers(device)` for a trainer on `device`: what the
    machine has to spare, whatever the epoch's length. A short epoch (elpv-gpu on two GPUs has
    4 batches per rank) is no reason to load in the main process: the workers persist for the
    run, so they start once, and each 256-image batch loaded in the trainer's process is time
    the GPU idles.

    The loader gets its own torch.Generator so creating an iterator mid-epoch (on resume) does
    not consume the global RNG, which the model's dropout and drop-path draw from.
    """
    dist = dist or D.dist_info()
    sampler = ResumableBatchSampler(
        len(dataset),
        batch_size,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        rank=dist.rank,
        world_size=dist.world_size,
        weights=weights,
    )
    workers = D.default_num_workers(device) if num_workers is None else num_workers
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
        # Each index carries its epoch (EpochIndex), so workers can live for the whole run
        # instead of starting again every epoch.
        persistent_workers=workers > 0,
    )


@dataclass
class RunPlan:
    """How a job's data becomes optimizer steps: the loader, the run length, the global batch."""

    loader: DataLoader
    total_steps: int
    global_batch: int  # images per optimizer step, over all processes


def plan_run(
    dataset: Any,
    train: TrainConfig,
    *,
    seed: int,
    num_workers: int | None,
    device: torch.device,
    weights: Sequence[float] | None = None,
) -> RunPlan:
    """The loader (batch capped by the data, per process) and the run length in steps."""

    dist = D.dist_info()
    batch = min(train.batch_size, max(1, len(dataset) // dist.world_size))
    loader = build_loader(
        dataset,
        batch,
        seed=seed,
        num_workers=num_workers,
        weights=weights,
        dist=dist,
        pin_memory=device.type == "cuda",
        device=device,
    )
    total = steps_for(
        epochs=train.epochs,
        steps=train.steps,
        batches_per_epoch=len(loader),
        accum_steps=train.accum_steps,
        min_steps=train.min_steps,
    )
    return RunPlan(loader, total, batch * dist.world_size * train.accum_steps)


def prepare_for_training(model: nn.Module, train: TrainConfig, device: torch.device) -> nn.Module:
    """Picks the attention and patch-embedding kernels for `device`, DDP-wraps the module when
    several processes run, and compiles it when asked. Training on a CPU, freed memory stays
    in the process for the next step (`distributed.keep_freed_cpu_memory`)."""
    if device.type == "cpu":
        D.keep_freed_cpu_memory()
    select_kernels(model, device)
    wrapped = D.wrap_ddp(model, device, D.dist_info())
    if not train.compile:
        return wrapped
    try:
        compiled = torch.compile(wrapped)
    except Exception as err:  # e.g. a Python version dynamo does not support yet
        _warn_eager(err)
        return wrapped
    return CompiledWithFallback(wrapped, compiled)


def _warn_eager(err: BaseException) -> None:
    log.warning(
        "train.compile: torch.compile failed (%s: %s); training goes on without it (eager), "
        "as with train.compile=false",
        type(err).__name__,
        str(err).strip().splitlines()[0] if str(err).strip() else "",
    )


class CompiledWithFallback(nn.Module):
    """`torch.compile(module)`, or `module` itself (eager) once compiling it failed.

    torch.compile is lazy: it compiles at the first call (the backward at the first backward)
    and again when shapes or modes change, so a missing compiler, an unsupported op or a
    backend bug shows up then, not at `torch.compile`. What falls back, with one warning:
    any failure of the first compiled call that the eager module does not repeat (the call is
    run again eagerly, so an error of the model itself still raises, with no warning), and
    torch's own compile errors (`torch._dynamo.exc.TorchDynamoException`) at any later call.
    The trainer does the same for a failure in the backward (`fall_back`).

    `_orig_mod` is the module (as on torch's OptimizedModule): `distributed.unwrap` and
    `maybe_no_sync` find it, and it holds the parameters; the compiled wrapper is kept out of
    the module tree so that they are not listed twice.
    """

    def __init__(self, module: nn.Module, compiled: Any) -> None:
        super().__init__()
        self._orig_mod = module
        self.__dict__["compiled"] = compiled
        self.eager = False  # True once compiling failed
        self.proven = False  # True once a compiled call (forward and backward) succeeded

    def can_fall_back(self, err: BaseException) -> bool:
        """Whether `err`, raised by a call or its backward, is one to leave compiling for."""
        if self.eager or not isinstance(err, Exception):
            return False
        return not self.proven or isinstance(err, torch._dynamo.exc.TorchDynamoException)

    def fall_back(self, err: BaseException) -> None:
        """Runs eagerly from now on, saying why once."""
        if not self.eager:
            self.eager = True
            _warn_eager(err)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.eager:
            return self._orig_mod(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as err:
            if not self.can_fall_back(err):
                raise
            out = self._orig_mod(*args, **kwargs)  # an error of the model itself raises here
            self.fall_back(err)
            return out
