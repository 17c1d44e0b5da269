"""`beitdomain pretrain` and `beitdomain pretrain export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from beitdomain.cli import options as opt
from beitdomain.cli.common import handle_errors, load_job, run_job
from beitdomain.cli.output import print_result, print_run

app = typer.Typer(
    help="BEiT masked image modeling on unlabeled images (continued pre-training).",
    invoke_without_command=True,
)


@app.callback()
@handle_errors
@opt.grouped
def pretrain(
    ctx: typer.Context,
    recipe: opt.RecipeOpt = None,
    data: opt.DataFlags = opt.offers("data", "cache", "labels_csv"),
    knn_every: Annotated[
        int | None,
        typer.Option(
            "--knn-every",
            help="Every N epochs, log the k-NN accuracy of the frozen features on the labelled "
            "images (pretrain.knn_every; labels from --labels-csv, the cache or subfolders).",
        ),
    ] = None,
    on_error: opt.OnErrorOpt = None,
    nonfinite: opt.NonfiniteOpt = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Trained tokenizer folder (sets tokenizer.path).")
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            help="Start from weights: official BEiT .pth, timm .safetensors/.pth, a Hugging Face "
            "BeitForMaskedImageModeling folder, hf-hub:org/name, a timm BEiT name "
            "(beit_base_patch16_224.in22k_ft_in22k_in1k) or a beitdomain run (sets model.init)."
        ),
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="Backbone: tiny, vit-tiny, vit-small, vit-base.")
    ] = None,
    mask_kind: Annotated[
        str | None, typer.Option(help="block (BEiT) or random: the masking ablation.")
    ] = None,
    target: Annotated[
        str | None, typer.Option(help="tokens (BEiT) or pixels: the target ablation.")
    ] = None,
    train: opt.TrainFlags = opt.offers(),
    trust_pickle: opt.TrustPickleOpt = False,
    transductive: opt.TransductiveOpt = False,
    run: opt.RunFlags = opt.offers(),
) -> None:
    """Continue BEiT pre-training on your unlabeled images; no labels needed.

    About 40% of each image's patches are masked in blocks and the backbone learns to predict
    their visual tokens from the tokenizer. Writes checkpoints, mim.safetensors and
    backbone.safetensors (timm layout: what `beitdomain finetune --init RUN` loads).

    Examples:

        beitdomain pretrain --data /data/ct --tokenizer runs/tok --out runs/pre

        beitdomain pretrain -r continue-official-beit --init beit_base_patch16_224_pt22k.pth

        beitdomain pretrain -r ct-dicom --mask-kind random --out runs/ablate-random

        torchrun --nproc_per_node=8 -m beitdomain.cli.app pretrain -r elpv-gpu --out runs/pre
    """
    if ctx.invoked_subcommand is not None:
        return
    resuming = run.resuming()  # checked before any work
    r, out = load_job(
        ctx,
        "pretrain",
        recipe,
        run,
        {
            **data.options(on_error=on_error, nonfinite=nonfinite, transductive=transductive),
            "pretrain.knn_every": knn_every,
            "tokenizer.path": str(tokenizer) if tokenizer else None,
            "model.init": str(init) if init else None,
            "model.preset": preset,
            "mask.kind": mask_kind,
            "model.target": target,
            **train.options("pretrain"),
        },
    )
    from beitdomain.engine.pretrain import pretrain as run_pretrain

    result = run_job(
        ctx, run_pretrain, r, out, **resuming, overwrite=run.overwrite, trust_pickle=trust_pickle
    )
    if result:
        rows = {"steps": result["steps"], "global batch": result["global_batch"]}
        if "acc" in result:
            rows["masked-token accuracy (last step)"] = f"{100 * result['acc']:.1f}%"
        rows["loss (last step)"] = f"{result.get('loss', float('nan')):.4f}"
        rows["backbone"] = result.get("backbone", "")
        print_run("pretrain", out, rows, result)


@app.command()
@handle_errors
def export(
    run: Annotated[Path, typer.Argument(help="A pre-training run folder.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Folder (default: the run, or RUN/export-FORMAT)."),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="timm (a timm model folder) or hf (a Hugging Face BeitModel folder with its "
            "image processor); default: backbone.safetensors + backbone.json in the run.",
        ),
    ] = None,
) -> None:
    """Export a run's newest checkpoint for timm or Hugging Face transformers.

    Every export carries the input convention (channels, size, mean and std of [0, 1] images),
    so each library's own preprocessing feeds the weights what they were trained on:

        beitdomain pretrain export runs/pre --format timm  (writes runs/pre/export-timm)
        timm.create_model('local-dir:runs/pre/export-timm', pretrained=True)

        beitdomain pretrain export runs/pre --format hf  (writes runs/pre/export-hf)
        BeitModel.from_pretrained('runs/pre/export-hf')
        AutoImageProcessor.from_pretrained('runs/pre/export-hf')

    Without --format: backbone.safetensors (timm layout, what `finetune --init RUN` loads) and
    backbone.json (timm model name, keyword arguments and input convention).
    """
    from beitdomain.engine.pretrain import export_run

    if fmt not in (None, "timm", "hf"):
        raise typer.BadParameter(f"--format {fmt!r}: use timm or hf")
    path = export_run(run, out, fmt)  # type: ignore[arg-type]
    if fmt is None:
        print_result(
            f"wrote {path} and {path.with_name('backbone.json')}",
            {"backbone": str(path), "backbone_json": str(path.with_name("backbone.json"))},
        )
    else:
        print_result(f"wrote the {fmt} export to {path}", {"export": str(path), "format": fmt})
