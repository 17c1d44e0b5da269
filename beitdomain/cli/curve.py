"""`beitdomain curve`: how many labels did pre-training save?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from beitdomain.cli import options as opt
from beitdomain.cli.common import handle_errors, load_job, run_job
from beitdomain.cli.output import print_efficiency

app = typer.Typer()


def parse_inits(values: list[str]) -> dict[str, str | None]:
    """`name=path`, `scratch` or `timm:<arch>` -> {name: path or None}."""
    out: dict[str, str | None] = {}
    for v in values:
        if "=" in v:
            name, path = v.split("=", 1)
        elif v.lower() == "scratch":
            name, path = "scratch", None
        elif v.lower().startswith("timm:"):  # a timm network from random weights, named by arch
            name, path = v[len("timm:") :], v
        else:
            name, path = Path(v).name or v, v
        if not name:
            raise typer.BadParameter(f"--init {v!r}: expected NAME=PATH or scratch")
        out[name] = None if path is None or path.lower() == "scratch" else path
    return out


def parse_init_sets(values: list[str]) -> dict[str, list[str]]:
    """`NAME:section.key=value` -> {NAME: ["section.key=value", ...]}."""
    out: dict[str, list[str]] = {}
    for v in values:
        name, sep, item = v.partition(":")
        if not sep or not name or "=" not in item:
            raise typer.BadParameter(
                f"--init-set {v!r}: expected NAME:section.key=value, "
                f"e.g. --init-set domain:finetune.optim.lr=1e-4"
            )
        out.setdefault(name, []).append(item)
    return out


@app.command()
@handle_errors
@opt.grouped
def curve(
    ctx: typer.Context,
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            help="classify (default) or segment: every cell fine-tunes a segmenter on masks "
            "(the labels CSV's mask column), label amounts count annotated images, and the "
            "curve compares foreground-mean Dice (IoU beside it).",
        ),
    ] = None,
    init: Annotated[
        list[str] | None,
        typer.Option(
            help="Repeatable: NAME=PATH (a pretrain run or checkpoint), 'scratch', or "
            "timm:ARCH (that timm network from random weights, e.g. a CNN). E.g. --init "
            "domain=runs/pre --init scratch --init cnn=timm:resnet18 --init imagenet=beit.pth. "
            "With --task segment: 'unet' (MONAI's U-Net from random weights) instead of timm."
        ),
    ] = None,
    init_set: Annotated[
        list[str] | None,
        typer.Option(
            "--init-set",
            help="Repeatable: NAME:section.key=value, a fine-tuning setting for one --init "
            "only (sets curve.init_sets). E.g. --init-set domain:finetune.optim.lr=1e-4",
        ),
    ] = None,
    fractions: Annotated[
        str | None, typer.Option(help="Comma-separated label amounts, e.g. 1%,5%,10%,25%,100%.")
    ] = None,
    seeds: opt.SeedsOpt = None,
    metric: Annotated[
        str | None,
        typer.Option(
            help="balanced_accuracy (default), accuracy, auroc, macro_f1 (classification); "
            "mean_dice (default) or mean_iou for a --task segment curve."
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Cells fine-tuned at a time (default: curve.workers, 2 in the CPU recipes; "
            "else one per visible GPU, 1 on a CPU). On a CPU the workers split the cores: with "
            "--workers 2 on 2 cores each cell trains on one core (1.4x the cells per hour "
            "of one at a time on both)."
        ),
    ] = None,
    selection: opt.SelectionOpt = None,
    recipe: opt.RecipeOpt = None,
    data: opt.DataFlags = opt.offers("data", "cache", "labels_csv", "on_error", "nonfinite"),
    run: opt.RunFlags = opt.offers("sets", "out", "overwrite"),
    trust_pickle: opt.TrustPickleOpt = False,
) -> None:
    """Fine-tune at several label fractions x seeds x initializations and draw the curve.

    Re-running the same command continues an interrupted grid: finished cells are skipped, a
    cell that was cut off resumes from its checkpoint. Writes curve.csv (one row per run),
    summary.csv (mean ± std), curve.png and report.md. Beside the fine-tunes, logistic
    regressions on pixels, on their PCA and on each backbone's frozen features run on exactly
    the same label subsets; report.md's verdict compares each pre-trained arm with the strongest
    arm without pre-training, and says so plainly when pre-training does not pay.

    Labels stay within the budget: by default a cell trains on a fixed schedule and keeps its
    final weights (--selection). A pre-trained backbone and a random one rarely want the same
    fine-tuning learning rate; --init-set gives one initialization its own settings (give each
    arm the same number of tries). A randomly initialised arm trains without layer decay. At
    1% the seed-to-seed spread is largest and a fine-tune cheapest: curve.fraction_seeds runs
    more seeds there, e.g. --set 'curve.fraction_seeds={"1%": [0, 1, 2, 3, 4, 5]}'.

    With --task segment the cells are segmentation fine-tunes on masks, scored in Dice; the
    arms without pre-training are scratch and MONAI's U-Net (--init unet), and the classical
    baselines, which classify whole images, are not run.

    Examples:

        beitdomain curve -r elpv-cpu --init domain=runs/pre --init scratch --fractions 1%,10%,100%

        beitdomain curve --init d=runs/pre --init scratch --init-set d:finetune.optim.lr=1e-4

        beitdomain curve --task segment --labels-csv masks.csv --init d=runs/pre --init unet
    """
    r, out = load_job(
        ctx,
        "curve",
        recipe,
        run,
        {
            **data.options(),
            "curve.inits": parse_inits(init) if init else None,
            "curve.init_sets": parse_init_sets(init_set) if init_set else None,
            **opt.curve_options(fractions, seeds),
            "curve.metric": metric,
            "finetune.selection": selection,
            "finetune.task": task,
        },
    )
    from beitdomain.engine.curve.run import run_curve

    result = run_job(
        ctx, run_curve, r, out, overwrite=run.overwrite, workers=workers, trust_pickle=trust_pickle
    )
    print_efficiency(out, result, f"curve.png, summary.csv and report.md in {out}")
