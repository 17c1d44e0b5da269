"""One full BEiT pre-training step: ours (`BeitMIM` on timm) vs Hugging Face, in one run.

Run (CPU default, about a minute): ``python benchmarks/pretrain_step.py``
GPU (issue 5/9 setting): ``python benchmarks/pretrain_step.py --device cuda --preset vit-base
--tokenizer dalle --batch 128 --dtype bf16``

A step is what `beitdomain pretrain` does per batch (see `engine/pretrain.py`): the frozen
tokenizer encodes the small view under `torch.inference_mode()` (channels-last on CUDA), the
model runs forward + cross-entropy on the masked patches + backward under the autocast dtype,
then `AdamW.step()` and `zero_grad(set_to_none=True)`. Grad clipping, logging and the data
loader are left out (they are the same for both contestants and not what is compared).

Contestants, same architecture, batch, masks, tokenizer and optimizer settings:

* ours: `BeitMIM.from_config(cfg)` wrapped in `MIMObjective`; the head runs on the masked
  patches only.
* HF: `transformers.BeitForMaskedImageModeling(BeitConfig(use_mask_token=True,
  use_shared_relative_position_bias=True, ...))` in its default attention implementation; its
  head runs on every patch and the loss indexes the masked ones (`bool_masked_pos` + `labels`),
  as HF's own BEiT pre-training does.

Both get `param_groups_weight_decay` + `build_adamw` (fused AdamW) and drop
path 0. Steps alternate between the two after a warm-up; the table reports medians.

CPU default: ViT-S width (384, 6 heads) with 4 blocks at 224 px (patch 16, 14 x 14 grid), batch 8,
the "small" tokenizer (112 px, 1024 codes). A ViT-B step at 224 takes several seconds on two
cores; this keeps a 14 x 14 grid (the paper's masking geometry and token count, so attention and
head costs keep their ViT-B proportions per token) while a run takes about a minute.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

from beitdomain.config import OptimConfig, TrainConfig
from beitdomain.data.masking import BlockMaskGenerator
from beitdomain.engine.pretrain import MIMObjective, MIMStep
from beitdomain.engine.train.optim import build_adamw
from beitdomain.engine.train.plan import prepare_for_training
from beitdomain.models.backbone import BackboneConfig, get_preset
from beitdomain.models.classifier import param_groups_weight_decay
from beitdomain.models.export import hf_config_dict
from beitdomain.models.mim import BeitMIM
from beitdomain.tokenizer.dvae import DiscreteVAE, tokenizer_config
from beitdomain.tokenizer.flops import encoder_gflops

Batch = dict[str, torch.Tensor]

# The sizes when the flags are not given.
CPU_DEFAULTS = dict(preset="vit-small", depth=4, img_size=224, tokenizer="small", batch=8)
GPU_DEFAULTS = dict(preset="vit-base", depth=None, img_size=224, tokenizer="dalle", batch=128)


def backbone_config(
    preset: str, *, img_size: int, depth: int | None = None, in_chans: int = 3
) -> BackboneConfig:
    """The preset with the benchmark's overrides; drop path 0 (both models, no randomness)."""
    changes: dict[str, Any] = dict(img_size=img_size, in_chans=in_chans, drop_path_rate=0.0)
    if depth is not None:
        changes["depth"] = depth
    return get_preset(preset, **changes)


def build_tokenizer(
    name: str, in_chans: int, device: torch.device, vocab_size: int | None = None
) -> DiscreteVAE:
    """A frozen tokenizer from a preset (random weights: speed does not depend on them).

    `vocab_size` overrides the preset's codebook size (and so the MIM head's width).
    """
    changes: dict[str, Any] = {"in_chans": in_chans}
    if vocab_size is not None:
        changes["vocab_size"] = vocab_size
    tok = DiscreteVAE(tokenizer_config(name, **changes)).to(device)
    tok.eval().requires_grad_(False)
    # As engine/pretrain.load_frozen_tokenizer: cuDNN's and oneDNN's convolutions (and the
    # tokenizer's pooling) run faster in NHWC.
    return tok.to(memory_format=torch.channels_last)


def build_hf_mim(cfg: BackboneConfig, vocab_size: int) -> nn.Module:
    """`BeitForMaskedImageModeling` with the same architecture as `BeitMIM.from_config(cfg)`.

    The library's HF export settings (`models.export.hf_config_dict`: timm's LayerNorm eps and
    GELU, no dropout, `use_mean_pooling=True`, which makes `BeitModel`'s own final norm an
    identity, so only the MIM head's LayerNorm runs, as ours) with a mask token and `cfg`'s
    relative position bias (shared by all blocks in pre-training, per block in the export).
    HF's default attention implementation is kept (SDPA where the installed version supports it).
    """
    from transformers import BeitConfig, BeitForMaskedImageModeling

    hf_cfg = hf_config_dict(cfg) | dict(
        vocab_size=vocab_size,
        use_mask_token=True,
        use_relative_position_bias=not cfg.use_shared_rel_pos_bias,
        use_shared_relative_position_bias=cfg.use_shared_rel_pos_bias,
    )
    return BeitForMaskedImageModeling(BeitConfig(**hf_cfg))


