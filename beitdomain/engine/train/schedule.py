"""Schedules as pure functions of the optimizer step, so a resumed run recomputes them exactly."""

from __future__ import annotations

import math

from beitdomain.user import UserError


def cosine_lr(
    step: int, total_steps: int, base_lr: float, min_lr: float, warmup_steps: int
) -> float:
    """Linear warm-up from ~0 to `base_lr`, then half-cosine decay to `min_lr` at `total_steps`.

    Args:
        step: optimizer steps taken so far (0-based: the lr for the next step).
        total_steps: length of the run in optimizer steps.
        base_lr: peak learning rate, reached at the end of warm-up.
        min_lr: final learning rate.
        warmup_steps: linear warm-up length; clamped to the run.
    """
    warmup_steps = min(warmup_steps, total_steps)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling rule: lr grows with the global batch (Goyal et al. 2017).

    BEiT's 1.5e-3 at batch 2048 is base_lr = 1.5e-3 * 256 / 2048 = 1.875e-4 per 256 images.
    """
    return base_lr * global_batch / reference_batch


def steps_for(
    *,
    epochs: float | None,
    steps: int | None,
    batches_per_epoch: int,
    accum_steps: int = 1,
    min_steps: int = 0,
) -> int:
    """Run length in optimizer steps: explicit `steps`, else epochs x steps per epoch, at least
    `min_steps` (so a 19-image label subset is not trained for 12 steps)."""
    if steps is not None:
        return max(1, steps)
    if epochs is None:
        raise UserError(
            "set train.epochs or train.steps in the job's section (e.g. pretrain.train.steps)"
        )
    per_epoch = max(1, batches_per_epoch // max(1, accum_steps))
    return max(1, math.ceil(epochs * per_epoch), min_steps)
