"""The demo's training steps through the library's own `Trainer`, timed or profiled.

Run: ``python benchmarks/demo_step.py --job pretrain`` (or ``--job finetune``;
``--profile`` prints torch.profiler's top ops by self CPU time instead of timing;
``--op-times`` the wall time of every op and the matrix multiplies' share).

What `beitdomain pretrain` / `finetune` run per batch for `recipes/elpv-cpu.yaml` (width 128,
depth 4, 64 px, patch 8; tokenizer `tiny` at 32 px, 256 codes; batch 64 / 32), minus the data
loader: the batches are synthetic and already in memory, so what is timed is the step the recipe
trains with (tokenizer encode, forward, loss, backward, clipping, AdamW, the loop's
bookkeeping) in the recipe's precision ("auto": bf16 on a CPU with native bf16).

It only uses library entry points that exist since commit d716b7f (recipe loading, the
backbone config, `BeitMIM`, `BeitClassifier`, the optimizer, `Trainer`), so ``--ab OLD_TREE``
can time the same steps of an older checkout: it runs this script alternately in child
processes whose `PYTHONPATH` is this repository or OLD_TREE, and reports medians per tree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def _recipe_path() -> Path:
    # The recipe of the checkout whose library is imported (an older one under --ab).
    import beitdomain

    return Path(beitdomain.__file__).resolve().parents[1] / "recipes" / "elpv-cpu.yaml"


class _Synthetic(torch.utils.data.Dataset):
    """`n` fixed items shaped as the library's datasets give them."""

    def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


class _Clock:
    """A hook recording the wall time at the end of every optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []

    def on_step_end(self, trainer: Any) -> None:
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())


def _recipe(overrides: Sequence[str]) -> Any:
    from beitdomain.config import load_recipe

    return load_recipe(_recipe_path(), sets=list(overrides))


def _section(recipe: Any, job: str, name: str) -> Any:
    # The job's train/optim section: under the job (the job layer; fine-tuning always), or at
    # the top level for pre-training at d716b7f.
    own = getattr(getattr(recipe, job, None), name, None)
    return own if own is not None else getattr(recipe, name)


def _pretrain_parts(recipe: Any, dev: torch.device, n: int) -> tuple[nn.Module, Any, Any]:
    from beitdomain.engine import pretrain as P
    from beitdomain.engine.build import backbone_config, mask_generator
    from beitdomain.tokenizer.dvae import DiscreteVAE, tokenizer_config

    t = recipe.tokenizer
    tok = DiscreteVAE(
        tokenizer_config(
            t.preset,
            in_chans=recipe.data.in_chans,
            vocab_size=t.vocab_size,
            downsample=t.downsample,
        )
    ).to(dev)
    tok = tok.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    cfg = backbone_config(recipe)
    model, _ = P.build_mim(recipe, tok.vocab_size)
    model.to(dev)
    gen = mask_generator(recipe, cfg.grid)
    rng = np.random.default_rng(0)
    size, tsize, c = recipe.data.image_size, recipe.data.tokenizer_size, recipe.data.in_chans
    items = []
    for _ in range(n):
        image = torch.rand(c, size, size)
        items.append(
            {
                "image": image,
                "tok_image": F.interpolate(image[None], size=tsize, mode="area")[0],
                "mask": torch.from_numpy(np.asarray(gen(rng), dtype=bool).reshape(-1)),
            }
        )
    if hasattr(P, "pretrain_step_fn"):
        step_fn = P.pretrain_step_fn(tok)
    else:  # d716b7f: the step function was a closure inside `pretrain`; the same code

        def step_fn(m: nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
            with torch.inference_mode():
                x = b["tok_image"].contiguous(memory_format=torch.channels_last)
                targets = tok.encode(x).flatten(1)
            targets = targets.clone()
            loss, metrics = m(b["image"], b["mask"], targets)
            return loss, {k: v for k, v in metrics.items() if k in ("acc", "mse")}

    try:  # the generator's exact count, as `beitdomain pretrain` passes it
        objective = P.MIMObjective(model, num_masked=gen.num_masking)
    except TypeError:  # d716b7f: counted per batch
        objective = P.MIMObjective(model)
    return objective, step_fn, items


def _finetune_parts(recipe: Any, dev: torch.device, n: int) -> tuple[nn.Module, Any, Any]:
    try:
        from beitdomain.engine.build import build_classifier
    except ImportError:  # d716b7f: it lived in engine/finetune.py
        from beitdomain.engine.finetune import build_classifier

    model = build_classifier(recipe, 2).to(dev)
    size, c = recipe.data.image_size, recipe.data.in_chans
    items = [{"image": torch.rand(c, size, size), "label": torch.tensor(i % 2)} for i in range(n)]
    weight = torch.tensor([0.7, 1.6], device=dev)  # ELPV's inverse class frequencies
    ls = recipe.finetune.label_smoothing

    def step_fn(m: nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        # As engine.finetune._loss_fn without mixup (the demo recipe has none).
        logits = m(b["image"])
        ce = F.cross_entropy(logits.float(), b["label"], weight=weight, label_smoothing=ls)
        return ce, {"train_acc": (logits.argmax(-1) == b["label"]).float().mean().detach()}

    return model, step_fn, items


def build_trainer(job: str, overrides: Sequence[str], steps: int, hooks: Sequence[Any] = ()):
    """A `Trainer` for `steps` optimizer steps of the demo's `job` on synthetic batches."""
    from beitdomain.engine.train import distributed as D
    from beitdomain.engine.train.loop import Trainer
    from beitdomain.engine.train.optim import build_adamw
    from beitdomain.models.classifier import layer_decay_param_groups, param_groups_weight_decay

    try:
        from beitdomain.engine.train.plan import build_loader, prepare_for_training
    except (
        ImportError
    ):  # an --ab checkout from before engine/train/plan.py split off engine/train/loop.py
        from beitdomain.engine.train.loop import build_loader, prepare_for_training

    dev = torch.device("cpu")
    recipe = _recipe(overrides)
    D.seed_everything(0)
    train, optim = _section(recipe, job, "train"), _section(recipe, job, "optim")
    batch = train.batch_size
    parts = _pretrain_parts if job == "pretrain" else _finetune_parts
    model, step_fn, items = parts(recipe, dev, 4 * batch)
    if job == "pretrain":
        groups = param_groups_weight_decay(model, optim.weight_decay)
    else:
        groups = layer_decay_param_groups(model, optim.lr, optim.weight_decay, optim.layer_decay)
    optimizer = build_adamw(groups, optim, dev)
    loader = build_loader(_Synthetic(items), batch, seed=0, num_workers=0)
    lr = optim.lr or 1e-3
    return Trainer(
        model=prepare_for_training(model, train, dev),
        optimizer=optimizer,
        loader=loader,
        step_fn=step_fn,
        lr_at=lambda s: lr,
        total_steps=steps,
        train=train,
        grad_clip=optim.grad_clip,
        device=dev,
        hooks=hooks,
        quiet=True,
    )


