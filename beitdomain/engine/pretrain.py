"""`beitdomain pretrain`: BEiT masked image modeling on unlabeled domain images.

Per batch: one crop gives two views; the frozen tokenizer turns the small view into visual
tokens [B, gh, gw] (targets); the backbone sees the large view with ~40% of its patches (blockwise)
replaced by the [MASK] embedding and predicts the token of each masked patch. `mask.kind: random`
and `model.target: pixels` re-run the paper's two ablations on the user's data.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from beitdomain.config import Recipe
from beitdomain.engine import distributed as D
from beitdomain.engine.build import backbone_config, mask_generator
from beitdomain.engine.data import unlabeled_dataset
from beitdomain.engine.loop import Trainer, plan_run, prepare_for_training
from beitdomain.engine.optim import build_adamw, lr_schedule
from beitdomain.engine.rundir import RunDir
from beitdomain.fileio import atomic_save, atomic_write_json
from beitdomain.models.classifier import param_groups_weight_decay
from beitdomain.models.convert import export_timm_backbone, load_backbone_weights
from beitdomain.models.mim import BeitMIM
from beitdomain.tokenizer import DiscreteVAE
from beitdomain.tokenizer.io import load_tokenizer
from beitdomain.user import UserError

log = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.safetensors"  # timm-compatible export, what fine-tuning loads


class MIMObjective(nn.Module):
    """Loss as the forward pass, so DDP's gradient hooks see the whole computation."""

    def __init__(self, mim: BeitMIM) -> None:
        super().__init__()
        self.mim = mim

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.mim.loss(images, mask, targets)


def load_frozen_tokenizer(
    recipe: Recipe, device: torch.device, grid: tuple[int, int]
) -> DiscreteVAE:
    """The tokenizer whose codes are the targets, checked against the backbone's patch grid."""
    path = recipe.tokenizer.path
    if not path:
        raise UserError(
            "pre-training with model.target=tokens needs a trained tokenizer: set "
            "tokenizer.path (e.g. --tokenizer runs/tok, after `beitdomain tokenizer train`), "
            "or use model.target=pixels for the pixel-regression ablation"
        )
    tok = load_tokenizer(path, map_location=device)
    cfg = tok.config
    if cfg.in_chans != recipe.data.in_chans:
        raise UserError(
            f"tokenizer {path} takes in_chans={cfg.in_chans} but data.in_chans="
            f"{recipe.data.in_chans}; train a tokenizer with the same channel policy"
        )
    tok_grid = recipe.data.tokenizer_size // cfg.downsample
    if (tok_grid, tok_grid) != tuple(grid):
        raise UserError(
            f"the tokenizer view gives a {tok_grid}x{tok_grid} token grid "
            f"(data.tokenizer_size={recipe.data.tokenizer_size} / downsample {cfg.downsample}) "
            f"but the backbone has a {grid[0]}x{grid[1]} patch grid; set data.tokenizer_size="
            f"{grid[0] * cfg.downsample}"
        )
    tok.eval().requires_grad_(False)
    return tok.to(memory_format=torch.channels_last)  # faster convolutions on GPU and CPU


def build_mim(recipe: Recipe, vocab_size: int) -> tuple[BeitMIM, Any]:
    """The MIM model, initialised from `model.init` when set; returns (model, load report)."""
    cfg = backbone_config(recipe)
    model = BeitMIM.from_config(cfg, target=recipe.model.target, vocab_size=vocab_size)
    report = None
    if recipe.model.init:
        report = load_backbone_weights(
            model,
            recipe.model.init,
            in_chans=recipe.data.in_chans,
            trust_pickle=recipe.model.trust_pickle,
        )
        log.info("%s", report)
    return model, report


