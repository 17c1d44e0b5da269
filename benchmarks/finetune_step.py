"""One BEiT fine-tuning step: `BeitClassifier` + layer-decay AdamW; img/s, peak memory, MFU.

Run (CPU default, well under a minute): ``python benchmarks/finetune_step.py``
GPU (issue 9 setting): ``python benchmarks/finetune_step.py --device cuda --preset vit-base
--batch 128 --dtype bf16``

A step is what `beitdomain finetune` does per batch: forward of a `BeitClassifier` (timm `Beit`
with per-block relative position bias, mean pooling, `fc_norm`, linear head) under the autocast
dtype, cross-entropy, backward, `AdamW.step()` over `layer_decay_param_groups` (layer decay 0.65,
no decay on norms/biases/position tables) built by `build_adamw` (fused on CUDA), and
`zero_grad(set_to_none=True)`. Drop path keeps the preset's rate (0.1), as in BEiT fine-tuning.

CPU default: ViT-S width, 4 blocks at 224 px, batch 8 (as `pretrain_step.py`, so the two
tables are comparable).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

from beitdomain.config import OptimConfig
from beitdomain.engine.optim import build_adamw
from beitdomain.models.attention import select_attention_kernels
from beitdomain.models.backbone import BackboneConfig, get_preset
from beitdomain.models.classifier import BeitClassifier, layer_decay_param_groups

# (preset, depth override, img_size, batch) when the flags are not given.
CPU_DEFAULTS = ("vit-small", 4, 224, 8)
GPU_DEFAULTS = ("vit-base", None, 224, 128)


def finetune_config(
    preset: str, *, img_size: int, depth: int | None = None, in_chans: int = 3
) -> BackboneConfig:
    """The preset as fine-tuning builds it: one relative position bias table per block."""
    changes: dict[str, Any] = dict(
        img_size=img_size, in_chans=in_chans, use_shared_rel_pos_bias=False
    )
    if depth is not None:
        changes["depth"] = depth
    return get_preset(preset, **changes)


def build_finetune(
    cfg: BackboneConfig, num_classes: int, device: torch.device, *, layer_decay: float = 0.65
) -> tuple[BeitClassifier, torch.optim.Optimizer]:
    """The classifier on `device` and its layer-decay AdamW (BEiT's fine-tuning settings)."""
    model = BeitClassifier.from_config(cfg, num_classes).to(device).train()
    select_attention_kernels(model, device)  # as the library's `prepare_for_training`
    optim_cfg = OptimConfig(lr=1e-3, weight_decay=0.05, layer_decay=layer_decay)
    groups = layer_decay_param_groups(model, 1e-3, optim_cfg.weight_decay, layer_decay)
    return model, build_adamw(groups, optim_cfg, device)


def make_finetune_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype | None,
) -> Callable[[], None]:
    """A closure running one full fine-tuning step on the next batch."""
    state = {"i": 0}

    def step() -> None:
        images, labels = batches[state["i"] % len(batches)]
        state["i"] += 1
        with C.autocast(device, dtype):
            logits = model(images)
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_batches(
    n: int, batch: int, cfg: BackboneConfig, num_classes: int, device: torch.device, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` batches of random images `[B, C, H, W]` and labels `[B]` on `device`."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images = torch.rand(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen)
        labels = torch.randint(0, num_classes, (batch,), generator=gen)
        out.append((images.to(device), labels.to(device)))
    return out


def count_finetune_flops(model: torch.nn.Module, images: torch.Tensor) -> int:
    """FLOPs of forward + backward for `images` (fp32, math SDPA)."""

    def run() -> None:
        model(images).float().sum().backward()

    flops = C.count_flops(run)
    for p in model.parameters():
        p.grad = None
    return flops


def run(
    *,
    preset: str | None = None,
    depth: int | None = None,
    img_size: int | None = None,
    in_chans: int = 3,
    num_classes: int = 10,
    batch: int | None = None,
    steps: int = 12,
    warmup: int = 3,
    device: str = "auto",
    dtype: str = "auto",
    compile: bool = False,
    peak_tflops: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Times the fine-tuning step; returns config, env and the measurements.

    Args:
        preset: backbone preset; None = device default (vit-small depth 4 on CPU, vit-base).
        depth: override the preset's depth.
        img_size: input side (default 224).
        in_chans: image channels.
        num_classes: classifier outputs.
        batch: images per step (default 8 on CPU, 128 on CUDA).
        steps: timed steps (median reported).
        warmup: untimed steps first.
        device: 'auto', 'cpu', 'cuda' or 'cuda:N'.
        dtype: 'auto' (bf16 on CUDA, fp32 on CPU), 'bf16' or 'fp32'.
        compile: `torch.compile` the model.
        peak_tflops: device peak for MFU; None = known bf16 peak of the GPU.
        seed: seed of weights and data.

    Returns:
        {"config", "env", "analytic_gflops_per_img", "finetune": {step_s, step_min_s,
        step_max_s, img_per_s, cpu_s, gflops_per_img, mfu, peak_gib, mem_per_img_mib, params}}.
    """
    dev = C.resolve_device(device)
    amp = C.resolve_dtype(dtype, dev)
    defaults = GPU_DEFAULTS if dev.type == "cuda" else CPU_DEFAULTS
    if preset is None:
        preset, depth = defaults[0], depth if depth is not None else defaults[1]
    img_size = img_size or defaults[2]
    batch = batch or defaults[3]
    torch.manual_seed(seed)

    cfg = finetune_config(preset, img_size=img_size, depth=depth, in_chans=in_chans)
    model, optimizer = build_finetune(cfg, num_classes, dev)
    batches = make_batches(4, batch, cfg, num_classes, dev, seed)
    flops = count_finetune_flops(model, batches[0][0][:1])
    runner = torch.compile(model) if compile else model
    step = make_finetune_step(runner, optimizer, batches, dev, amp)
    times = C.interleaved_times({"finetune": step}, steps=steps, warmup=warmup, device=dev)

    r: dict[str, Any] = {
        "params": sum(p.numel() for p in model.parameters()),
        "gflops_per_img": flops / 1e9,
    }
    r.update(C.summarize(times["finetune"], batch))
    peak = peak_tflops if peak_tflops is not None else C.default_peak_tflops(dev, amp)
    r["mfu"] = C.mfu(flops, r["img_per_s"], peak)
    matmul_peaks = C.matmul_peaks(dev)  # this machine's own, with this run's threads
    cpu_peaks = C.matmul_peaks(dev, clock="cpu")  # steadier on a shared machine, 1 thread
    r["peak_share"] = C.peak_share(flops, r["img_per_s"], matmul_peaks[C.dtype_name(amp)])
    r["peak_share_cpu"] = C.peak_share(flops, batch / r["cpu_s"], cpu_peaks[C.dtype_name(amp)])
    r["peak_gib"] = r["mem_per_img_mib"] = None
    if dev.type == "cuda":
        C.free_memory(dev)
        baseline = C.allocated_gib(dev)
        C.reset_peak_memory(dev)
        step()
        C.sync(dev)
        r["peak_gib"] = C.peak_memory_gib(dev)
        r["mem_per_img_mib"] = (r["peak_gib"] - baseline) * 1024 / batch

    analytic = C.vit_train_gflops(
        tokens=cfg.num_patches + 1,
        dim=cfg.embed_dim,
        depth=cfg.depth,
        mlp_ratio=cfg.mlp_ratio,
        patch_pixels=cfg.patch_size**2 * cfg.in_chans,
        head_tokens=1,
        head_out=num_classes,
    )
    return {
        "config": {
            "preset": preset,
            "depth": cfg.depth,
            "embed_dim": cfg.embed_dim,
            "img_size": cfg.img_size,
            "patch_size": cfg.patch_size,
            "in_chans": cfg.in_chans,
            "num_classes": num_classes,
            "batch": batch,
            "matmul_peak_gflops": matmul_peaks,
            "matmul_peak_cpu_gflops": cpu_peaks,
            "steps": steps,
            "warmup": warmup,
            "dtype": C.dtype_name(amp),
            "compile": compile,
            "peak_tflops": peak,
        },
        "env": C.env_info(dev),
        "analytic_gflops_per_img": analytic,
        "finetune": r,
    }


def format_table(res: dict[str, Any]) -> str:
    """Markdown table for a `run` result."""
    cfg, r = res["config"], res["finetune"]
    title = (
        f"Fine-tuning step: {cfg['preset']} depth {cfg['depth']} (dim {cfg['embed_dim']}) @ "
        f"{cfg['img_size']} px, {cfg['num_classes']} classes, layer decay 0.65; batch "
        f"{cfg['batch']}, {cfg['dtype']}, compile {cfg['compile']}; median of {cfg['steps']} "
        f"steps after {cfg['warmup']} warm-up"
    )
    table = C.markdown_table(
        [
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
        ],
        [
            [
                "BeitClassifier (timm Beit)",
                C.fmt(r["step_s"] * 1e3),
                f"{r['step_min_s'] * 1e3:,.0f}–{r['step_max_s'] * 1e3:,.0f}",
                C.fmt(r["img_per_s"]),
                C.fmt(r["cpu_s"] * 1e3),
                C.fmt(r["gflops_per_img"], ".2f"),
                C.fmt_pct(r["peak_share"]),
                C.fmt_pct(r["peak_share_cpu"]),
                C.fmt_pct(r["mfu"]),
                C.fmt(r["peak_gib"], ".2f"),
                C.fmt(r["mem_per_img_mib"], ".1f"),
                f"{r['params'] / 1e6:.2f}",
            ]
        ],
    )
    note = (
        f"Analytic GFLOP/img (3 x forward): {res['analytic_gflops_per_img']:.2f}; "
        f"peak {C.fmt(cfg['peak_tflops'], '.0f')} TFLOP/s. This machine's 2048^2 matmul peak: "
        f"{cfg['matmul_peak_gflops']['fp32']:,.0f} GFLOP/s fp32, "
        f"{cfg['matmul_peak_gflops']['bf16']:,.0f} bf16."
    )
    return "\n".join([title, C.header_lines(res["env"]), "", table, "", note])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help="default: vit-small (depth 4) on CPU, vit-base")
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 128 on CUDA")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses flags, runs the benchmark, prints the table; returns the results dict."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(
        preset=args.preset,
        depth=args.depth,
        img_size=args.img_size,
        in_chans=args.in_chans,
        num_classes=args.num_classes,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        peak_tflops=args.peak_tflops,
    )
    print(format_table(res))
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
