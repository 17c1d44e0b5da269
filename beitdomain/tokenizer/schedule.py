"""Annealing schedules for dVAE training, as pure functions of the step.

DALL-E (Ramesh et al. 2021, appendix A.2) anneals the Gumbel-softmax temperature from 1 to 1/16
(over its first 150k updates) and ramps the KL weight from 0 to 6.6 (over the first 5k). The
relaxation gap shrinks as the temperature falls, so the decoder sees samples closer to the hard
one-hot tokens it must decode at inference; ramping the KL weight up from 0 lets the encoder
first learn informative codes before the prior pulls the code distribution towards uniform.

DALL-E reaches 1/16 after 5% of its 3M updates and holds it: the decoder then trains on near-hard
samples, the codes that BEiT pre-training will use. `anneal_steps` gives that shape for any run
length (anneal over a fraction of the run, then hold). Its KL weight weighs a sum over sub-pixels
against a sum over cells; `kl_weight_per_element` turns a per-pixel weight into the one that
balances a reconstruction loss averaged over channels, so a recipe's value means the same for
1-channel and RGB tokenizers.

Example, a 100k-step run:

```
tau  = gumbel_temperature(step, total=100_000)             # 1.0 -> 0.0625
beta = kl_weight(step, warmup_steps=5_000, max_weight=6.6)  # 0 -> 6.6 over the first 5k steps
loss = model(x, temperature=tau).loss(beta)
```
"""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["anneal_steps", "gumbel_temperature", "kl_weight", "kl_weight_per_element"]


def _progress(step: int, total: int) -> float:
    """Fraction of ``total`` done, clamped to [0, 1]; ``total <= 0`` means already done."""
    if total <= 0:
        return 1.0
    return min(max(step / total, 0.0), 1.0)


def gumbel_temperature(
    step: int,
    total: int,
    start: float = 1.0,
    end: float = 1.0 / 16,
    mode: Literal["exp", "cosine"] = "exp",
) -> float:
    """Gumbel-softmax temperature at ``step``; ``start`` at step 0, ``end`` from ``total`` on.

    Modes, with progress ``t = clamp(step / total, 0, 1)``:

    * ``"exp"``: geometric interpolation ``start * (end / start) ** t``. Equal numbers of steps
      cut the temperature by equal ratios, so 1 -> 1/16 halves it every quarter of ``total``;
      the midpoint value is ``sqrt(start * end)``.
    * ``"cosine"``: ``end + (start - end) * (1 + cos(pi * t)) / 2``; flat at both ends, the
      midpoint value is ``(start + end) / 2``.

    Args:
        step: Optimizer step (0-based).
        total: Steps over which to anneal; afterwards the value stays at ``end``.
        start: Temperature at step 0 (> 0).
        end: Final temperature (> 0).
        mode: ``"exp"`` or ``"cosine"``.

    Raises:
        ValueError: If a temperature is not positive or ``mode`` is unknown.
    """
    if start <= 0 or end <= 0:
        raise ValueError(f"temperatures must be > 0, got start={start}, end={end}.")
    t = _progress(step, total)
    if mode == "exp":
        return start * (end / start) ** t
    if mode == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown temperature schedule mode {mode!r}; valid: 'exp', 'cosine'.")


def kl_weight(
    step: int,
    warmup_steps: int,
    max_weight: float,
    mode: Literal["cosine", "linear"] = "cosine",
) -> float:
    """KL weight (beta) at ``step``: 0 at step 0, ``max_weight`` from ``warmup_steps`` on.

    ``"cosine"`` ramps as ``max_weight * (1 - cos(pi * t)) / 2`` (flat at both ends), ``"linear"``
    as ``max_weight * t``, with ``t = clamp(step / warmup_steps, 0, 1)``; both give
    ``max_weight / 2`` at the midpoint. ``warmup_steps <= 0`` means no ramp.

    Args:
        step: Optimizer step (0-based).
        warmup_steps: Length of the ramp.
        max_weight: Final weight (>= 0).
        mode: ``"cosine"`` or ``"linear"``.

    Raises:
        ValueError: If ``max_weight`` is negative or ``mode`` is unknown.
    """
    if max_weight < 0:
        raise ValueError(f"max_weight must be >= 0, got {max_weight}.")
    t = _progress(step, warmup_steps)
    if mode == "cosine":
        return max_weight * 0.5 * (1.0 - math.cos(math.pi * t))
    if mode == "linear":
        return max_weight * t
    raise ValueError(f"unknown KL weight schedule mode {mode!r}; valid: 'cosine', 'linear'.")


def anneal_steps(fraction: float, total_steps: int) -> int:
    """Steps of the temperature anneal: `ceil(fraction * total_steps)`; the rest holds the end.

    Raises:
        ValueError: if `fraction` is not in (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"anneal fraction must be in (0, 1], got {fraction}")
    return max(1, math.ceil(fraction * total_steps))


def kl_weight_per_element(weight_per_pixel: float, in_chans: int) -> float:
    """The KL weight against a reconstruction loss averaged over `in_chans` channels.

    DALL-E's objective sums the reconstruction over sub-pixels (C per pixel) and the KL over
    token cells: per averaged element the KL weight is `beta / (C * d * d)` for d x d pixels per
    cell. A recipe states `beta / (d * d)` per pixel (0.1 for DALL-E's 6.6 at d = 8), which this
    divides by the channel count, so RGB is not weighted 3x more than gray.
    """
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    return weight_per_pixel / in_chans
