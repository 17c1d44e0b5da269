"""Shared helpers of the speed benchmarks: devices, timing, FLOP counting, MFU, tables.

The step benchmarks (`pretrain_step.py`, `finetune_step.py`) and the GPU suite import this file
as a sibling module (`benchmarks/` is not a package), so each script runs as
`python benchmarks/<script>.py` from the repository root.

Conventions: FLOPs are `2 x multiply-accumulates` as counted by
`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention; element-wise ops
such as GELU, LayerNorm, softmax and the optimizer are not counted), the usual basis of
"model FLOPs utilization" (MFU = counted FLOPs per second / the device's dense peak).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from beitdomain.engine import distributed as D

REPO = Path(__file__).resolve().parents[1]

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets. Matched
# against `torch.cuda.get_device_name()` in this order (first hit wins).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM / HBM3 (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)


def resolve_device(name: str) -> torch.device:
    """The library's device resolution (`engine.distributed.resolve_device`): 'auto' is CUDA
    when available, else CPU; a CUDA device that torch cannot see is an error."""
    return D.resolve_device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--dtype`, with `train.precision`'s meaning (the library's
    `resolve_precision`): 'auto' is bf16 on CUDA and on CPUs with native bf16, else fp32."""
    if name not in ("auto", "bf16", "fp32"):
        raise SystemExit(f"--dtype {name!r}: expected auto, bf16 or fp32")
    return D.resolve_precision(name, device)


def dtype_name(dtype: torch.dtype | None) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


autocast = D.autocast  # what `Trainer` runs each step under


def matmul_peak_gflops(
    dtype: torch.dtype,
    device: torch.device,
    *,
    n: int = 2048,
    repeats: int = 5,
    clock: str = "wall",
) -> float:
    """This machine's own dense matmul rate: the best of `repeats` `n x n` `torch.matmul`s.

    Measured in the calling process with its thread count, so a step's share of it says how
    close the step comes to what the hardware does on the one op it is made of. Best, not
    median: the peak is what an undisturbed matmul reaches (a shared machine only slows it).
    `clock="cpu"` times by process CPU time (for one-thread runs on a loaded machine, where
    the wall clock mostly measures the other jobs).
    """
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up: oneDNN / cuBLAS pick their kernels on the first call
    best = float("inf")
    for _ in range(repeats):
        wall, cpu = timed(lambda: torch.matmul(a, b), device)
        best = min(best, cpu if clock == "cpu" else wall)
    return 2 * n**3 / best / 1e9


def matmul_peaks(device: torch.device, clock: str = "wall") -> dict[str, float]:
    """{"fp32": GFLOP/s, "bf16": GFLOP/s} of `matmul_peak_gflops` on `device`."""
    return {
        "fp32": matmul_peak_gflops(torch.float32, device, clock=clock),
        "bf16": matmul_peak_gflops(torch.bfloat16, device, clock=clock),
    }


def peak_share(flops_per_img: float, img_per_s: float, peak_gflops: float | None) -> float | None:
    """Counted FLOPs per second as a share of a measured matmul peak (GFLOP/s)."""
    if not peak_gflops:
        return None
    return flops_per_img * img_per_s / (peak_gflops * 1e9)


def device_name(device: torch.device) -> str:
    """Human-readable name of the device (GPU model, or the CPU model and thread count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def default_peak_tflops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """The device's dense bf16 peak (TFLOP/s) when known and the run is bf16, else None."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak
    return None


def git_commit() -> str:
    """Short commit of the repository (with '+dirty' when tracked files changed), or 'unknown'."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def env_info(device: torch.device) -> dict[str, Any]:
    """Date, device, library versions, commit and machine load: the header of every table."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "commit": git_commit(),
        "threads": torch.get_num_threads(),
    }
    with contextlib.suppress(ImportError):
        import timm

        info["timm"] = timm.__version__
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    with contextlib.suppress(OSError, AttributeError):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return info


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