def _step_flops(trainer: Any) -> int:
    """Counted FLOPs (2 x MACs: tokenizer, forward, backward) of one step's loss."""
    batch = next(iter(trainer.loader))

    def run() -> None:
        loss, _ = trainer.step_fn(trainer.model, batch)
        loss.backward()

    flops = C.count_flops(run)
    trainer.optimizer.zero_grad(set_to_none=True)
    return flops


def time_steps(job: str, overrides: Sequence[str], steps: int, warmup: int) -> dict[str, Any]:
    """Builds, compiles (when the recipe says so) and times `steps` steps after `warmup`."""
    clock = _Clock()
    t0, c0 = time.perf_counter(), time.process_time()
    trainer = build_trainer(job, overrides, warmup + steps, hooks=[clock])
    trainer.fit()
    batch = trainer.loader.batch_sampler.batch_size
    per_step = np.diff([t0, *clock.times])
    timed = per_step[warmup:]
    cpu = np.diff([c0, *clock.cpu])[warmup:]
    flops = _step_flops(trainer)
    peaks = C.machine_peaks(trainer.device)
    dtype = "bf16" if trainer.amp_dtype == torch.bfloat16 else "fp32"
    return {
        "job": job,
        "batch": int(batch),
        "first_steps_s": [round(float(x), 3) for x in per_step[:warmup]],
        "step_s": [float(x) for x in timed],
        "median_step_s": float(np.median(timed)),
        "img_per_s": float(batch / np.median(timed)),
        "median_cpu_s": float(np.median(cpu)),
        "gflop_per_step": flops / 1e9,
        "matmul_peak_gflops": peaks,
        # Counted FLOPs per second over the peak of the step's dtype, by each clock.
        "peak_share_wall": flops / np.median(timed) / 1e9 / peaks["wall"][dtype],
        "peak_share_cpu": flops / np.median(cpu) / 1e9 / peaks["cpu"][dtype],
        "amp": str(trainer.amp_dtype),
        "threads": torch.get_num_threads(),
    }


