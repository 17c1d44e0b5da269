"""How long will this take here? A compute estimate, said before a long CPU run starts.

A recipe sized for a GPU (ViT-B at 224 px, a 29.5M-parameter dVAE at 112 px, batch 128) runs on
a CPU too, only for hours to days, and nothing said so: `tokenizer train --recipe ct-dicom
--steps 2` took 7 min 47 s. Before training, each job multiplies its steps and images by the
model's training FLOPs per image (3x the forward pass: forward + backward) and divides by this
CPU's measured matrix-multiply rate. When that comes to more than `WARN_SECONDS`, it warns
with the estimate and the laptop-sized recipe to use instead.

Calibration (2-core shared CPU, fp32): the ct-dicom tokenizer's step measured 0.164 img/s;
89 GFLOP per image at a measured 15.2 GFLOP/s x `EFFICIENCY` predicts 0.137 img/s.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from beitdomain.progress import format_duration

log = logging.getLogger(__name__)

EFFICIENCY = 0.8  # measured training FLOP rate / measured matmul rate (see the docstring)
WARN_SECONDS = 30 * 60  # a CPU run estimated longer than this is announced as a warning
WARN_STEP_SECONDS = 60  # ...and so is one whose every step takes longer than this
CPU_RECIPES = {"dicom": "cpu-dicom", "tiff": "cpu-tiff", "rgb": "cpu-rgb"}


def sync(device: torch.device) -> None:
    """Waits for queued kernels, so a wall-clock interval covers the work it launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call of `fn`, synchronized."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def measure_matmul_gflops(
    dtype: torch.dtype = torch.float32,
    seconds: float = 0.25,
    windows: int = 5,
    *,
    device: torch.device | None = None,
    n: int = 512,
    clock: str = "wall",
    timer: Callable[[Callable[[], Any], torch.device], tuple[float, float]] = timed,
) -> float:
    """This machine's dense `n x n` matrix-multiply rate in GFLOP/s, measured now.

    The best of `windows` windows of back-to-back matmuls, each about `seconds / windows`
    long (at least one matmul; `seconds=0`: one each). Best, not median: a moment of contention
    (loader workers starting, another process) slows one window, not the rate; one 0.25 s
    window once made the estimate 4x too long. `clock="cpu"` times by process CPU time (for
    one-thread runs on a loaded machine, where the wall clock mostly measures the other jobs).
    `timer` times one call, as `timed` does.
    """
    device = device or torch.device("cpu")
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up: thread pool; oneDNN / cuBLAS pick their kernels
    calls = 1
    if seconds > 0:  # as many matmuls per window as fill it, from one timed call
        wall, _ = timer(lambda: torch.matmul(a, b), device)
        calls = max(1, math.ceil(seconds / windows / max(wall, 1e-9)))

    def window() -> None:
        for _ in range(calls):
            torch.matmul(a, b)

    best = math.inf
    for _ in range(windows):
        wall, cpu = timer(window, device)
        best = min(best, cpu if clock == "cpu" else wall)
    return 2 * n**3 * calls / max(best, 1e-9) / 1e9


@functools.lru_cache(maxsize=4)
def matmul_gflops(
    dtype: torch.dtype = torch.float32, seconds: float = 0.25, windows: int = 5
) -> float:
    """This CPU's matrix-multiply rate in GFLOP/s, measured once per process (~0.3 s):
    `measure_matmul_gflops` of 512 x 512 matmuls."""
    return measure_matmul_gflops(dtype, seconds, windows)


