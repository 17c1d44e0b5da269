"""Every speed measurement of issue 9 in one call; one markdown table plus JSON.

GPU (about 3-5 minutes on one H100/H200 without --compile):
    python benchmarks/gpu_suite.py --device cuda --out gpu.json
CPU smoke (tiny sizes, seconds): ``python benchmarks/gpu_suite.py --device cpu --quick``

Measurements (GPU-only ones print "skipped (no CUDA)" on CPU):

By default the model the GPU recipes train (`--recipe elpv-gpu`: ViT-B/16 @ 224 on 1 channel,
the 'base' tokenizer at 112 px with 8,192 codes; 117.95 GFLOP per image counted for the
pre-training step). `--tokenizer dalle` with a 3-channel recipe gives BEiT's own setting
(155.8 GFLOP per image).

1. Pre-training step, the recipe's backbone + its tokenizer + AdamW, bf16: ours (the last
   block on masked tokens) and Hugging Face `BeitForMaskedImageModeling` in its default
   attention; img/s, MFU, peak memory, MiB/img.
   The same step of ours again, queued back to back with one sync per `steps` steps instead of
   one per step (what a trainer that never waits for the device could reach), and its MFU.
2. Fine-tuning step, the recipe's backbone, bf16: img/s, MFU, peak memory, MiB/img.
3. Data loader from a decoded cache (synthetic images -> `build_cache` -> `ImageDataset` with
   `PretrainTransform` and the block mask generator -> `build_loader` with N workers), img/s,
   against what the pre-training step consumes.
4. Largest batch that fits (pre-training and fine-tuning; doubling then bisection with OOM
   caught, capped by --max-batch; --memory-gib emulates a smaller card).
5. Attention kernels for timm's SDPA call with the relative position bias as a float
   `attn_mask` (ViT-B shapes, forward + backward): which backend the default call picks
   (from the profiler's op names), and the time with FLASH / EFFICIENT / CUDNN / MATH forced.
6. With --compile: the pre-training and fine-tuning steps under `torch.compile`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C
import finetune_step as FT
import pretrain_step as PT

SKIPPED = "skipped (no CUDA)"


# ---- sizes -------------------------------------------------------------------------------
RECIPE = "elpv-gpu"  # the recipe whose model the suite measures by default


def recipe_model(name: str = RECIPE) -> dict[str, Any]:
    """The backbone preset, image size, channels and tokenizer (preset, codes) a recipe trains."""
    from beitdomain.config import load_recipe

    r = load_recipe(name)
    return dict(
        preset=r.model.preset,
        img_size=r.data.image_size,
        in_chans=r.data.in_chans,
        tokenizer=r.tokenizer.preset,
        vocab_size=r.tokenizer.vocab_size,
    )


# Each size of a run: (smoke run, real run). A real run trains the recipe's model, a smoke run
# `QUICK_MODEL`.
RUN_SIZES: dict[str, tuple[Any, Any]] = {
    "batch": (4, 128),
    "steps": (2, 15),
    "warmup": (1, 5),
    "loader_images": (24, 1024),
    "loader_cache_size": (72, 256),
    "loader_batch": (4, 128),
    "attn_shape": ((2, 2, 65, 32), (128, 12, 197, 64)),  # B, heads, tokens, head_dim
}
QUICK_MODEL = dict(preset="tiny", img_size=64, in_chans=1, tokenizer="tiny", vocab_size=None)


def suite_sizes(
    quick: bool, tokenizer: str | None, batch: int | None, recipe: str = RECIPE
) -> dict[str, Any]:
    """Model and data sizes: `recipe`'s model at batch 128, or `QUICK_MODEL` at `RUN_SIZES`'
    smoke-run sizes; `tokenizer` replaces the tokenizer preset and `batch` the batch, where
    given."""
    sizes = dict(QUICK_MODEL) if quick else recipe_model(recipe)
    sizes |= {key: pair[0 if quick else 1] for key, pair in RUN_SIZES.items()}
    if tokenizer:
        sizes["tokenizer"] = tokenizer
    if batch:
        sizes["batch"] = batch
    return sizes


# ---- data loader ---------------------------------------------------------------------------
def loader_throughput(
    *,
    n_images: int,
    cache_size: int,
    img_size: int,
    tok_size: int,
    patch: int,
    batch: int,
    workers: int,
    pin_memory: bool,
    epochs: int = 3,
) -> dict[str, Any]:
    """Images/s of the pre-training loader over a decoded cache of synthetic grayscale PNGs.

    Time runs from the first batch to the last of `epochs` epochs (worker start-up of the
    first epoch excluded; re-starts of later epochs included, as `Trainer` sees them).
    """
    from PIL import Image

    from beitdomain.data.cache import build_cache
    from beitdomain.data.dataset import ImageDataset
    from beitdomain.data.index import scan
    from beitdomain.data.masking import BlockMaskGenerator
    from beitdomain.data.transforms import PretrainTransform
    from beitdomain.engine.train.plan import build_loader

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        yy, xx = np.mgrid[:cache_size, :cache_size]
        for k in range(n_images):
            # Smooth structure + noise, so PNG decoding and resizing see realistic content.
            base = 127 + 60 * np.sin(xx / (5 + k % 7)) * np.cos(yy / (3 + k % 5))
            noise = rng.normal(0, 12, (cache_size, cache_size))
            img = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"img_{k:05d}.png")
        t0 = time.perf_counter()
        cache = build_cache(scan(root), Path(tmp) / "cache", size=cache_size, workers=0)
        cache_s = time.perf_counter() - t0
        grid = img_size // patch
        masks = BlockMaskGenerator.from_ratio((grid, grid), 0.4)
        ds = ImageDataset(cache, PretrainTransform(img_size, tok_size), mask_generator=masks)
        loader = build_loader(
            ds, batch, seed=0, num_workers=workers, pin_memory=pin_memory, drop_last=True
        )
        count, start = 0, None
        for epoch in range(epochs):
            ds.set_epoch(epoch)
            loader.batch_sampler.set_position(epoch, 0)
            for b in loader:
                if start is None:
                    start = time.perf_counter()  # after the first batch: workers are up
                    continue
                count += b["image"].shape[0]
        elapsed = time.perf_counter() - (start or time.perf_counter())
    return {
        "img_per_s": count / elapsed if elapsed > 0 else None,
        "images_timed": count,
        "workers": workers,
        "batch": batch,
        "cache_build_s": cache_s,
        "n_images": n_images,
    }


# ---- largest batch -------------------------------------------------------------------------
def max_batch(
    make_step: Callable[[int], Callable[[], None]],
    device: torch.device,
    *,
    start: int,
    cap: int,
) -> dict[str, Any]:
    """Largest batch whose step runs without CUDA OOM (`make_step(b)` builds a step for b)."""
    if device.type != "cuda":
        return {"max_batch": None, "note": SKIPPED}
    probes: list[tuple[int, bool]] = []

    def fits(b: int) -> bool:
        ok = True
        try:
            step = make_step(b)
            step()
            step()  # the second step allocates the optimizer state (first step) reused after
            C.sync(device)
        except Exception as exc:  # only OOM is expected; anything else is a real error
            if not C.is_oom(exc):
                raise
            ok = False
        finally:
            step = None  # drop the batch before freeing
            C.free_memory(device)
        probes.append((b, ok))
        return ok

    best = C.largest_batch(fits, start=start, cap=cap)
    return {"max_batch": best, "cap": cap, "probes": probes}


def pretrain_step_factory(
    sizes: dict[str, Any], device: torch.device, dtype: torch.dtype | None
) -> Callable[[int], Callable[[], None]]:
    """`b -> step` for ours on one model and optimizer (built once)."""
    from beitdomain.config import OptimConfig
    from beitdomain.engine.pretrain import MIMObjective
    from beitdomain.engine.train.optim import build_adamw
    from beitdomain.models.classifier import param_groups_weight_decay
    from beitdomain.models.mim import BeitMIM

    cfg = PT.backbone_config(
        sizes["preset"], img_size=sizes["img_size"], in_chans=sizes["in_chans"]
    )
    tok = PT.build_tokenizer(sizes["tokenizer"], cfg.in_chans, device, sizes["vocab_size"])
    model = MIMObjective(BeitMIM.from_config(cfg, vocab_size=tok.vocab_size).to(device))
    ocfg = OptimConfig(lr=1e-4)
    opt = build_adamw(param_groups_weight_decay(model, 0.05), ocfg, device)
    tok_size = cfg.grid[0] * tok.config.downsample

    def make(b: int) -> Callable[[], None]:
        batches = PT.make_batches(1, b, cfg, tok_size, device)
        return PT.make_step(model, PT.ours_loss, tok, opt, batches, device, dtype)

    return make


def finetune_step_factory(
    sizes: dict[str, Any], device: torch.device, dtype: torch.dtype | None
) -> Callable[[int], Callable[[], None]]:
    cfg = FT.finetune_config(
        sizes["preset"], img_size=sizes["img_size"], in_chans=sizes["in_chans"]
    )
    model, opt = FT.build_finetune(cfg, 1000, device)

    def make(b: int) -> Callable[[], None]:
        batches = FT.make_batches(1, b, cfg, 1000, device)
        return FT.make_finetune_step(model, opt, batches, device, dtype)

    return make


def unsynced_throughput(
    make_step: Callable[[int], Callable[[], None]],
    device: torch.device,
    *,
    batch: int,
    steps: int,
    warmup: int,
    gflops_per_img: float | None,
    peak_tflops: float | None,
) -> dict[str, Any]:
    """img/s and MFU of `steps` steps queued back to back, synchronized once at the end.

    The step benchmarks synchronize before and after every step, so each timed step includes
    the device's idle start; here the host queues the next step while the device runs this
    one. The ratio to the synced step is the cost of one wait per step.
    """
    step = make_step(batch)
    for _ in range(warmup):
        step()
    wall, _ = C.timed(lambda: [step() for _ in range(steps)], device)
    img_per_s = batch * steps / wall
    flops = gflops_per_img * 1e9 if gflops_per_img else None
    return {
        "img_per_s": img_per_s,
        "step_s": wall / steps,
        "steps": steps,
        "batch": batch,
        "mfu": C.mfu(flops, img_per_s, peak_tflops) if flops else None,
        "peak_gib": "",  # measured on the synced step's row
        "mem_per_img_mib": "",
    }


# ---- attention kernels ---------------------------------------------------------------------
def _sdpa_op_names(fn: Callable[[], Any]) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if "scaled_dot_product" in n or "attention" in n.lower())


def attention_kernels(
    shape: tuple[int, int, int, int],
    device: torch.device,
    dtype: torch.dtype | None,
    *,
    repeats: int = 10,
) -> dict[str, Any]:
    """Forward + backward of SDPA with a shared float bias `[H, N, N]` (grad), per backend.

    Mirrors timm's `Attention` under BeitMIM: q, k, v `[B, H, N, hd]`, the shared relative
    position bias broadcast over the batch, requiring grad (it is a trained table).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, n, hd = shape
    dt = dtype or torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, hd, generator=gen).to(device, dt) for _ in range(3))
    bias = (0.1 * torch.randn(h, n, n, generator=gen)).to(device, dt)
    for t in (q, k, v, bias):
        t.requires_grad_(True)

    def call() -> None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out.backward(torch.ones_like(out))

    res: dict[str, Any] = {"shape": list(shape), "dtype": C.dtype_name(dtype)}
    try:
        res["default_ops"] = _sdpa_op_names(call)
    except Exception as exc:  # the profiler is optional information
        res["default_ops"] = [f"profiler failed: {exc}"]
    backends = {
        "default": None,
        "FLASH": SDPBackend.FLASH_ATTENTION,
        "EFFICIENT": SDPBackend.EFFICIENT_ATTENTION,
        "CUDNN": getattr(SDPBackend, "CUDNN_ATTENTION", None),
        "MATH": SDPBackend.MATH,
    }
    times: dict[str, Any] = {}
    for name, backend in backends.items():
        if device.type != "cuda" and name in ("EFFICIENT", "CUDNN"):
            times[name] = SKIPPED
            continue
        if name != "default" and backend is None:
            times[name] = "not in this torch"
            continue
        ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
        try:
            # torch warns for each kernel it cannot use; the table says the same in one cell.
            with ctx, warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                call()  # warm-up (and the support check)
                samples = [C.timed(call, device)[0] for _ in range(repeats)]
            times[name] = statistics.median(samples) * 1e3
        except RuntimeError as exc:
            times[name] = "unsupported: " + str(exc).splitlines()[0][:100]
        finally:
            for t in (q, k, v, bias):
                t.grad = None
    res["fwd_bwd_ms"] = times
    return res


