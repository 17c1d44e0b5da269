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
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

from beitdomain.config import OptimConfig
from beitdomain.data.masking import BlockMaskGenerator
from beitdomain.engine.optim import build_adamw
from beitdomain.engine.pretrain import MIMObjective
from beitdomain.models.attention import select_attention_kernels
from beitdomain.models.backbone import BackboneConfig, get_preset
from beitdomain.models.classifier import param_groups_weight_decay
from beitdomain.models.mim import BeitMIM
from beitdomain.tokenizer.dvae import DiscreteVAE, tokenizer_config
from beitdomain.tokenizer.flops import encoder_gflops

Batch = dict[str, torch.Tensor]

# (preset, depth override, img_size, tokenizer, batch) when the flags are not given.
CPU_DEFAULTS = ("vit-small", 4, 224, "small", 8)
GPU_DEFAULTS = ("vit-base", None, 224, "dalle", 128)


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
    if device.type == "cuda":
        # As engine/pretrain.load_frozen_tokenizer: cuDNN's fast convolutions want NHWC.
        tok = tok.to(memory_format=torch.channels_last)
    return tok


def tokenize(tok: DiscreteVAE, x: torch.Tensor) -> torch.Tensor:
    """Visual tokens `[B, gh*gw]` as `engine.pretrain`'s step does (then usable by autograd)."""
    with torch.inference_mode():
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        targets = tok.encode(x).flatten(1)
    return targets.clone()


def build_hf_mim(cfg: BackboneConfig, vocab_size: int) -> nn.Module:
    """`BeitForMaskedImageModeling` with the same architecture as `BeitMIM.from_config(cfg)`.

    HF's default attention implementation is kept (SDPA where the installed version supports
    it). LayerNorm eps follows timm (1e-6); `use_mean_pooling=True` makes `BeitModel`'s own final
    norm an identity, so only the MIM head's LayerNorm runs, as ours.
    """
    from transformers import BeitConfig, BeitForMaskedImageModeling

    hf_cfg = BeitConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio),
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-6,
        image_size=cfg.img_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.in_chans,
        use_mask_token=True,
        use_absolute_position_embeddings=cfg.use_abs_pos_emb,
        use_relative_position_bias=not cfg.use_shared_rel_pos_bias,
        use_shared_relative_position_bias=cfg.use_shared_rel_pos_bias,
        layer_scale_init_value=cfg.layer_scale_init or 0.0,
        drop_path_rate=0.0,
        use_mean_pooling=True,
    )
    return BeitForMaskedImageModeling(hf_cfg)


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
    targets = tokenize(tok, b["tok_image"])  # [B, L]
    loss, _ = objective(b["image"], b["mask"], targets)
    return loss


def hf_loss(model: nn.Module, tok: DiscreteVAE, b: Batch) -> torch.Tensor:
    targets = tokenize(tok, b["tok_image"])  # [B, L]
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
    state = {"i": 0}

    def step() -> None:
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        with C.autocast(device, dtype):
            loss = loss_fn(model, tok, b)
        loss.float().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def count_step_flops(model: nn.Module, loss_fn: LossFn, tok: DiscreteVAE, b: Batch) -> int:
    """FLOPs of tokenizer forward + model forward/backward for batch `b` (fp32, math SDPA)."""

    def run() -> None:
        loss_fn(model, tok, b).backward()

    flops = C.count_flops(run)
    for p in model.parameters():
        p.grad = None
    return flops


def peak_step_memory(step: Callable[[], None], device: torch.device) -> dict[str, float | None]:
    """Peak CUDA memory of one step and the part above the steady state (weights, optimizer)."""
    if device.type != "cuda":
        return {"peak_gib": None, "baseline_gib": None}
    C.free_memory(device)
    C.sync(device)
    baseline = C.allocated_gib(device)
    C.reset_peak_memory(device)
    step()
    C.sync(device)
    return {"peak_gib": C.peak_memory_gib(device), "baseline_gib": baseline}


