"""Shared helpers of the speed benchmarks: devices, timing, FLOP counting, MFU, tables, and the
setup, measurement, table and flags the two step benchmarks have in common.

The step benchmarks (`pretrain_step.py`, `finetune_step.py`) and the GPU suite import this file
as a sibling module (`benchmarks/` is not a package), so each script runs as
`python benchmarks/<script>.py` from the repository root.

Conventions: FLOPs are `2 x multiply-accumulates` as counted by
`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention; element-wise ops
such as GELU, LayerNorm, softmax and the optimizer are not counted), the usual basis of
"model FLOPs utilization" (MFU = counted FLOPs per second / the device's dense peak).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from beitdomain.engine.train import distributed as D
from beitdomain.engine.train import estimate as E
from beitdomain.models.backbone import BackboneConfig
from beitdomain.tokenizer.flops import count_params

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets. Matched
# against `torch.cuda.get_device_name()` in this order (first hit wins), so each variant comes
# before the plain "H100" it contains.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    # "NVIDIA H100 NVL" (94 GB, PCIe card, 350-400 W): 1,671 TFLOP/s with sparsity on the spec
    # table of https://www.nvidia.com/en-us/data-center/h100/, half of it dense
    ("H100 NVL", 835.5),
    ("H100", 989.0),  # SXM / HBM3 (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)


# The library's device resolution: 'auto' is CUDA when available, else CPU; a CUDA device that
# torch cannot see is an error.
resolve_device = D.resolve_device


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
    """This machine's own dense matmul rate: the best of `repeats` `n x n` `torch.matmul`s
    (the engine's `measure_matmul_gflops`, one matmul a window, timed by `timed`).

    Measured in the calling process with its thread count, so a step's share of it says how
    close the step comes to what the hardware does on the one op it is made of. Best, not
    median: the peak is what an undisturbed matmul reaches (a shared machine only slows it).
    """
    return E.measure_matmul_gflops(
        dtype, 0.0, repeats, device=device, n=n, clock=clock, timer=timed
    )


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
    return known_peak_tflops(torch.cuda.get_device_name(device))


def known_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of the GPU called `device_name`, when the table has it."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key in device_name:
            return peak
    return None


def commit_label() -> str:
    """The commit the run folders record (`engine.run.folder.git_commit`), short, with '+dirty'
    when tracked files differ from it (a timing of uncommitted code is not that commit's), or
    'unknown' outside a git checkout."""
    # Imported here, as `backbone_train_gflops`'s count: `demo_step.py --ab` imports this file
    # against older checkouts, which may not have them.
    from beitdomain.engine.run.folder import git_commit

    commit = git_commit()
    if commit is None:
        return "unknown"
    try:
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return commit[:7] + ("+dirty" if dirty else "")


def env_info(device: torch.device) -> dict[str, Any]:
    """Date, device, library versions, commit and machine load: the header of every table."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "commit": commit_label(),
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


sync = E.sync  # waits for queued kernels, so a wall-clock interval covers their work
timed = E.timed  # (wall seconds, process CPU seconds) of one call, synchronized


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
    """Model FLOPs utilization in [0, 1]: the `peak_share` of the device's data-sheet peak
    (TFLOP/s), or None without one."""
    return peak_share(flops_per_img, img_per_s, peak_tflops * 1e3 if peak_tflops else None)


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


# ---- what the step benchmarks (pretrain_step.py, finetune_step.py) share ---------------------


@dataclass(frozen=True)
class StepSettings:
    """What both step benchmarks take (their common flags). Sizes left None take the device's
    default, the script's `CPU_DEFAULTS` / `GPU_DEFAULTS` (see `sizes`)."""

    preset: str | None = None  # backbone preset (`models.backbone.BACKBONE_PRESETS`)
    depth: int | None = None  # override the preset's number of blocks
    img_size: int | None = None  # backbone input side
    in_chans: int = 3  # image channels (1 for grayscale domains)
    batch: int | None = None  # images per step
    steps: int = 12  # timed steps per model (median reported)
    warmup: int = 3  # untimed steps per model first
    device: str = "auto"  # 'auto', 'cpu', 'cuda' or 'cuda:N'
    dtype: str = "auto"  # autocast dtype: 'auto' (as `train.precision`), 'bf16' or 'fp32'
    compile: bool = False  # `torch.compile` the model(s)
    peak_tflops: float | None = None  # device peak for MFU; None = the GPU's known bf16 peak
    seed: int = 0  # seed of weights and data

    def sizes(
        self, device: torch.device, cpu: Mapping[str, Any], gpu: Mapping[str, Any], **more: Any
    ) -> dict[str, Any]:
        """preset, depth, img_size, batch and the script's `more` sizes (e.g. its tokenizer),
        each unset one (None) from the device's defaults.

        A preset given keeps its own depth unless a depth is given too: the defaults' depth
        belongs to the default preset.
        """
        given = dict(
            preset=self.preset, depth=self.depth, img_size=self.img_size, batch=self.batch, **more
        )
        defaults = gpu if device.type == "cuda" else cpu
        sizes = {k: defaults[k] if v is None else v for k, v in given.items()}
        if self.preset is not None and self.depth is None:
            sizes["depth"] = None
        return sizes


def cycling_step(
    loss_fn: Callable[[Any], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Any],
    device: torch.device,
    dtype: torch.dtype | None,
) -> Callable[[], None]:
    """A closure running one full training step on the next of `batches` (cycling through them):
    `loss_fn(batch)` under the autocast dtype, backward in fp32, `optimizer.step()` and
    `zero_grad(set_to_none=True)`, as `Trainer` runs a step."""
    cycle = itertools.cycle(batches)

    def step() -> None:
        with autocast(device, dtype):
            loss = loss_fn(next(cycle))
        loss.float().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def count_train_flops(model: torch.nn.Module, fn: Callable[[], Any]) -> int:
    """`count_flops(fn)` of a forward + backward through `model`; its gradients are dropped
    after, so the timed steps start from the state the optimizer left."""
    flops = count_flops(fn)
    for p in model.parameters():
        p.grad = None
    return flops


def machine_peaks(device: torch.device) -> dict[str, dict[str, float]]:
    """This machine's matmul peaks now, with this run's threads: {"wall": ..., "cpu": ...},
    each `matmul_peaks` by that clock (the CPU clock is steadier on a shared machine)."""
    return {"wall": matmul_peaks(device), "cpu": matmul_peaks(device, clock="cpu")}


def step_throughput(
    times: dict[str, list[float]],
    batch: int,
    flops_per_img: float,
    *,
    peak_tflops: float | None,
    peaks: Mapping[str, Mapping[str, float]],
    dtype: torch.dtype | None,
) -> dict[str, float | None]:
    """`summarize`d step times plus MFU and the shares of the matmul peak of the run's dtype,
    by the wall clock ("peak_share") and by process CPU time ("peak_share_cpu")."""
    r: dict[str, float | None] = dict(summarize(times, batch))
    r["mfu"] = mfu(flops_per_img, r["img_per_s"], peak_tflops)
    r["peak_share"] = peak_share(flops_per_img, r["img_per_s"], peaks["wall"][dtype_name(dtype)])
    r["peak_share_cpu"] = peak_share(
        flops_per_img, batch / r["cpu_s"], peaks["cpu"][dtype_name(dtype)]
    )
    return r


def step_memory(step: Callable[[], None], device: torch.device, batch: int) -> dict[str, Any]:
    """Peak CUDA memory of one step ("peak_gib") and, per image, the part above what weights,
    optimizer state and batches hold ("mem_per_img_mib"); None for both on CPU."""
    if device.type != "cuda":
        return {"peak_gib": None, "mem_per_img_mib": None}
    free_memory(device)
    sync(device)
    baseline = allocated_gib(device)
    reset_peak_memory(device)
    step()
    sync(device)
    peak = peak_memory_gib(device)
    return {"peak_gib": peak, "mem_per_img_mib": (peak - baseline) * 1024 / batch}


def model_facts(model: torch.nn.Module, flops_per_img: float) -> dict[str, Any]:
    """The parameter count and counted GFLOP per image of a contestant."""
    return {"params": count_params(model), "gflops_per_img": flops_per_img / 1e9}


def backbone_train_gflops(cfg: BackboneConfig, *, head_tokens: int, head_out: int) -> float:
    """Analytic training GFLOP per image: 3 x forward (backward = 2 x forward) of the backbone,
    by the engine's own count (`engine.train.estimate.backbone_forward_gflops`, what its CPU
    time estimate uses), plus a head of `head_out` outputs on `head_tokens` tokens.

    For ViT-B/16 at 224 with no head this gives 3 x 35.0 = 104.9, the "about 107 GFLOP" of
    issue 9 (which rounds in a classifier head and the embeddings' backward).
    """
    from beitdomain.engine.train.estimate import backbone_forward_gflops

    head = 2 * head_tokens * cfg.embed_dim * head_out / 1e9
    return 3 * (backbone_forward_gflops(cfg) + head)


def step_config(
    cfg: BackboneConfig,
    settings: StepSettings,
    sizes: Mapping[str, Any],
    *,
    peaks: Mapping[str, Mapping[str, float]],
    dtype: torch.dtype | None,
    **more: Any,
) -> dict[str, Any]:
    """The "config" of a step benchmark's result: the backbone, the `sizes` and settings the run
    used, the machine's matmul peaks and the script's `more` facts (e.g. the MFU peak)."""
    backbone = ("preset", "depth", "img_size", "batch")
    return {
        "preset": sizes["preset"],
        "depth": cfg.depth,
        "embed_dim": cfg.embed_dim,
        "num_heads": cfg.num_heads,
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "in_chans": cfg.in_chans,
        **{k: v for k, v in sizes.items() if k not in backbone},  # e.g. the tokenizer
        "batch": sizes["batch"],
        "steps": settings.steps,
        "warmup": settings.warmup,
        "dtype": dtype_name(dtype),
        "compile": settings.compile,
        **more,
        "matmul_peak_gflops": peaks["wall"],
        "matmul_peak_cpu_gflops": peaks["cpu"],
    }


STEP_COLUMNS = (
    "model",
    "step ms (median)",
    "min–max ms",
    "img/s",
    "CPU ms (median)",
    "GFLOP/img (counted)",
    "share of matmul peak",
    "same, CPU clock",
    "MFU",
    "peak GiB",
    "MiB/img",
    "params M",
)


def step_row(label: str, r: Mapping[str, Any]) -> list[str]:
    """One contestant's row of a step table (`STEP_COLUMNS`)."""
    return [
        label,
        fmt(r["step_s"] * 1e3),
        f"{r['step_min_s'] * 1e3:,.0f}–{r['step_max_s'] * 1e3:,.0f}",
        fmt(r["img_per_s"]),
        fmt(r["cpu_s"] * 1e3),
        fmt(r["gflops_per_img"], ".2f"),
        fmt_pct(r["peak_share"]),
        fmt_pct(r["peak_share_cpu"]),
        fmt_pct(r["mfu"]),
        fmt(r["peak_gib"], ".2f"),
        fmt(r["mem_per_img_mib"], ".1f"),
        f"{r['params'] / 1e6:.2f}",
    ]


def matmul_peak_note(cfg: Mapping[str, Any]) -> str:
    """The machine's measured matmul peaks of a step result's config, for the table's note."""
    peaks = cfg["matmul_peak_gflops"]
    return (
        f"This machine's 2048^2 matmul peak: {peaks['fp32']:,.0f} GFLOP/s fp32, "
        f"{peaks['bf16']:,.0f} bf16"
    )


def step_parser(description: str, *, preset_help: str) -> argparse.ArgumentParser:
    """The flags both step benchmarks take; a script adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", default=None, help=preset_help)
    p.add_argument(
        "--depth", type=int, default=None, help="override the preset's depth (CPU default 4)"
    )
    p.add_argument("--img-size", type=int, default=None, help="backbone input side (default 224)")
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 128 on CUDA")
    p.add_argument("--steps", type=int, default=12, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model(s)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def step_settings(args: argparse.Namespace) -> StepSettings:
    """The `StepSettings` of `step_parser`'s flags."""
    return StepSettings(
        **{f.name: getattr(args, f.name) for f in fields(StepSettings) if f.name in args}
    )


def emit(table: str, res: dict[str, Any], path: Path | None) -> None:
    """Prints a benchmark's table and, with a path, writes its results there as JSON."""
    print(table)
    if path is not None:
        path.write_text(json.dumps(res, indent=2, default=str))