# ---- the suite -----------------------------------------------------------------------------
def _guard(results: dict[str, Any], key: str, fn: Callable[[], Any]) -> None:
    """Runs one measurement; a failure is recorded (and printed) instead of ending the suite."""
    t0 = time.perf_counter()
    try:
        results[key] = fn()
    except Exception as exc:
        traceback.print_exc()
        results[key] = {"error": f"{type(exc).__name__}: {exc}"}
    print(f"[suite] {key}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def run_suite(
    *,
    device: str = "auto",
    quick: bool = False,
    recipe: str = RECIPE,
    tokenizer: str | None = None,
    batch: int | None = None,
    workers: int | None = None,
    compile: bool = False,
    max_batch_cap: int = 2048,
    memory_gib: float | None = None,
    peak_tflops: float | None = None,
) -> dict[str, Any]:
    """Runs every measurement and returns one JSON-able dict (see the module docstring)."""
    dev = C.resolve_device(device)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    sizes = suite_sizes(quick, tokenizer, batch, recipe)
    if dev.type == "cuda" and memory_gib:
        total = torch.cuda.get_device_properties(dev).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_gib / total), dev)
    if workers is None:
        from beitdomain.engine.train.distributed import default_num_workers

        workers = default_num_workers() if not quick else 0
    step = C.StepSettings(
        preset=sizes["preset"],
        img_size=sizes["img_size"],
        in_chans=sizes["in_chans"],
        batch=sizes["batch"],
        steps=sizes["steps"],
        warmup=sizes["warmup"],
        device=str(dev),
        dtype="bf16" if amp is not None else "fp32",
        peak_tflops=peak_tflops,
    )
    compiled = dataclasses.replace(step, compile=True)
    res: dict[str, Any] = {"env": C.env_info(dev), "sizes": sizes, "workers": workers}

    tok = dict(tokenizer=sizes["tokenizer"], vocab_size=sizes["vocab_size"])
    _guard(res, "pretrain", lambda: PT.run(step, **tok))
    C.free_memory(dev)
    C.free_memory(dev)
    pre = res["pretrain"]
    _guard(
        res,
        "pretrain_unsynced",
        lambda: unsynced_throughput(
            pretrain_step_factory(sizes, dev, amp),
            dev,
            batch=sizes["batch"],
            steps=sizes["steps"],
            warmup=sizes["warmup"],
            gflops_per_img=pre.get("ours", {}).get("gflops_per_img"),
            peak_tflops=pre.get("config", {}).get("peak_tflops", peak_tflops),
        ),
    )
    C.free_memory(dev)
    _guard(res, "finetune", lambda: FT.run(step))
    C.free_memory(dev)
    if compile:
        _guard(
            res,
            "pretrain_compiled",
            lambda: PT.run(compiled, **tok, include_hf=False),
        )
        C.free_memory(dev)
        _guard(res, "finetune_compiled", lambda: FT.run(compiled))
        C.free_memory(dev)

    patch = 8 if quick else 16
    tok_size = sizes["img_size"] // 2
    _guard(
        res,
        "loader",
        lambda: loader_throughput(
            n_images=sizes["loader_images"],
            cache_size=sizes["loader_cache_size"],
            img_size=sizes["img_size"],
            tok_size=tok_size,
            patch=patch,
            batch=sizes["loader_batch"],
            workers=workers,
            pin_memory=dev.type == "cuda",
        ),
    )
    for key, factory in (
        ("max_batch_pretrain", pretrain_step_factory),
        ("max_batch_finetune", finetune_step_factory),
    ):
        _guard(
            res,
            key,
            lambda factory=factory: max_batch(
                factory(sizes, dev, amp) if dev.type == "cuda" else None,
                dev,
                start=sizes["batch"],
                cap=max_batch_cap,
            ),
        )
        C.free_memory(dev)
    _guard(res, "attention", lambda: attention_kernels(sizes["attn_shape"], dev, amp))
    return res


