"""`beitdomain finetune` and `beitdomain predict`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from beitdomain.cli import options as opt
from beitdomain.cli.common import global_options, handle_errors, load_job, run_job
from beitdomain.cli.output import print_result, print_run

app = typer.Typer()


@app.command()
@handle_errors
@opt.grouped
def finetune(
    ctx: typer.Context,
    labels: opt.LabelsAmountOpt = None,
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            help="classify (one label per image) or segment (a mask per image: the labels "
            "CSV's mask column; segment.classes names the mask values).",
        ),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            help="Backbone: a pretrain run folder, an exported/official BEiT checkpoint "
            "(.safetensors/.pth/HF folder), 'scratch', or timm:ARCH (any timm network from "
            "random weights, e.g. timm:resnet18, the CNN to compare against). With --task "
            "segment: unet, MONAI's U-Net from random weights."
        ),
    ] = None,
    recipe: opt.RecipeOpt = None,
    data: opt.DataFlags = opt.offers("data", "cache", "on_error", "nonfinite", "labels_csv"),
    linear_probe: Annotated[
        bool, typer.Option("--linear-probe", help="Freeze the backbone; train only the head.")
    ] = False,
    selection: opt.SelectionOpt = None,
    train: opt.TrainFlags = opt.offers(),
    trust_pickle: opt.TrustPickleOpt = False,
    run: opt.RunFlags = opt.offers(),
) -> None:
    """Fine-tune a classifier (--task segment: a segmenter) on a few labels; score it on test.

    The split (train/val/test) is fixed and stratified (data.split_seed) unless the labels CSV
    has a split column; --labels takes a stratified subset of the train split. By default the
    run trains on a fixed schedule and keeps its final weights, so nothing looks at labels
    outside the subset (--selection carve or outside: validation picks the checkpoint).
    results.json holds accuracy, balanced accuracy, macro-F1, AUROC, per-class scores and the
    confusion matrix (also confusion_matrix.png).

    Examples:

        beitdomain finetune --data /data/cells --init runs/pre --labels 1% --out runs/ft-1

        beitdomain finetune -r elpv-cpu --init scratch --labels 5/class

        beitdomain finetune -r elpv-cpu --init timm:resnet18 --labels 10%

        beitdomain finetune --data /data/xr --labels-csv labels.csv --init beit.pth --linear-probe

        beitdomain finetune --task segment --data /data/nuclei --labels-csv masks.csv --labels 10%
    """
    resuming = run.resuming()  # checked before any work
    r, out = load_job(
        ctx,
        "finetune",
        recipe,
        run,
        {
            **data.options(),
            "finetune.labels": labels,
            "finetune.task": task,
            "finetune.init": init,
            "finetune.linear_probe": linear_probe or None,
            "finetune.selection": selection,
            **train.options("finetune"),
        },
    )
    from beitdomain.engine.finetune import finetune as run_finetune

    res = run_job(
        ctx, run_finetune, r, out, **resuming, overwrite=run.overwrite, trust_pickle=trust_pickle
    )
    if res and r.finetune.task == "segment":
        _print_segment(out, res)
        return
    if res:
        rows = {
            "init": res["init"],
            "labels": f"{res['n_labels']} of {res['n_train']} ({res['labels']})",
        }
        test = res.get("test")
        if test:
            for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
                if test.get(k) is not None:
                    rows[f"test {k.replace('_', ' ')}"] = f"{100 * test[k]:.1f}%"
            rows["test images"] = test["n"]
        print_run("finetune", out, rows, res)


def _print_segment(out: Path, res: dict) -> None:
    """A segmentation run's summary: labels, then the test split's Dice and IoU."""
    rows = {
        "init": res["init"],
        "labels": f"{res['n_labels']} of {res['n_train']} annotated images ({res['labels']})",
    }
    test = res.get("test")
    if test:
        fg = res["classes"][1:]
        for k in ("mean_dice", "mean_iou"):
            if test.get(k) is not None:
                rows[f"test {k.replace('_', ' ')}"] = f"{100 * test[k]:.1f}%"
        for c in fg:
            d, i = test["dice"].get(c), test["iou"].get(c)
            if d is not None and i is not None:
                rows[f"test {c}"] = f"Dice {100 * d:.1f}%, IoU {100 * i:.1f}%"
        rows["test images"] = test["n_images"]
    print_run("finetune", out, rows, res)


@app.command()
@handle_errors
def predict(
    ctx: typer.Context,
    run: Annotated[Path, typer.Argument(help="A finished fine-tuning run folder.")],
    inputs: Annotated[list[str], typer.Argument(help="Image files and/or folders.")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="CSV to write (default predictions.csv); for a segmentation run, the folder "
            "of mask PNGs (default masks).",
        ),
    ] = None,
    on_error: Annotated[
        str,
        typer.Option(
            "--on-error",
            help="Unreadable images: skip (predict the others; they are listed in "
            "<out>.errors.csv) or fail.",
        ),
    ] = "skip",
    nonfinite: opt.NonfiniteOpt = None,
) -> None:
    """Predict classes (or masks) for new images with a fine-tuned run (same readers and
    normalization).

    Writes one CSV row per image (per frame for multi-frame files): path, frame, predicted
    class and one probability column per class. With a segmentation run (finetune --task
    segment): one PNG label map per image or frame, pixel value = class index.

    Example:

        beitdomain predict runs/ft-1 /data/new_cells --out preds.csv
    """
    from beitdomain.engine.segment import is_segment_run

    if is_segment_run(run):
        from beitdomain.engine.segment import predict_masks

        folder = out or Path("masks")
        written, skipped = predict_masks(
            run,
            inputs,
            folder,
            device=global_options(ctx).device,
            on_error=on_error,
            nonfinite=nonfinite,
        )
        lines = [f"wrote {len(written)} mask(s) to {folder}"]
        lines += [f"skipped {name}: {why}" for name, why in skipped]
        print_result(
            "\n".join(lines),
            {"masks": [str(p) for p in written], "skipped": [list(s) for s in skipped]},
        )
        return
    out = out or Path("predictions.csv")
    from beitdomain.engine.predict import predict_files

    path, skipped = predict_files(
        run, inputs, out, device=global_options(ctx).device, on_error=on_error, nonfinite=nonfinite
    )
    from beitdomain.data.index import errors_path

    lines = [f"wrote {path}"]
    if skipped:
        lines.append(
            f"skipped {len(skipped)} file(s) that could not be used: see {errors_path(out)}"
        )
    print_result(
        "\n".join(lines),
        {
            "predictions": str(path),
            "skipped": len(skipped),
            "errors_csv": str(errors_path(out)) if skipped else None,
        },
    )