def profile_steps(job: str, overrides: Sequence[str], steps: int, warmup: int, top: int) -> str:
    """torch.profiler's table of the top ops by self CPU time over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    trainer = build_trainer(job, overrides, warmup)
    trainer.fit()
    trainer.total_steps = warmup + steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.fit()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    lines = [
        f"{job}: {steps} steps profiled, self CPU total {total / 1e3 / steps:.1f} ms/step",
        "| op | self ms/step | share | calls/step |",
        "|---|---:|---:|---:|",
    ]
    for e in rows:
        lines.append(
            f"| {e.key} | {e.self_cpu_time_total / 1e3 / steps:.2f} | "
            f"{100 * e.self_cpu_time_total / total:.1f}% | {e.count / steps:.0f} |"
        )
    return "\n".join(lines)


MATMULS = ("mm", "addmm", "bmm", "baddbmm")


def op_times(job: str, overrides: Sequence[str], steps: int, warmup: int, top: int) -> str:
    """Wall time per ATen op over `steps` steps (each op timed as it returns), and the matrix
    multiplies' sum: the part of the step that only faster matmuls shorten.

    A CPU runs each op to completion before returning, so timing the dispatch times the op.
    The timer's own Python call adds microseconds per op: in session 24 the ~1,000 ops of a
    demo step summed to -12% to +9% of the step timed just before without the timer, which
    is this VM's drift between runs. The plain step time is the reference for shares.
    """
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class OpTimer(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ms: dict[str, float] = collections.defaultdict(float)
            self.calls: collections.Counter[str] = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t0 = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            self.ms[name] += 1e3 * (time.perf_counter() - t0)
            self.calls[name] += 1
            return out

    trainer = build_trainer(job, overrides, warmup)
    trainer.fit()
    trainer.total_steps = warmup + steps
    t0 = time.perf_counter()
    trainer.fit()
    plain = 1e3 * (time.perf_counter() - t0) / steps
    timer = OpTimer()
    trainer.total_steps = warmup + 2 * steps
    with timer:
        trainer.fit()
    ops = sum(timer.ms.values()) / steps
    mm = sum(timer.ms[k] for k in MATMULS) / steps
    lines = [
        f"{job}: step {plain:.1f} ms without the timer; under it, ops {ops:.1f} ms/step "
        f"({sum(timer.calls.values()) // steps} calls), matrix multiplies {mm:.1f} ms",
        "| op | ms/step | calls/step |",
        "|---|---:|---:|",
    ]
    for name, ms in sorted(timer.ms.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {name} | {ms / steps:.2f} | {timer.calls[name] // steps} |")
    return "\n".join(lines)


def ab(old: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Alternates child runs on `--new` (default: this tree) and `old`; medians of their
    per-run median steps, and each round's old / new ratio. Give `--new` a checkout of a
    commit (`git worktree add --detach`) to keep edits made meanwhile out of the
    measurement."""
    trees = {"new": (args.new or REPO).resolve(), "old": old.resolve()}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
    loads = []
    for i in range(args.rounds):
        order = list(trees) if i % 2 == 0 else list(trees)[::-1]
        for name in order:
            env = {**os.environ, "PYTHONPATH": str(trees[name])}
            cmd = [sys.executable, __file__, "--job", args.job, "--steps", str(args.steps)]
            cmd += ["--warmup", str(args.warmup), "--json-stdout"]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            sets = args.set if name == "new" else args.old_set
            for s in sets:
                cmd += ["--set", s]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            loads.append(os.getloadavg()[0])
    res: dict[str, Any] = {"job": args.job, "rounds": args.rounds, "load_1m": loads}
    for name in trees:
        meds = [r["median_step_s"] for r in runs[name]]
        cpus = [r["median_cpu_s"] for r in runs[name]]
        res[name] = {
            "median_step_s": statistics.median(meds),
            "per_run_median_s": meds,
            "img_per_s": runs[name][0]["batch"] / statistics.median(meds),
            "median_cpu_s": statistics.median(cpus),
            "per_run_cpu_s": cpus,
            "gflop_per_step": runs[name][0]["gflop_per_step"],
            "peak_share_cpu": statistics.median(r["peak_share_cpu"] for r in runs[name]),
            "matmul_peak_cpu_gflops": runs[name][0]["matmul_peak_gflops"]["cpu"],
            "first_steps_s": [r["first_steps_s"] for r in runs[name]],
        }
    # On a shared machine the wall clock mostly measures the other jobs; at one thread the
    # process CPU time per step is the steadier measure of the work.
    res["speedup"] = res["old"]["median_step_s"] / res["new"]["median_step_s"]
    res["speedup_cpu_time"] = res["old"]["median_cpu_s"] / res["new"]["median_cpu_s"]
    # Each round's two runs ran minutes apart at most; on a VM whose speed drifts between
    # rounds, their ratio is steadier than the ratio of the medians.
    pairs = [
        o["median_step_s"] / n["median_step_s"]
        for o, n in zip(runs["old"], runs["new"], strict=True)
    ]
    res["per_round_speedup"] = [round(x, 3) for x in pairs]
    res["median_round_speedup"] = statistics.median(pairs)
    res["rounds_new_faster"] = sum(x > 1 for x in pairs)
    return res


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", choices=["pretrain", "finetune"], default="pretrain")
    p.add_argument("--set", action="append", default=[], help="recipe override (repeatable)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="torch.profiler's top ops")
    p.add_argument("--op-times", action="store_true", help="wall time per op, and the matmuls' sum")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--ab", type=Path, default=None, help="older checkout to time against")
    p.add_argument("--new", type=Path, default=None, help="checkout timed as 'new' under --ab")
    p.add_argument("--old-set", action="append", default=[], help="override for the old tree")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json-stdout", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ab is not None:
        print(json.dumps(ab(args.ab, args), indent=1))
    elif args.op_times:
        print(op_times(args.job, args.set, args.steps, args.warmup, args.top))
    elif args.profile:
        print(profile_steps(args.job, args.set, args.steps, args.warmup, args.top))
    else:
        res = time_steps(args.job, args.set, args.steps, args.warmup)
        print(json.dumps(res) if args.json_stdout else json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