def _model_row(label: str, r: dict[str, Any] | None, note: str = "") -> list[str]:
    if not r or "error" in r:
        return [label, "", "", "", "", "", (r or {}).get("error", "not run")]
    return [
        label,
        C.fmt(r["img_per_s"]),
        C.fmt(r["step_s"] * 1e3),
        C.fmt_pct(r["mfu"]),
        C.fmt(r["peak_gib"], ".2f", SKIPPED),
        C.fmt(r["mem_per_img_mib"], ".1f", SKIPPED),
        note,
    ]


def format_suite(res: dict[str, Any]) -> str:
    """The suite's one markdown table, with a header line of date, device, torch and commit."""
    rows: list[list[str]] = []
    pre = res.get("pretrain", {})
    if "error" in pre:
        rows.append(_model_row("pretrain step", pre))
    elif pre:
        cfg = pre["config"]
        what = (
            f"{cfg['preset']}@{cfg['img_size']} on {cfg['in_chans']} ch, tokenizer "
            f"{cfg['tokenizer']}@{cfg['tokenizer_size']} ({cfg['vocab_size']} codes), "
            f"batch {cfg['batch']}, {cfg['dtype']}"
        )
        flops = f"{pre['ours']['gflops_per_img']:.1f} GFLOP/img counted"
        rows.append(_model_row("pretrain step, ours", pre["ours"], f"{what}; {flops}"))
        if "hf" in pre:
            rows.append(
                _model_row(
                    "pretrain step, HF BeitForMaskedImageModeling",
                    pre["hf"],
                    f"ours {pre['speedup']:.2f}x HF; attn {pre['hf']['attn_implementation']}",
                )
            )
    if "pretrain_unsynced" in res:
        r = res["pretrain_unsynced"]
        note = "" if "error" in r else f"{r['steps']} steps queued, one sync at the end"
        rows.append(_model_row("pretrain step, ours, no per-step sync", r, note))
    ft = res.get("finetune", {})
    if ft:
        note = "" if "error" in ft else f"{ft['config']['preset']}@{ft['config']['img_size']}"
        rows.append(_model_row("finetune step", ft.get("finetune", ft), note))
    for key, label in (("pretrain_compiled", "pretrain step, ours, compiled"),):
        if key in res:
            rows.append(_model_row(label, res[key].get("ours", res[key])))
    if "finetune_compiled" in res:
        r = res["finetune_compiled"]
        rows.append(_model_row("finetune step, compiled", r.get("finetune", r)))

    ld = res.get("loader", {})
    if "error" in ld:
        rows.append(["data loader (cache)", "", "", "", "", "", ld["error"]])
    elif ld:
        consume = pre.get("ours", {}).get("img_per_s") if "error" not in pre else None
        verdict = ""
        if consume and ld["img_per_s"]:
            ok = ld["img_per_s"] > consume
            verdict = (
                f"; step consumes {consume:,.0f} img/s -> loader "
                f"{'keeps up' if ok else 'IS THE BOTTLENECK'} ({ld['img_per_s'] / consume:.2f}x)"
            )
        rows.append(
            [
                f"data loader, cache + pretrain transform + mask, {ld['workers']} workers",
                C.fmt(ld["img_per_s"]),
                "",
                "",
                "",
                "",
                f"batch {ld['batch']}, {ld['n_images']} cached images{verdict}",
            ]
        )
    for key, label in (
        ("max_batch_pretrain", "largest batch, pretrain step"),
        ("max_batch_finetune", "largest batch, finetune step"),
    ):
        m = res.get(key, {})
        if "error" in m:
            note = m["error"]
        elif m.get("max_batch") is None:
            note = m.get("note", "")
        else:
            capped = " (= cap)" if m["max_batch"] >= m["cap"] else ""
            note = f"{m['max_batch']}{capped}; {len(m['probes'])} probes"
        rows.append([label, "", "", "", "", "", note])
    att = res.get("attention", {})
    if "error" in att:
        rows.append(["SDPA with rel-pos bias", "", "", "", "", "", att["error"]])
    elif att:
        ops = ", ".join(o.removeprefix("aten::") for o in att["default_ops"])
        for name, value in att["fwd_bwd_ms"].items():
            label = f"SDPA + float bias fwd+bwd, {name}"
            if isinstance(value, str):
                rows.append([label, "", "", "", "", "", value])
            else:
                note = f"shape {att['shape']} {att['dtype']}"
                if name == "default":
                    note += f"; runs: {ops}"
                rows.append([label, "", C.fmt(value, ".2f"), "", "", "", note])
    table = C.markdown_table(
        ["measurement", "img/s", "ms", "MFU", "peak GiB", "MiB/img", "notes"], rows, left=(0, 6)
    )
    return "\n".join(["GPU suite", C.header_lines(res["env"]), "", table])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    p.add_argument(
        "--recipe", default=RECIPE, help=f"the recipe whose model is measured (default {RECIPE})"
    )
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer preset (default: the recipe's; 'dalle')"
    )
    p.add_argument("--batch", type=int, default=None, help="step batch (default 128)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: cores-1)")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows")
    p.add_argument(
        "--max-batch",
        dest="max_batch_cap",
        type=int,
        default=2048,
        help="cap of the batch search",
    )
    p.add_argument("--memory-gib", type=float, default=None, help="emulate a smaller GPU")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the suite, prints the table, writes `--out`; returns the results dict."""
    args = vars(parse_args(argv))
    out = args.pop("out")
    res = run_suite(**args)  # the other flags are `run_suite`'s arguments, one for one
    C.emit(format_suite(res), res, out)
    return res


if __name__ == "__main__":
    main()
