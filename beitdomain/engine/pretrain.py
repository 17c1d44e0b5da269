"""`beitdomain pretrain`: BEiT masked image modeling on unlabeled domain images.

Per batch: one crop gives two views; the frozen tokenizer turns the small view into visual
tokens [B, gh, gw] (targets); the backbone sees the large view with ~40% of its patches (blockwise)
replaced by the [MASK] embedding and predicts the token of each masked patch. `mask.kind: random`
and `model.target: pixels` re-run the paper's two ablations on the user's data.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from beitdomain.config import Recipe, load_recipe
from beitdomain.data.labeled import labeled_data
from beitdomain.data.unlabeled import unlabeled_dataset
from beitdomain.engine.build import backbone_config, is_pretrained, mask_generator, resolve_init
from beitdomain.engine.job import (
    BACKBONE_FILE,
    BACKBONE_META,
    MIM_FILE,
    RECIPE_FILE,
    Job,
    JobOptions,
)
from beitdomain.engine.represent_eval import KnnMonitor
from beitdomain.engine.run.checkpoint import CheckpointManager
from beitdomain.engine.train.estimate import announce_cpu_time, backbone_forward_gflops
from beitdomain.fileio import atomic_write_json, atomic_write_safetensors, make_dirs
from beitdomain.models.classifier import param_groups_weight_decay
from beitdomain.models.convention import convention_of
from beitdomain.models.export import ExportFormat, export_backbone, export_timm_backbone
from beitdomain.models.mim import BeitMIM
from beitdomain.models.pretrained import build_pretraining_model, is_imported_dalle
from beitdomain.tokenizer import DiscreteVAE, encoder_gflops
from beitdomain.tokenizer.io import load_tokenizer, load_tokenizer_extra, warn_size_change
from beitdomain.user import UserError

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger(__name__)


class MIMObjective(nn.Module):
    """Loss as the forward pass, so DDP's gradient hooks see the whole computation.

    `num_masked`: every mask's exact count (the mask generator's), so the step finds the
    masked patches without a host sync (`BeitMIM.forward`); None: counted per batch.
    """

    def __init__(self, mim: BeitMIM, num_masked: int | None = None) -> None:
        super().__init__()
        self.mim = mim
        self.num_masked = num_masked

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.mim.loss(images, mask, targets, num_masked=self.num_masked)


class MIMStep:
    """One pre-training step's loss on a batch: the frozen tokenizer's visual tokens of the
    tokenizer's view (none for pixel targets), then the wrapped `MIMObjective`.

    A `StepFn` (`step(objective, batch) -> (loss, metrics)`): the job and
    `benchmarks/pretrain_step.py` run this one step.
    """

    def __init__(self, tokenizer: DiscreteVAE | None) -> None:
        self.tokenizer = tokenizer

    def targets(self, b: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Visual tokens `[B, gh*gw]` of `b["tok_image"]`, usable by autograd; None for pixels."""
        if self.tokenizer is None:
            return None
        with torch.inference_mode():
            x = b["tok_image"].contiguous(memory_format=torch.channels_last)
            targets = self.tokenizer.encode(x).flatten(1)  # [B, gh*gw] visual tokens
        return targets.clone()  # leave inference mode for autograd

    def __call__(
        self, m: nn.Module, b: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, metrics = m(b["image"], b["mask"], self.targets(b))
        return loss, {k: v for k, v in metrics.items() if k in ("acc", "mse")}


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
    warn_size_change(cfg.input_size, recipe.data.tokenizer_size, str(path))
    tok.eval().requires_grad_(False)
    return tok.to(memory_format=torch.channels_last)  # faster convolutions on GPU and CPU


def build_mim(recipe: Recipe, vocab_size: int, trust_pickle: bool = False) -> tuple[BeitMIM, Any]:
    """The MIM model, initialised from `model.init` when set; returns (model, load report).

    `trust_pickle` allows a pickle-based `model.init` (it can run code: trusted files only).
    """
    m = recipe.model
    init = resolve_init(m.init)  # fine-tuning's resolution: run folders, files, hub names
    if init is not None and not is_pretrained(init):
        raise UserError(f"model.init {m.init}: a timm network cannot be pre-trained with MIM")
    reuse = m.lm_head == "reuse"
    if m.lm_head == "auto" and m.init and recipe.tokenizer.path and m.target == "tokens":
        reuse = is_imported_dalle(load_tokenizer_extra(recipe.tokenizer.path))
    model, report = build_pretraining_model(
        backbone_config(recipe, grad_checkpointing=recipe.pretrain.train.grad_checkpointing),
        target=m.target,
        vocab_size=vocab_size,
        norm_pix_loss=m.norm_pix_loss,
        init=init,
        trust_pickle=trust_pickle,
        rel_pos_bias=m.rel_pos_bias,
        reuse_lm_head=reuse,
        input_mean=m.input_mean,
        input_std=m.input_std,
    )
    if report is not None:
        if init != m.init:
            report.notes.append(f"{m.init} resolved to {init}")
        log.info("%s", report)
    return model, report


def pretrain(recipe: Recipe, out: str | Path, **options: Unpack[JobOptions]) -> dict[str, Any]:
    """Runs BEiT pre-training; writes checkpoints, `mim.safetensors` and `backbone.safetensors`.

    `options` (`JobOptions`): device, resume, overwrite, quiet, and trust_pickle, which allows
    a pickle-based `model.init` (it can run code: trusted files only).

    Returns:
        Final metrics (loss, masked-token accuracy) and the export's path.
    """
    job = Job.open("pretrain", recipe, out, **options)
    grid = backbone_config(recipe).grid
    tokenizer = None
    if recipe.model.target == "tokens":
        tokenizer = load_frozen_tokenizer(recipe, job.device, grid)
    model, report = build_mim(recipe, tokenizer.vocab_size if tokenizer else 1, job.trust_pickle)
    model.to(job.device)
    masks = mask_generator(recipe, grid)
    dataset, _, fingerprint = unlabeled_dataset(
        recipe,
        kind="pretrain",
        mask_generator=masks,
        progress=not job.quiet,
        report_dir=job.path,
    )
    # its labels are read here, so a k-NN check that cannot run is refused before the start
    hooks = [knn_monitor(recipe, job.quiet)] if recipe.pretrain.knn_every else []
    job.start(fingerprint, pretraining_data=dataset.pretraining_data)  # test images in or out
    if report is not None:
        job.write_json("init_report.json", report.__dict__)

    plan = job.plan(dataset)
    announce_cpu_time(
        job,
        plan.total_steps,
        plan.global_batch,
        backbone_forward_gflops(backbone_config(recipe)),
        frozen_gflops=encoder_gflops(tokenizer) if tokenizer is not None else 0.0,
    )
    groups = param_groups_weight_decay(model, recipe.pretrain.optim.weight_decay)
    objective = partial(MIMObjective, num_masked=masks.num_masking)
    trainer = job.trainer(model, plan, groups, MIMStep(tokenizer), wrap=objective, hooks=hooks)
    job.fit(trainer)

    result: dict[str, Any] = {
        "steps": plan.total_steps,
        "global_batch": plan.global_batch,
        "lr": job.peak_lr,
        **trainer.last_metrics,
    }
    if job.is_main:
        write_pretrain_outputs(model, job.path)
        result["backbone"] = str(job.path / BACKBONE_FILE)
    job.finish(result)
    return result


def knn_monitor(recipe: Recipe, quiet: bool) -> Any:
    """The k-NN check of `pretrain.knn_every`: all labelled training images as the memory,
    the validation split (the test split when there is none) scored against it."""

    try:
        data = labeled_data(recipe, labels="100%", progress=not quiet)
    except UserError as e:
        raise UserError(
            f"pretrain.knn_every={recipe.pretrain.knn_every} needs labelled images for its k-NN "
            f"check ({e}); give --labels-csv, or unset pretrain.knn_every"
        ) from None
    query = data.val if data.val is not None else data.test
    if query is None:
        raise UserError(
            "pretrain.knn_every needs held-out labelled images: set data.val_fraction > 0"
        )
    return KnnMonitor(
        lambda m: m.mim if hasattr(m, "mim") else m,
        data.train,
        query,
        data.classes,
        recipe.data.image_size,
        every_epochs=recipe.pretrain.knn_every,
    )


def write_pretrain_outputs(model: BeitMIM, folder: Path) -> Path:
    """`mim.safetensors` (the whole MIM model) and `backbone.safetensors` (timm layout)."""
    atomic_write_safetensors(folder / MIM_FILE, model.state_dict())
    export = export_timm_backbone(model, folder / f".{BACKBONE_FILE}.tmp")
    Path(export.path).replace(folder / BACKBONE_FILE)
    meta = {
        "model_name": export.model_name,
        "model_kwargs": export.model_kwargs,
        # what the weights expect: [0, 1] images normalized with this mean / std
        "input": convention_of(model).to_dict(),
    }
    atomic_write_json(folder / BACKBONE_META, meta)
    return folder / BACKBONE_FILE


def export_run(
    run: str | Path, out: str | Path | None = None, fmt: ExportFormat | None = None
) -> Path:
    """Exports the newest checkpoint of a pre-training run.

    Args:
        run: the pre-training run folder.
        out: the folder to write; default: the run (fmt None), `run/export-timm`, `run/export-hf`.
        fmt: None = `backbone.safetensors` + `backbone.json` (what fine-tuning loads); "timm" =
            a timm model folder, "hf" = a Hugging Face `BeitModel` folder (`models.export`).

    Returns:
        The backbone file (fmt None) or the export folder.
    """

    run = Path(run)
    if not (run / RECIPE_FILE).is_file():
        raise UserError(f"{run} is not a pre-training run folder (no {RECIPE_FILE})")
    recipe = load_recipe(run / RECIPE_FILE)
    found = CheckpointManager(run / "checkpoints").load_latest()
    if found is None:
        if (run / MIM_FILE).is_file():
            from safetensors.torch import load_file

            state = load_file(str(run / MIM_FILE))
        else:
            raise UserError(f"{run}: no checkpoint and no mim.safetensors to export")
    else:
        state = found[1]["model"]
        state = {k.removeprefix("mim."): v for k, v in state.items()}
    vocab = state["lm_head.weight"].shape[0] if recipe.model.target == "tokens" else 1
    shared = "backbone.rel_pos_bias.relative_position_bias_table" in state
    layout = "shared" if shared else "per_block"
    model, _ = build_mim(
        replace(recipe, model=replace(recipe.model, init=None, rel_pos_bias=layout)), vocab
    )
    model.load_state_dict(state)
    if fmt is not None:
        folder = Path(out) if out is not None else run / f"export-{fmt}"
        folder = export_backbone(model, folder, fmt)
        log.info("exported %s", folder)
        return folder
    folder = Path(out) if out is not None else run
    make_dirs(folder, "export the backbone")
    path = write_pretrain_outputs(model, folder)
    log.info("exported %s", path)
    return path
