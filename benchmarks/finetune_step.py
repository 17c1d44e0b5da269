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
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

from beitdomain.config import OptimConfig, TrainConfig
from beitdomain.engine.finetune import ClassifierStep
from beitdomain.engine.train.optim import build_adamw
from beitdomain.engine.train.plan import prepare_for_training
from beitdomain.models.backbone import BackboneConfig, get_preset
from beitdomain.models.classifier import BeitClassifier, layer_decay_param_groups

# The sizes when the flags are not given.
CPU_DEFAULTS = dict(preset="vit-small", depth=4, img_size=224, batch=8)
GPU_DEFAULTS = dict(preset="vit-base", depth=None, img_size=224, batch=128)


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
    # the library's kernels and CPU allocator settings (`--compile` is the benchmark's own)
    model = prepare_for_training(model, TrainConfig(), device)
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

    step = ClassifierStep()  # the job's own step (no class weights, smoothing or mixup)

    def loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        return step(model, {"image": images, "label": labels})[0]

    return C.cycling_step(loss, optimizer, batches, device, dtype)


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
    return C.count_train_flops(model, lambda: model(images).float().sum().backward())


def run(settings: C.StepSettings = C.StepSettings(), *, num_classes: int = 10) -> dict[str, Any]:
    """Times the fine-tuning step; returns config, env and the measurements.

    Args:
        settings: sizes, timing and device; unset sizes: vit-small depth 4 at 224, batch 8 on
            CPU, vit-base at 224, batch 128 on CUDA.
        num_classes: classifier outputs.

    Returns:
        {"config", "env", "analytic_gflops_per_img", "finetune": {step_s, step_min_s,
        step_max_s, img_per_s, cpu_s, gflops_per_img, mfu, peak_gib, mem_per_img_mib, params}}.
    """
    s = settings
    dev = C.resolve_device(s.device)
    amp = C.resolve_dtype(s.dtype, dev)
    sizes = s.sizes(dev, CPU_DEFAULTS, GPU_DEFAULTS)
    preset, batch = sizes["preset"], sizes["batch"]
    torch.manual_seed(s.seed)

    cfg = finetune_config(
        preset, img_size=sizes["img_size"], depth=sizes["depth"], in_chans=s.in_chans
    )
    model, optimizer = build_finetune(cfg, num_classes, dev)
    batches = make_batches(4, batch, cfg, num_classes, dev, s.seed)
    flops = count_finetune_flops(model, batches[0][0][:1])
    runner = torch.compile(model) if s.compile else model
    step = make_finetune_step(runner, optimizer, batches, dev, amp)
    times = C.interleaved_times({"finetune": step}, steps=s.steps, warmup=s.warmup, device=dev)

    peak = s.peak_tflops if s.peak_tflops is not None else C.default_peak_tflops(dev, amp)
    peaks = C.machine_peaks(dev)
    r = C.model_facts(model, flops)
    r.update(
        C.step_throughput(times["finetune"], batch, flops, peak_tflops=peak, peaks=peaks, dtype=amp)
    )
    r.update(C.step_memory(step, dev, batch))
    return {
        "config": C.step_config(
            cfg, s, sizes, peaks=peaks, dtype=amp, peak_tflops=peak, num_classes=num_classes
        ),
        "env": C.env_info(dev),
        "analytic_gflops_per_img": C.backbone_train_gflops(
            cfg, head_tokens=1, head_out=num_classes
        ),
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
    table = C.markdown_table(C.STEP_COLUMNS, [C.step_row("BeitClassifier (timm Beit)", r)])
    note = (
        f"Analytic GFLOP/img (3 x forward): {res['analytic_gflops_per_img']:.2f}; "
        f"peak {C.fmt(cfg['peak_tflops'], '.0f')} TFLOP/s. {C.matmul_peak_note(cfg)}."
    )
    return "\n".join([title, C.header_lines(res["env"]), "", table, "", note])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = C.step_parser(
        __doc__.splitlines()[0], preset_help="default: vit-small (depth 4) on CPU, vit-base"
    )
    p.add_argument("--num-classes", type=int, default=10)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses flags, runs the benchmark, prints the table; returns the results dict."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(C.step_settings(args), num_classes=args.num_classes)
    C.emit(format_table(res), res, args.json)
    return res


if __name__ == "__main__":
    main()