def pretrain(
    recipe: Recipe,
    out: str | Path,
    *,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Runs BEiT pre-training; writes checkpoints, `mim.safetensors` and `backbone.safetensors`.

    Returns:
        Final metrics (loss, masked-token accuracy) and the export's path.
    """
    dev = D.resolve_device(device)
    info = D.init_distributed(dev)
    run = RunDir.open(
        out,
        kind="pretrain",
        resume=resume,
        overwrite=overwrite,
        is_main=info.is_main,
        recipe=recipe,
    )
    D.seed_everything(recipe.seed, recipe.train.deterministic)
    grid_cfg = backbone_config(recipe)
    tokenizer = None
    vocab = 1
    if recipe.model.target == "tokens":
        tokenizer = load_frozen_tokenizer(recipe, dev, grid_cfg.grid)
        vocab = tokenizer.vocab_size
    model, report = build_mim(recipe, vocab)
    model.to(dev)
    gen = mask_generator(recipe, grid_cfg.grid)
    dataset, _, fingerprint = unlabeled_dataset(
        recipe, kind="pretrain", mask_generator=gen, progress=not quiet, report_dir=run.path
    )
    if info.is_main:
        run.start("pretrain", recipe, str(dev), data_fingerprint=fingerprint)
        if report is not None:
            atomic_write_json(run.path / "init_report.json", report.__dict__)

    t = recipe.train
    plan = plan_run(dataset, t, seed=recipe.seed, num_workers=recipe.data.num_workers, device=dev)
    total, global_batch = plan.total_steps, plan.global_batch
    optimizer = build_adamw(
        param_groups_weight_decay(model, recipe.optim.weight_decay), recipe.optim, dev
    )
    objective = prepare_for_training(MIMObjective(model), t, dev)

    def step_fn(m: nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        targets = None
        if tokenizer is not None:
            with torch.inference_mode():
                x = b["tok_image"].contiguous(memory_format=torch.channels_last)
                targets = tokenizer.encode(x).flatten(1)  # [B, gh*gw] visual tokens
            targets = targets.clone()  # leave inference mode for autograd
        loss, metrics = m(b["image"], b["mask"], targets)
        out = {k: v for k, v in metrics.items() if k in ("acc", "mse")}
        return loss, out

    trainer = Trainer(
        model=objective,
        optimizer=optimizer,
        loader=plan.loader,
        step_fn=step_fn,
        lr_at=lr_schedule(recipe.optim, total, global_batch),
        total_steps=total,
        train=t,
        grad_clip=recipe.optim.grad_clip,
        device=dev,
        run=run,
        desc="pretrain",
        quiet=quiet,
        tensorboard=t.tensorboard,
    )
    with run.recording_failures(info.is_main):
        trainer.fit(resume=resume)

    result: dict[str, Any] = {"steps": total, "global_batch": global_batch, **trainer.last_metrics}
    if info.is_main:
        write_pretrain_outputs(model, run.path)
        result["backbone"] = str(run.path / BACKBONE_FILE)
        run.finish(result=result)
    D.barrier()
    return result


def write_pretrain_outputs(model: BeitMIM, folder: Path) -> Path:
    """`mim.safetensors` (the whole MIM model) and `backbone.safetensors` (timm layout)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_save(folder / "mim.safetensors", lambda f: f.write(save(state)))
    export = export_timm_backbone(model, folder / f".{BACKBONE_FILE}.tmp")
    Path(export.path).replace(folder / BACKBONE_FILE)
    meta = {"model_name": export.model_name, "model_kwargs": export.model_kwargs}
    atomic_write_json(folder / "backbone.json", meta)
    return folder / BACKBONE_FILE


def export_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Exports the newest checkpoint of a pre-training run as timm-compatible safetensors."""
    from beitdomain.config import load_recipe
    from beitdomain.engine.checkpoint import CheckpointManager

    run = Path(run)
    if not (run / "recipe.yaml").is_file():
        raise UserError(f"{run} is not a pre-training run folder (no recipe.yaml)")
    recipe = load_recipe(run / "recipe.yaml")
    found = CheckpointManager(run / "checkpoints").load_latest()
    if found is None:
        if (run / "mim.safetensors").is_file():
            from safetensors.torch import load_file

            state = load_file(str(run / "mim.safetensors"))
        else:
            raise UserError(f"{run}: no checkpoint and no mim.safetensors to export")
    else:
        state = found[1]["model"]
        state = {k.removeprefix("mim."): v for k, v in state.items()}
    vocab = state["lm_head.weight"].shape[0] if recipe.model.target == "tokens" else 1
    model, _ = build_mim(replace(recipe, model=replace(recipe.model, init=None)), vocab)
    model.load_state_dict(state)
    folder = Path(out) if out is not None else run
    folder.mkdir(parents=True, exist_ok=True)
    path = write_pretrain_outputs(model, folder)
    log.info("exported %s", path)
    return path
