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
import time
from dataclasses import dataclass
from typing import Any

import torch

from beitdomain.progress import format_duration

log = logging.getLogger(__name__)

EFFICIENCY = 0.8  # measured training FLOP rate / measured matmul rate (see the docstring)
WARN_SECONDS = 30 * 60  # a CPU run estimated longer than this is announced as a warning
WARN_STEP_SECONDS = 60  # ...and so is one whose every step takes longer than this
CPU_RECIPES = {"dicom": "cpu-dicom", "tiff": "cpu-tiff", "rgb": "cpu-rgb"}


@functools.lru_cache(maxsize=4)
def matmul_gflops(
    dtype: torch.dtype = torch.float32, seconds: float = 0.25, windows: int = 5
) -> float:
    """This machine's matrix-multiply rate in GFLOP/s (measured once per process, ~0.3 s).

    The best of `windows` short windows: a moment of contention (loader workers starting, another
    process) slows one window, not the estimate; one 0.25 s window once made it 4x too long.
    """
    n = 512
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: thread pool, kernels
    best = 0.0
    for _ in range(windows):
        count, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds / windows or count == 0:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / elapsed / 1e9)
    return best


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