def interleaved_times(
    fns: dict[str, Callable[[], Any]], *, steps: int, warmup: int, device: torch.device
) -> dict[str, dict[str, list[float]]]:
    """Times every function `steps` times, alternating between them, after `warmup` calls each.

    Alternating (and reversing the order every round) spreads slow phases of a shared machine,
    thermal changes and allocator growth over all contestants instead of penalising one.

    Returns:
        name -> {"wall": [...], "cpu": [...]}, `steps` durations in seconds each. On a shared
        CPU the process CPU time is less disturbed by other jobs than the wall clock.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for i in range(steps):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            wall, cpu = timed(fns[name], device)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    return times


def summarize(times: dict[str, list[float]], batch: int) -> dict[str, float]:
    """Median / min / max wall seconds per step, the median's img/s and median CPU seconds."""
    wall = times["wall"]
    med = statistics.median(wall)
    return {
        "step_s": med,
        "step_min_s": min(wall),
        "step_max_s": max(wall),
        "img_per_s": batch / med,
        "cpu_s": statistics.median(times["cpu"]),
    }


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    # FlopCounterMode counts the math decomposition of SDPA on every device (and the fused
    # kernels on CUDA); forcing it makes CPU and GPU counts identical.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (2 x MACs) of everything `fn` runs, forward and backward, counted per op."""
    from torch.utils.flop_counter import FlopCounterMode

    with _math_attention(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def mfu(flops_per_img: float, img_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilization in [0, 1], or None without a peak."""
    if not peak_tflops:
        return None
    return flops_per_img * img_per_s / (peak_tflops * 1e12)


def vit_train_gflops(
    *,
    tokens: int,
    dim: int,
    depth: int,
    mlp_ratio: float,
    patch_pixels: int,
    head_tokens: int,
    head_out: int,
) -> float:
    """Analytic training GFLOP per image of a ViT: 3 x forward (backward = 2 x forward).

    Forward per block: qkv 6ND^2 + proj 2ND^2 + MLP 4rND^2 + attention 4N^2D; patch embedding
    2L(p^2 C)D; a head of `head_out` outputs on `head_tokens` tokens. For ViT-B/16 at 224 with no
    head this gives 3 x 35.2 = 105.6, the "about 107 GFLOP" of issue 9 (which rounds in a
    classifier head and the embeddings' backward, which we do not need).
    """
    n, d = tokens, dim
    block = (8 + 4 * mlp_ratio) * n * d * d + 4 * n * n * d
    patches = tokens - 1
    fwd = depth * block + 2 * patches * patch_pixels * d + 2 * head_tokens * d * head_out
    return 3 * fwd / 1e9


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated CUDA memory since the last reset, GiB (None on CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def allocated_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.memory_allocated(device) / 2**30


def free_memory(device: torch.device) -> None:
    """Drops cached blocks (after an OOM or between measurements)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def largest_batch(fits: Callable[[int], bool], *, start: int, cap: int) -> int:
    """Largest batch `b <= cap` with `fits(b)`, assuming fitting is monotone in `b`.

    Doubles from `start` until a batch does not fit (or `cap`), then bisects. Returns 0 when not
    even `start` fits.
    """
    lo, hi = 0, None  # lo fits, hi does not
    b = max(1, start)
    while b <= cap:
        if fits(b):
            lo = b
            if b == cap:
                return cap
            b = min(2 * b, cap)
        else:
            hi = b
            break
    if hi is None:
        return lo
    while hi - lo > max(1, lo // 32):  # ~3% resolution: each probe costs a full step
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def is_oom(exc: BaseException) -> bool:
    """True for CUDA out-of-memory errors (and their cuDNN/cuBLAS cousins)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text
    )


def fmt(value: Any, spec: str = ",.1f", none: str = "n/a") -> str:
    """Formats a number for a table cell; None -> `none`, strings pass through."""
    if value is None:
        return none
    if isinstance(value, str):
        return value
    return format(value, spec)


def fmt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], left: Sequence[int] = (0,)
) -> str:
    """A GitHub markdown table; columns in `left` left-aligned (text), the others right."""
    align = ["---" if i in left else "---:" for i in range(len(headers))]
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join(align) + " |",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def header_lines(info: dict[str, Any]) -> str:
    """One line of run facts to print above a table."""
    keys = ("date", "device", "torch", "timm", "transformers", "cuda", "commit", "load_avg_1m")
    return ", ".join(f"{k} {info[k]}" for k in keys if k in info)
