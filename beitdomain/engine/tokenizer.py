"""`beitdomain tokenizer train`: fit a discrete VAE to the user's images.

The job: images at the tokenizer's size (random resized crops of the same kind pre-training
uses) -> Gumbel-softmax dVAE with annealed temperature and a warmed-up KL weight to the uniform
prior -> `tokenizer.safetensors` + `tokenizer.json` in the run folder, which `pretrain` loads by
path. Code usage is tracked over a sliding window; codes that died are re-seeded by splitting
live ones (see `beitdomain.tokenizer.codebook`), and a collapse below 10% usage is warned about.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from beitdomain.config import Recipe
from beitdomain.data.transforms import FinetuneTransform
from beitdomain.data.unlabeled import unlabeled_dataset
from beitdomain.engine.job import Job, JobOptions
from beitdomain.engine.train import distributed as D
from beitdomain.engine.train.estimate import announce_cpu_time
from beitdomain.engine.train.loop import Trainer
from beitdomain.fileio import atomic_save, atomic_write_json, make_dirs, written_names
from beitdomain.io import IntensitySpec, load_image
from beitdomain.tokenizer import (
    CodebookCollapseWarning,
    CodeUsage,
    DiscreteVAE,
    anneal_steps,
    check_codebook_usage,
    count_params,
    create_tokenizer,
    decoder_gflops,
    encoder_gflops,
    gumbel_temperature,
    kl_weight,
    kl_weight_per_element,
    psnr,
    reinit_dead_codes,
    reset_optimizer_rows,
)
from beitdomain.tokenizer.dvae import edge_loss
from beitdomain.tokenizer.inspect import (
    evaluate_tokenizer,
    plot_code_usage,
    save_reconstruction_grid,
)
from beitdomain.tokenizer.io import load_tokenizer, save_tokenizer, warn_size_change
from beitdomain.user import UserError

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger(__name__)


def build_tokenizer(recipe: Recipe) -> DiscreteVAE:
    """A fresh tokenizer from the recipe's preset and overrides, or the one in `tokenizer.init`."""
    t = recipe.tokenizer
    if t.init:
        model = load_tokenizer(t.init)
        if model.config.in_chans != recipe.data.in_chans:
            raise UserError(
                f"tokenizer.init {t.init} expects in_chans={model.config.in_chans}, but "
                f"data.in_chans={recipe.data.in_chans}"
            )
        warn_size_change(model.config.input_size, recipe.data.tokenizer_size, t.init)
        return model
    overrides: dict[str, Any] = {
        "in_chans": recipe.data.in_chans,
        "input_size": recipe.data.tokenizer_size,
    }
    for key in ("vocab_size", "downsample", "recon_loss"):
        if getattr(t, key) is not None:
            overrides[key] = getattr(t, key)
    return create_tokenizer(t.preset, **overrides)