def vit_forward_gflops(
    img_size: int, patch_size: int, embed_dim: int, depth: int, mlp_ratio: float = 4.0
) -> float:
    """Forward GFLOP per image of a ViT: per block 2 x (T x D^2 x (4 + 2 x mlp) + 2 x T^2 x D)."""
    tokens = (img_size // patch_size) ** 2 + 1
    d = embed_dim
    macs_block = tokens * d * d * (4 + 2 * mlp_ratio) + 2 * tokens * tokens * d
    patch_macs = tokens * d * patch_size * patch_size  # the patch embedding (per channel)
    return 2 * (depth * macs_block + patch_macs) / 1e9


def model_forward_gflops(model: torch.nn.Module, in_chans: int, image_size: int) -> float:
    """Forward GFLOP per image of any module, counted by torch on one image (eval mode)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(1, in_chans, image_size, image_size, device=param.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was)
    return counter.get_total_flops() / 1e9


def backbone_forward_gflops(cfg: Any) -> float:
    """`vit_forward_gflops` of a `BackboneConfig`."""
    return vit_forward_gflops(cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.mlp_ratio)


@dataclass
class Estimate:
    stage: str
    steps: int
    images_per_step: int
    train_gflops_per_image: float
    machine_gflops: float
    seconds: float

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, self.steps)

    def describe(self) -> str:
        return (
            f"{self.steps:,} steps x {self.images_per_step} images x "
            f"{self.train_gflops_per_image:.2f} GFLOP per image (forward + backward) at about "
            f"{self.machine_gflops * EFFICIENCY:.0f} GFLOP/s on this CPU: about "
            f"{format_duration(self.seconds)} ({format_duration(self.seconds_per_step)} a step)"
        )


def estimate_cpu_time(
    stage: str,
    steps: int,
    images_per_step: int,
    forward_gflops: float,
    dtype: torch.dtype = torch.float32,
    frozen_gflops: float = 0.0,
) -> Estimate:
    """The time `steps` training steps take on this CPU.

    Args:
        stage: 'tokenizer', 'pretrain' or 'finetune' (for the message).
        steps, images_per_step: the run's length and global batch.
        forward_gflops: forward GFLOP per image of the trained model (x3 for training).
        dtype: the precision it trains in (bf16 autocast on CPUs that support it).
        frozen_gflops: forward-only GFLOP per image of frozen parts (pre-training's tokenizer).
    """
    per_image = 3 * forward_gflops + frozen_gflops
    rate = matmul_gflops(dtype)
    seconds = steps * images_per_step * per_image / max(1e-6, rate * EFFICIENCY)
    return Estimate(stage, steps, images_per_step, per_image, rate, seconds)


def cpu_recipe_for(recipe_data_hint: str | None) -> str:
    """The shipped laptop recipe for a kind of data ('dicom', 'tiff', 'rgb')."""
    return CPU_RECIPES.get(recipe_data_hint or "", "cpu-dicom")


def warn_if_slow_on_cpu(
    est: Estimate, device: torch.device, recipe_name: str | None, data_kind: str | None = None
) -> bool:
    """Logs a warning with the estimate when a CPU run would take longer than `WARN_SECONDS`.

    Returns whether it warned.
    """
    if device.type != "cpu":
        return False
    if est.seconds <= WARN_SECONDS and est.seconds_per_step <= WARN_STEP_SECONDS:
        log.info("%s on this CPU: %s", est.stage, est.describe())
        return False
    name = f"recipe '{recipe_name}'" if recipe_name else "this recipe"
    log.warning(
        "%s with %s on a CPU: %s. It is sized for a GPU: for a laptop-sized run use "
        "--recipe %s (minutes), or run on a GPU (--device cuda). Ctrl-C saves a checkpoint; "
        "--resume continues.",
        est.stage,
        name,
        est.describe(),
        cpu_recipe_for(data_kind),
    )
    return True


def data_kind(recipe: Any) -> str:
    """'dicom', 'tiff' or 'rgb': which laptop recipe to suggest for this recipe's data."""
    name = (recipe.name or "").lower()
    if "tif" in name:
        return "tiff"
    if recipe.data.in_chans == 3 or "rgb" in name:
        return "rgb"
    return "dicom"


def announce_cpu_time(
    job: Any, steps: int, images_per_step: int, forward_gflops: float, frozen_gflops: float = 0.0
) -> Estimate | None:
    """Estimates a job's time on a CPU and warns when it is long (main process; None on GPU)."""
    if job.device.type != "cpu" or not job.is_main:
        return None
    dtype = job.amp_dtype or torch.float32
    est = estimate_cpu_time(
        job.kind, steps, images_per_step, forward_gflops, dtype, frozen_gflops=frozen_gflops
    )
    warn_if_slow_on_cpu(est, job.device, job.recipe.name, data_kind(job.recipe))
    return est
