"""Device, precision and process-group helpers; one process per GPU under `torchrun`.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything runs as a single process.
CUDA processes use NCCL, CPU processes use gloo (which is how the CPU tests exercise DDP).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import random
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from beitdomain.precision import autocast as autocast  # the one context, re-exported
from beitdomain.rank import DistInfo, dist_info
from beitdomain.user import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> this process's CUDA device when available, else CPU."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for, but torch sees no CUDA device")
        if name == "cuda":
            name = f"cuda:{dist_info().local_rank}"
    return torch.device(name)


def init_distributed(device: torch.device) -> DistInfo:
    """Joins the process group when launched by torchrun; a no-op for a single process."""
    info = dist_info()
    if info.world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        info = dist_info()
    return info


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: object) -> object:
    """Rank 0's value on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order, on every rank (`[obj]` for a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Averages scalar metrics over ranks (for logging)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seeds Python, NumPy and torch; `deterministic` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s own random stream: `seed` itself on rank 0 (so a single
    process seeds exactly as it always did), a value drawn from `(seed, rank)` elsewhere."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**63, rank]).generate_state(1, np.uint64)[0] >> 1)


def seed_this_rank(seed: int, info: DistInfo) -> None:
    """Gives every rank but rank 0 its own random stream (`rank_seed`).

    Called once the model is built and DDP-wrapped: up to there every rank draws the same
    numbers (the same initial weights), from there on drop path, dropout and the tokenizer's
    Gumbel noise differ between ranks, as they would on one GPU over the global batch instead
    of repeating one rank's draws on every other. Rank 0 keeps its stream untouched. The data
    order is not drawn from these streams: the sampler and the augmentations have their own
    generators, seeded by the recipe's seed alone.
    """
    if info.rank == 0:
        return
    s = rank_seed(seed, info.rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def use_tf32(device: torch.device, precision: str) -> bool:
    """Lets the fp32 matmuls and convolutions on a CUDA device run on TF32 tensor cores.

    Under bf16 autocast some matmuls stay fp32 (the tokenizer's codebook product, the dead-code
    split), and on a GPU without bf16 all of them do; TF32 runs them on the tensor cores
    (A100/H100: several times the fp32 rate) with a 10-bit mantissa, more than the bf16 the
    rest of the step already uses. `train.precision=fp32` asks for IEEE fp32 and keeps it.
    Returns whether TF32 was turned on.
    """
    if device.type != "cuda" or precision == "fp32":
        return False
    set_tf32(True)
    return True


def set_tf32(on: bool) -> None:
    """Turns TF32 for fp32 matmuls and convolutions on or off, through the `fp32_precision`
    settings where torch has them (2.9 and newer; `allow_tf32` is deprecated there) and through
    `allow_tf32` before."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if on else "ieee"
        cudnn.conv.fp32_precision = "tf32" if on else "ieee"
    else:  # torch < 2.9
        matmul.allow_tf32 = on
        cudnn.allow_tf32 = on


def tf32_enabled() -> bool:
    """Whether fp32 matmuls and convolutions may run on TF32 (both must)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32" and cudnn.conv.fp32_precision == "tf32"
    return bool(matmul.allow_tf32 and cudnn.allow_tf32)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX tiles).

    On such CPUs (AMD Zen 4 and newer, Intel Cooper Lake / Sapphire Rapids and newer) oneDNN's
    bf16 matmuls and convolutions run about twice as fast as fp32; elsewhere autocast to bf16
    would emulate it and run slower, so fp32 stays the default there.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch >= 2.1, private
    for name in probes:
        fn = getattr(torch.cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:
            continue
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.precision` on `device`; None means fp32.

    'auto' is bf16 on CUDA GPUs that support it and on CPUs with native bf16 arithmetic
    (`cpu_has_native_bf16`), fp32 otherwise. Weights, optimizer state and losses stay fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError(
                "train.precision=bf16, but this GPU does not support bfloat16; use auto or fp32"
            )
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP and torch.compile wrappers (whose state_dict has clean keys)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def wrap_ddp(model: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    """DDP-wraps `model` when more than one process runs."""
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


@contextlib.contextmanager
def maybe_no_sync(model: nn.Module, skip_sync: bool) -> Iterator[None]:
    """Skips DDP's gradient all-reduce on the micro-steps before the last of an accumulation.

    With `train.compile` the trainer holds `torch.compile(DDP(m))`, an OptimizedModule around
    the DDP module (inside `plan.CompiledWithFallback`); the DDP module's `no_sync` is the one
    to enter (the wrappers have none). Both wrappers hold what they wrap as `_orig_mod`.
    """
    if skip_sync:
        while not isinstance(model, nn.parallel.DistributedDataParallel) and hasattr(
            model, "_orig_mod"
        ):
            model = model._orig_mod
    if skip_sync and isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


def usable_cores() -> list[int]:
    """The CPU cores this process may run on (its affinity); where the system has no affinity
    (macOS, Windows), all of `os.cpu_count()`'s."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def default_num_workers(device: torch.device | None = None) -> int:
    """Loader workers per process, for a trainer on `device` (None: an accelerator).

    With an accelerator doing the math: the cores this process may use, minus one for the
    trainer. Training on the CPU, torch's threads already take the cores, and a worker only
    competes with them: each of a step's ~1,000 parallel ops waits for a descheduled thread.
    There the workers get what torch's threads leave free (hyper-threads, or cores outside
    `torch.get_num_threads()`), and at least one core in eight, so that a big machine does not
    load in its main process (loading is about 5% of a CPU step's work: 150 us per item against
    ~3 ms of the step). On the 2-core Xeon that means no worker: the demo's pre-training ran
    12% and its fine-tuning 21% more images per second than with one (BENCHMARKS.md; larger
    CPUs not measured).
    """
    cores = len(usable_cores())
    per_proc = max(1, cores // max(1, dist_info().world_size))
    if device is not None and device.type == "cpu":
        free = per_proc - torch.get_num_threads()
        return max(0, min(8, max(free, per_proc // 8)))
    return max(0, min(8, per_proc - 1))


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30


@functools.cache
def keep_freed_cpu_memory() -> bool:
    """Tells glibc's malloc to keep freed memory for reuse instead of giving it back to the OS.

    A CPU training step allocates and frees the same few hundred activation and gradient
    tensors every step. With glibc's defaults, the large ones are mmapped and unmapped (or
    trimmed off the heap) each time, and each of their pages faults in again on first touch:
    about 3,000 page faults per step of the demo's pre-training, expensive in a virtual
    machine. Kept, the next step reuses the same pages; the process's resident memory stays at
    its peak between steps instead of falling back. Like the LD_PRELOADed allocators that
    PyTorch's CPU tuning guide suggests, but without one: glibc only, a no-op elsewhere, and
    left alone when the user set glibc's MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ or
    preloads an allocator. Returns whether it was applied.
    """
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    if any(a in os.environ.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018  (glibc, not musl or macOS's libc)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)
    )