@dataclass
class TokenizerMonitor:
    """Per-step schedule values, code-usage window, dead-code re-seeding and sample grids."""

    model: DiscreteVAE
    recipe: Recipe
    total_steps: int
    seed: int
    out: Path | None
    preview: torch.Tensor | None = None  # fixed held-out images for reconstruction grids
    usage: CodeUsage = field(init=False)
    last_batch: torch.Tensor | None = None
    revived_total: int = 0

    def __post_init__(self) -> None:
        self.usage = CodeUsage(self.model.vocab_size, device=self._device())

    def _device(self) -> torch.device:
        """The model's device, where the counts live (NCCL all-reduces no CPU tensors)."""
        return next(D.unwrap(self.model).parameters()).device

    def temperature(self, step: int) -> float:
        t = self.recipe.tokenizer
        anneal = anneal_steps(t.temperature_anneal_fraction, self.total_steps)
        return gumbel_temperature(step, anneal, t.temperature_start, t.temperature_end)

    def kl_weight(self, step: int) -> float:
        t = self.recipe.tokenizer
        warm = math.ceil(t.kl_warmup_fraction * self.total_steps)
        beta = kl_weight_per_element(t.kl_weight, self.model.config.in_chans)
        return kl_weight(step, warm, beta)

    def on_step_end(self, trainer: Trainer) -> None:
        step = trainer.state.step
        t = self.recipe.tokenizer
        every = t.dead_code_every
        if (
            every
            and step % every == 0
            and step < trainer.total_steps
            and self.last_batch is not None
        ):
            if trainer.dist.enabled:  # every rank must decide on the same counts
                self.usage.to(self._device())  # the model's device, even if it moved
                torch.distributed.all_reduce(self.usage.counts)
            if trainer.dist.is_main:
                with warnings.catch_warnings():  # logged once here; no second copy
                    warnings.simplefilter("ignore", CodebookCollapseWarning)
                    collapsed = check_codebook_usage(self.usage)
                if collapsed:
                    trainer.log(collapse_warning=1)
            dead = self.usage.dead_codes(
                min_count=1 + int(t.dead_code_min_usage * self.usage.total)
            )
            if len(dead):
                g = torch.Generator().manual_seed(self.seed * 7919 + step)
                model = D.unwrap(trainer.model)
                revived = reinit_dead_codes(model, dead, samples=self.last_batch, generator=g)
                if trainer.dist.enabled:  # rank 0's split wins; the ranks' weights stay equal
                    revived = D.broadcast_object(revived)
                    for p in (
                        model.encoder.logits_conv.weight,
                        model.encoder.logits_conv.bias,
                        model.codebook.weight,
                    ):
                        torch.distributed.broadcast(p.data, src=0)
                reset_optimizer_rows(trainer.optimizer, model, revived)
                self.revived_total += len(revived)
                trainer.log(codes_revived=len(revived), codes_dead=len(dead))
            self.usage.reset()
        sample_now = step % t.sample_every == 0 or step == trainer.total_steps
        if (
            sample_now
            and self.out is not None
            and self.preview is not None
            and trainer.dist.is_main
        ):
            save_reconstruction_grid(
                D.unwrap(trainer.model), self.preview, self.out / "samples" / f"step-{step:08d}.png"
            )

    def state_dict(self) -> dict[str, Any]:
        # a copy on the model's device: the trainer copies this after every step, and a copy to
        # the host would wait for the GPU; checkpoints hold it on the CPU (Trainer.checkpoint_state)
        return {"counts": self.usage.counts.clone(), "revived_total": self.revived_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.usage.counts.copy_(state["counts"])
        self.revived_total = int(state["revived_total"])


def train_tokenizer(
    recipe: Recipe, out: str | Path, **options: Unpack[JobOptions]
) -> dict[str, Any]:
    """Trains a tokenizer; returns its held-out evaluation. Files land in `out`.

    Writes `tokenizer.safetensors`, `tokenizer.json`, `eval.json`, `reconstructions.png`,
    `code_usage.png`, `samples/step-*.png`, `metrics.jsonl` and checkpoints. `options`:
    `JobOptions` (device, resume, overwrite, quiet).
    """
    job = Job.open("tokenizer", recipe, out, **options)
    t = recipe.tokenizer
    dataset, preview_ds, fingerprint = unlabeled_dataset(
        recipe, kind="tokenizer", holdout=True, progress=not job.quiet, report_dir=job.path
    )
    job.start(fingerprint, pretraining_data=dataset.pretraining_data)  # test images in or out
    # channels_last: cuDNN and oneDNN both run these convolutions faster in NHWC (CPU: 1.2x
    # for the demo tokenizer's training step).
    model = build_tokenizer(recipe).to(job.device).to(memory_format=torch.channels_last)
    plan = job.plan(dataset)
    announce_cpu_time(
        job,
        plan.total_steps,
        plan.global_batch,
        encoder_gflops(model) + decoder_gflops(model),
    )
    preview = torch.stack([preview_ds[i]["tok_image"] for i in range(min(16, len(preview_ds)))])
    monitor = TokenizerMonitor(model, recipe, plan.total_steps, recipe.seed, job.path, preview)

    def step_fn(m: nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        x = b["tok_image"].contiguous(memory_format=torch.channels_last)
        step = trainer.state.step
        temp, beta = monitor.temperature(step), monitor.kl_weight(step)
        o = m(x, temperature=temp, hard=t.straight_through)
        monitor.usage.update(o.logits.detach().max(dim=1).indices)  # argmax, faster on a CPU
        monitor.last_batch = x.detach()
        loss = o.loss(beta, t.usage_weight)
        extra: dict[str, Any] = {}
        if t.edge_weight:
            edges = edge_loss(o.recon, x)
            loss = loss + t.edge_weight * edges
            extra["edge_loss"] = edges.detach()
        return loss, {
            **extra,
            "recon_loss": o.recon_loss.detach(),
            "kl": o.kl.detach(),
            "usage_kl": o.usage_kl.detach(),
            "psnr": psnr(o.recon.detach(), x.float()),
            "temperature": temp,
            "kl_weight": beta,
            # a tensor: the trainer reads its metrics back once per step, not one by one
            "code_usage": (monitor.usage.counts > 0).float().mean(),
        }

    groups = _decay_groups(model, t.optim.weight_decay)
    trainer = job.trainer(model, plan, groups, step_fn, hooks=[monitor])
    job.fit(trainer)

    result: dict[str, Any] = {}
    if job.is_main:
        held = torch.stack([preview_ds[i]["tok_image"] for i in range(len(preview_ds))])
        result = evaluate_tokenizer(model, held)
        counts = result.pop("usage_counts")
        result.update(
            steps=plan.total_steps,
            lr=job.peak_lr,
            params=count_params(model),
            encoder_gflops=encoder_gflops(model),
            codes_revived=monitor.revived_total,
            heldout_images=len(preview_ds),
        )
        save_tokenizer(
            model,
            job.path,
            extra={"trained_steps": plan.total_steps, "data": fingerprint, **result},
        )
        save_reconstruction_grid(model, preview, job.path / "reconstructions.png")
        plot_code_usage(counts, job.path / "code_usage.png", "held-out:")
        job.write_json("eval.json", result)
        if result["fraction_used"] < 0.1:
            log.warning(
                "only %.1f%% of the codes are used on held-out images; see code_usage.png",
                100 * result["fraction_used"],
            )
    job.finish(result)
    return result


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only; none on biases, norms and the codebook."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or "codebook" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


ENCODED_FILE = ".beitdomain-tokens.json"  # the token maps `tokenizer encode` wrote in a folder


def _token_map_stems(paths: list[Path]) -> list[str]:
    """`<name>` per input; inputs sharing a name get their folder in front (`a-x`, `b-x`) so
    that no token map replaces another.

    Raises:
        UserError: if two inputs still share a name (same folder name and file name).
    """
    stems = [Path(p).stem for p in paths]
    clash = {s for s in stems if stems.count(s) > 1}
    stems = [f"{Path(p).parent.name}-{s}" if s in clash else s for p, s in zip(paths, stems)]
    seen: dict[str, Path] = {}
    for path, stem in zip(paths, stems):
        if stem in seen:
            raise UserError(
                f"{seen[stem]} and {path} would both be written as {stem}.npy; encode them "
                "into different --out folders"
            )
        seen[stem] = Path(path)
    return stems


def _check_encode_targets(out: Path, names: list[str]) -> set[str]:
    """The names `tokenizer encode` wrote into `out` before (it may replace those); raises if
    any other file would be replaced."""
    ours, foreign = written_names(out, ENCODED_FILE, names)
    if foreign:
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise UserError(
            f"{out}: {shown} already exist and were not written by 'tokenizer encode'; nothing "
            "was written. Choose another --out folder, or move those files"
        )
    return ours


def encode_files(model: DiscreteVAE, paths: list[Path], out: Path, png: bool = False) -> list[Path]:
    """Token maps `[gh, gw]` for image files, saved as `<name>.npy` (one per frame).

    Never replaces a file it did not write: inputs sharing a name get their folder's name in
    front, and a file already in `out` is replaced only if an earlier encode wrote it (listed
    in `out/.beitdomain-tokens.json`); anything else is refused before the first image is read.
    """
    from matplotlib import colormaps
    from PIL import Image

    cfg = model.config
    view = FinetuneTransform(train=False, image_size=cfg.input_size)
    spec = IntensitySpec(in_chans=cfg.in_chans)
    stems = _token_map_stems(paths)
    out = Path(out)
    # Frames are known only once read: a volume's maps are <stem>-<k>; checked as written.
    ours = _check_encode_targets(
        out, [f"{s}{ext}" for s in stems for ext in ((".npy", ".png") if png else (".npy",))]
    )
    make_dirs(out, "write the token maps")
    dtype = np.uint16 if cfg.vocab_size <= 65536 else np.int32
    cmap = colormaps["nipy_spectral"]
    written = []
    model.eval()
    for path, base in zip(paths, stems):
        image, _ = load_image(path, spec)
        frames = image if image.ndim == 4 else image[None]
        x = torch.stack([torch.from_numpy(view(f)) for f in frames])
        tokens = model.encode(x).numpy().astype(dtype)  # [S, gh, gw]
        for k, t in enumerate(tokens):
            stem = base + (f"-{k}" if len(tokens) > 1 else "")
            names = [f"{stem}.npy", *([f"{stem}.png"] if png else [])]
            if len(tokens) > 1:
                _check_encode_targets(out, [n for n in names if n not in ours])
            ours.update(names)  # recorded before the write: a kill leaves no file unlisted
            atomic_write_json(out / ENCODED_FILE, sorted(ours))
            target = out / names[0]
            atomic_save(target, lambda f, t=t: np.save(f, t))
            written.append(target)
            if png:
                rgb = (cmap(t / max(cfg.vocab_size - 1, 1))[..., :3] * 255).astype(np.uint8)
                img = Image.fromarray(rgb).resize((t.shape[1] * 16, t.shape[0] * 16), Image.NEAREST)
                atomic_save(out / names[1], lambda f, img=img: img.save(f, format="PNG"))
    return written