def make_batches(
    n: int, batch: int, cfg: BackboneConfig, tok_size: int, device: torch.device, seed: int = 0
) -> list[Batch]:
    """`n` batches of random images (both views) and BEiT block masks (40%), on `device`."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    masks = BlockMaskGenerator.from_ratio(cfg.grid, 0.4)
    out = []
    for _ in range(n):
        image = torch.rand(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen)
        tok_image = torch.nn.functional.interpolate(image, size=tok_size, mode="area")
        mask = torch.from_numpy(np.stack([masks(rng).reshape(-1) for _ in range(batch)]))
        out.append(
            {
                "image": image.to(device),
                "tok_image": tok_image.to(device),
                "mask": mask.to(device),  # [B, L] bool, True = masked
            }
        )
    return out


def ours_loss(objective: nn.Module, tok: DiscreteVAE, b: Batch) -> torch.Tensor:
    return MIMStep(tok)(objective, b)[0]  # the job's own step


def hf_loss(model: nn.Module, tok: DiscreteVAE, b: Batch) -> torch.Tensor:
    targets = MIMStep(tok).targets(b)  # [B, L], as the job's step tokenizes
    # HF's MIM loss: logits for every patch, cross-entropy on logits[bool_masked_pos] vs labels.
    out = model(pixel_values=b["image"], bool_masked_pos=b["mask"], labels=targets[b["mask"]])
    return out.loss


LossFn = Callable[[nn.Module, DiscreteVAE, Batch], torch.Tensor]


def make_step(
    model: nn.Module,
    loss_fn: LossFn,
    tok: DiscreteVAE,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Batch],
    device: torch.device,
    dtype: torch.dtype | None,
) -> Callable[[], None]:
    """A closure running one full step on the next batch (cycling through `batches`)."""
    return C.cycling_step(lambda b: loss_fn(model, tok, b), optimizer, batches, device, dtype)


def count_step_flops(model: nn.Module, loss_fn: LossFn, tok: DiscreteVAE, b: Batch) -> int:
    """FLOPs of tokenizer forward + model forward/backward for batch `b` (fp32, math SDPA)."""
    return C.count_train_flops(model, lambda: loss_fn(model, tok, b).backward())


def run(
    settings: C.StepSettings = C.StepSettings(),
    *,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    include_hf: bool = True,
) -> dict[str, Any]:
    """Builds both models, times them interleaved, counts FLOPs; returns the results dict.

    Args:
        settings: sizes, timing and device (seed: of weights, images and masks); unset sizes:
            vit-small depth 4 at 224, batch 8 on CPU, vit-base at 224, batch 128 on CUDA.
            The tokenizer sees `grid * downsample` pixels; `compile` leaves it eager.
        tokenizer: tokenizer preset (`tokenizer.dvae.TOKENIZER_PRESETS`); None = device default
            ('small' on CPU, 'dalle' on CUDA).
        vocab_size: override the tokenizer's vocabulary (= the MIM head's outputs).
        include_hf: also time the Hugging Face reference.

    Returns:
        {"config", "env", "ours", "hf" (when included), "speedup"}; per model: step_s,
        step_min_s, step_max_s, img_per_s, gflops_per_img, mfu, params, peak_gib, mem_per_img_mib.
    """
    s = settings
    dev = C.resolve_device(s.device)
    amp = C.resolve_dtype(s.dtype, dev)
    sizes = s.sizes(dev, CPU_DEFAULTS, GPU_DEFAULTS, tokenizer=tokenizer)
    preset, tokenizer, batch = sizes["preset"], sizes["tokenizer"], sizes["batch"]
    torch.manual_seed(s.seed)

    cfg = backbone_config(
        preset, img_size=sizes["img_size"], depth=sizes["depth"], in_chans=s.in_chans
    )
    tok = build_tokenizer(tokenizer, s.in_chans, dev, vocab_size)
    tok_size = cfg.grid[0] * tok.config.downsample
    vocab = tok.vocab_size
    batches = make_batches(4, batch, cfg, tok_size, dev, s.seed)
    optim_cfg = OptimConfig(lr=1e-4)

    models: dict[str, tuple[nn.Module, LossFn]] = {}
    ours = BeitMIM.from_config(cfg, vocab_size=vocab).to(dev).train()
    # the library's kernels and CPU allocator settings (process-wide, so HF's too); `--compile`
    # is the benchmark's own, for both models
    ours = prepare_for_training(ours, TrainConfig(), dev)
    models["ours"] = (MIMObjective(ours), ours_loss)
    if include_hf:
        hf = build_hf_mim(cfg, vocab).to(dev).train()
        models["hf"] = (hf, hf_loss)

    results: dict[str, Any] = {}
    one = {k: v[:1] for k, v in batches[0].items()}
    for name, (model, loss_fn) in models.items():
        results[name] = C.model_facts(model, count_step_flops(model, loss_fn, tok, one))
        results[name]["attn_implementation"] = getattr(
            getattr(model, "config", None), "_attn_implementation", "timm sdpa"
        )

    steps_fns: dict[str, Callable[[], None]] = {}
    for name, (model, loss_fn) in models.items():
        opt = build_adamw(param_groups_weight_decay(model, optim_cfg.weight_decay), optim_cfg, dev)
        runner = torch.compile(model) if s.compile else model
        steps_fns[name] = make_step(runner, loss_fn, tok, opt, batches, dev, amp)
    times = C.interleaved_times(steps_fns, steps=s.steps, warmup=s.warmup, device=dev)

    peak = s.peak_tflops if s.peak_tflops is not None else C.default_peak_tflops(dev, amp)
    peaks = C.machine_peaks(dev)
    # MFU counts the useful work (our FLOPs: the head on masked patches only) for both models,
    # so it stays a throughput measure; HF's extra head FLOPs on unmasked patches are waste.
    useful = results["ours"]["gflops_per_img"] * 1e9
    for name in models:
        r = results[name]
        r.update(
            C.step_throughput(times[name], batch, useful, peak_tflops=peak, peaks=peaks, dtype=amp)
        )
        r.update(C.step_memory(steps_fns[name], dev, batch))

    num_masked = int(batches[0]["mask"][0].sum())
    facts = dict(
        tokenizer_size=tok_size,
        vocab_size=vocab,
        num_masked=num_masked,
        num_patches=cfg.num_patches,
    )
    out: dict[str, Any] = {
        "config": C.step_config(cfg, s, sizes, peaks=peaks, dtype=amp, peak_tflops=peak, **facts),
        "env": C.env_info(dev),
        "analytic_gflops_per_img": {
            "backbone_train": C.backbone_train_gflops(cfg, head_tokens=num_masked, head_out=vocab),
            "tokenizer_forward": encoder_gflops(tok, tok_size),
        },
        **results,
    }
    if include_hf:
        out["speedup"] = results["ours"]["img_per_s"] / results["hf"]["img_per_s"]
        out["speedup_cpu_time"] = results["hf"]["cpu_s"] / results["ours"]["cpu_s"]
    return out


def format_table(res: dict[str, Any]) -> str:
    """The markdown table (with a header line and the speed-up) for a `run` result."""
    cfg = res["config"]
    title = (
        f"Pre-training step: {cfg['preset']} depth {cfg['depth']} (dim {cfg['embed_dim']}) "
        f"@ {cfg['img_size']} px, patch {cfg['patch_size']}, {cfg['in_chans']} ch; tokenizer "
        f"'{cfg['tokenizer']}' @ {cfg['tokenizer_size']} px (vocab {cfg['vocab_size']}); "
        f"{cfg['num_masked']}/{cfg['num_patches']} masked; batch {cfg['batch']}, {cfg['dtype']}, "
        f"compile {cfg['compile']}; median of {cfg['steps']} steps after {cfg['warmup']} warm-up"
    )
    labels = (
        ("ours", "ours (BeitMIM, timm)"),
        ("hf", "HF BeitForMaskedImageModeling"),
    )
    rows = [C.step_row(label, res[name]) for name, label in labels if name in res]
    table = C.markdown_table(C.STEP_COLUMNS, rows)
    a = res["analytic_gflops_per_img"]
    lines = [title, C.header_lines(res["env"]), "", table, ""]
    lines.append(
        f"Analytic GFLOP/img: backbone training {a['backbone_train']:.2f} (3 x forward, head on "
        f"masked patches) + tokenizer forward {a['tokenizer_forward']:.2f} = "
        f"{a['backbone_train'] + a['tokenizer_forward']:.2f}; MFU uses ours' counted FLOPs "
        f"for both rows (peak {C.fmt(cfg['peak_tflops'], '.0f')} TFLOP/s). "
        f"{C.matmul_peak_note(cfg)} ({res['env']['threads']} threads); "
        "the share column divides by the run's dtype."
    )
    if "speedup" in res:
        lines.append(
            f"Speed-up ours / HF: {res['speedup']:.2f}x (median wall time), "
            f"{res['speedup_cpu_time']:.2f}x (median process CPU time)"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = C.step_parser(
        __doc__.splitlines()[0],
        preset_help="backbone preset (default: vit-small on CPU, vit-base on CUDA)",
    )
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer preset (default: small on CPU, dalle on CUDA)"
    )
    p.add_argument("--vocab", type=int, default=None, help="override the tokenizer's vocab size")
    p.add_argument("--no-hf", action="store_true", help="time ours only")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses flags, runs the benchmark, prints the table; returns the results dict."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(
        C.step_settings(args),
        tokenizer=args.tokenizer,
        vocab_size=args.vocab,
        include_hf=not args.no_hf,
    )
    C.emit(format_table(res), res, args.json)
    return res


if __name__ == "__main__":
    main()