def run(
    *,
    preset: str | None = None,
    depth: int | None = None,
    img_size: int | None = None,
    in_chans: int = 3,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    batch: int | None = None,
    steps: int = 12,
    warmup: int = 3,
    device: str = "auto",
    dtype: str = "auto",
    compile: bool = False,
    peak_tflops: float | None = None,
    include_hf: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Builds both models, times them interleaved, counts FLOPs; returns the results dict.

    Args:
        preset: backbone preset (`models.backbone.BACKBONE_PRESETS`); None = device default.
        depth: override the preset's number of blocks (None = keep; the CPU default uses 4).
        img_size: backbone input side; the tokenizer sees `grid * downsample` pixels.
        in_chans: image channels (1 for grayscale domains).
        tokenizer: tokenizer preset (`tokenizer.dvae.TOKENIZER_PRESETS`); None = device default.
        vocab_size: override the tokenizer's vocabulary (= the MIM head's outputs).
        batch: images per step; None = device default.
        steps: timed steps per model (median reported).
        warmup: untimed steps per model first.
        device: 'auto', 'cpu', 'cuda' or 'cuda:N'.
        dtype: 'auto' (bf16 on CUDA, fp32 on CPU), 'bf16' or 'fp32' (autocast dtype).
        compile: `torch.compile` both models (the tokenizer stays eager).
        peak_tflops: device peak for MFU; None = known bf16 peak of the GPU, else no MFU.
        include_hf: also time the Hugging Face reference.
        seed: seed of weights, images and masks.

    Returns:
        {"config", "env", "ours", "hf" (when included), "speedup"}; per model: step_s,
        step_min_s, step_max_s, img_per_s, gflops_per_img, mfu, params, peak_gib, mem_per_img_mib.
    """
    dev = C.resolve_device(device)
    amp = C.resolve_dtype(dtype, dev)
    defaults = GPU_DEFAULTS if dev.type == "cuda" else CPU_DEFAULTS
    if preset is None:
        preset, depth = defaults[0], depth if depth is not None else defaults[1]
    img_size = img_size or defaults[2]
    tokenizer = tokenizer or defaults[3]
    batch = batch or defaults[4]
    torch.manual_seed(seed)

    cfg = backbone_config(preset, img_size=img_size, depth=depth, in_chans=in_chans)
    tok = build_tokenizer(tokenizer, in_chans, dev, vocab_size)
    tok_size = cfg.grid[0] * tok.config.downsample
    vocab = tok.vocab_size
    batches = make_batches(4, batch, cfg, tok_size, dev, seed)
    optim_cfg = OptimConfig(lr=1e-4)

    models: dict[str, tuple[nn.Module, LossFn]] = {}
    ours = BeitMIM.from_config(cfg, vocab_size=vocab).to(dev).train()
    select_attention_kernels(ours, dev)  # as the library's `prepare_for_training`
    models["ours"] = (MIMObjective(ours), ours_loss)
    if include_hf:
        hf = build_hf_mim(cfg, vocab).to(dev).train()
        models["hf"] = (hf, hf_loss)

    results: dict[str, Any] = {}
    one = {k: v[:1] for k, v in batches[0].items()}
    for name, (model, loss_fn) in models.items():
        flops = count_step_flops(model, loss_fn, tok, one)
        results[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "gflops_per_img": flops / 1e9,
            "attn_implementation": getattr(
                getattr(model, "config", None), "_attn_implementation", "timm sdpa"
            ),
        }

    steps_fns: dict[str, Callable[[], None]] = {}
    for name, (model, loss_fn) in models.items():
        opt = build_adamw(param_groups_weight_decay(model, optim_cfg.weight_decay), optim_cfg, dev)
        runner = torch.compile(model) if compile else model
        steps_fns[name] = make_step(runner, loss_fn, tok, opt, batches, dev, amp)
    times = C.interleaved_times(steps_fns, steps=steps, warmup=warmup, device=dev)

    peak = peak_tflops if peak_tflops is not None else C.default_peak_tflops(dev, amp)
    # The machine's own matmul peaks, measured now with this run's threads and load.
    matmul_peaks = C.matmul_peaks(dev)
    cpu_peaks = C.matmul_peaks(dev, clock="cpu")  # steadier on a shared machine, 1 thread
    own_peak = matmul_peaks[C.dtype_name(amp)]
    # MFU counts the useful work (our FLOPs: the head on masked patches only) for both models,
    # so it stays a throughput measure; HF's extra head FLOPs on unmasked patches are waste.
    useful = results["ours"]["gflops_per_img"] * 1e9
    for name in models:
        r = results[name]
        r.update(C.summarize(times[name], batch))
        r["mfu"] = C.mfu(useful, r["img_per_s"], peak)
        r["peak_share"] = C.peak_share(useful, r["img_per_s"], own_peak)
        r["peak_share_cpu"] = C.peak_share(useful, batch / r["cpu_s"], cpu_peaks[C.dtype_name(amp)])
        mem = peak_step_memory(steps_fns[name], dev)
        r["peak_gib"] = mem["peak_gib"]
        r["mem_per_img_mib"] = (
            None
            if mem["peak_gib"] is None
            else (mem["peak_gib"] - mem["baseline_gib"]) * 1024 / batch
        )

    analytic = C.vit_train_gflops(
        tokens=cfg.num_patches + 1,
        dim=cfg.embed_dim,
        depth=cfg.depth,
        mlp_ratio=cfg.mlp_ratio,
        patch_pixels=cfg.patch_size**2 * cfg.in_chans,
        head_tokens=int(batches[0]["mask"][0].sum()),
        head_out=vocab,
    )
    out: dict[str, Any] = {
        "config": {
            "preset": preset,
            "depth": cfg.depth,
            "embed_dim": cfg.embed_dim,
            "num_heads": cfg.num_heads,
            "img_size": cfg.img_size,
            "patch_size": cfg.patch_size,
            "in_chans": cfg.in_chans,
            "tokenizer": tokenizer,
            "tokenizer_size": tok_size,
            "vocab_size": vocab,
            "num_masked": int(batches[0]["mask"][0].sum()),
            "num_patches": cfg.num_patches,
            "batch": batch,
            "steps": steps,
            "warmup": warmup,
            "dtype": C.dtype_name(amp),
            "compile": compile,
            "peak_tflops": peak,
            "matmul_peak_gflops": matmul_peaks,
            "matmul_peak_cpu_gflops": cpu_peaks,
        },
        "env": C.env_info(dev),
        "analytic_gflops_per_img": {
            "backbone_train": analytic,
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
    rows = []
    labels = (
        ("ours", "ours (BeitMIM, timm)"),
        ("hf", "HF BeitForMaskedImageModeling"),
    )
    for name, label in labels:
        if name not in res:
            continue
        r = res[name]
        rows.append(
            [
                label,
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
        rows,
    )
    a = res["analytic_gflops_per_img"]
    lines = [title, C.header_lines(res["env"]), "", table, ""]
    lines.append(
        f"Analytic GFLOP/img: backbone training {a['backbone_train']:.2f} (3 x forward, head on "
        f"masked patches) + tokenizer forward {a['tokenizer_forward']:.2f} = "
        f"{a['backbone_train'] + a['tokenizer_forward']:.2f}; MFU uses ours' counted FLOPs "
        f"for both rows (peak {C.fmt(cfg['peak_tflops'], '.0f')} TFLOP/s). This machine's "
        f"{2048}^2 matmul peak: {cfg['matmul_peak_gflops']['fp32']:,.0f} GFLOP/s fp32, "
        f"{cfg['matmul_peak_gflops']['bf16']:,.0f} bf16 ({res['env']['threads']} threads); "
        "the share column divides by the run's dtype."
    )
    if "speedup" in res:
        lines.append(
            f"Speed-up ours / HF: {res['speedup']:.2f}x (median wall time), "
            f"{res['speedup_cpu_time']:.2f}x (median process CPU time)"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--preset",
        default=None,
        help="backbone preset (default: vit-small on CPU, vit-base on CUDA)",
    )
    p.add_argument(
        "--depth", type=int, default=None, help="override the preset's depth (CPU default 4)"
    )
    p.add_argument("--img-size", type=int, default=None, help="backbone input side (default 224)")
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer preset (default: small on CPU, dalle on CUDA)"
    )
    p.add_argument("--vocab", type=int, default=None, help="override the tokenizer's vocab size")
    p.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 128 on CUDA")
    p.add_argument("--steps", type=int, default=12, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    p.add_argument("--no-hf", action="store_true", help="time ours only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
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
        tokenizer=args.tokenizer,
        vocab_size=args.vocab,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        peak_tflops=args.peak_tflops,
        include_hf=not args.no_hf,
    )
    print(format_table(res))
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
