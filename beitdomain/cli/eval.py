"""`beitdomain eval knn|probe RUN`: are the frozen features any good, before fine-tuning?"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from beitdomain.cli import options as opt
from beitdomain.cli.common import global_options, handle_errors, load

app = typer.Typer(
    help="Check frozen features: k-NN and linear probe on the labelled splits.",
    no_args_is_help=True,
)

RunArg = Annotated[
    Path,
    typer.Argument(
        help="A pretrain run, a finetune run or an exported backbone.safetensors.",
    ),
]
DataRecipeOpt = Annotated[
    str | None,
    typer.Option(
        "--recipe",
        "-r",
        help="Recipe for the data (default: the run's own recipe.yaml).",
    ),
]
BaselineOpt = Annotated[
    bool,
    typer.Option(
        "--baseline/--no-baseline",
        help="Also score a random backbone of the same shape, the reference to read against.",
    ),
]
ScoresOutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Write the scores as JSON.")]


@dataclass(frozen=True)
class ScoringFlags:
    """What k-NN and the linear probe score on (the data, the labels) and where it goes."""

    recipe: DataRecipeOpt = None
    data: opt.DataOpt = None
    cache: opt.CacheOpt = None
    labels_csv: opt.LabelsCsvOpt = None
    labels: opt.LabelsAmountOpt = None
    baseline: BaselineOpt = True
    sets: opt.SetOpt = None
    out: ScoresOutOpt = None


def _run(
    ctx: typer.Context, method: str, run: Path, flags: ScoringFlags, k: int = 20, c: float = 0.1
) -> None:
    from beitdomain.cli.output import json_requested, print_json
    from beitdomain.engine.represent import load_backbone
    from beitdomain.engine.represent_eval import evaluate_representation
    from beitdomain.fileio import atomic_write_json

    g = global_options(ctx)
    bb = load_backbone(run, device=g.device)
    recipe = flags.recipe
    if recipe is None and bb.recipe is not None:
        recipe = str(Path(bb.source).parent / "recipe.yaml")
    options = opt.DataFlags(flags.data, flags.cache, flags.labels_csv).options()
    r = load(ctx, recipe, flags.sets, {**options, "finetune.labels": flags.labels or "100%"})
    res = evaluate_representation(
        bb, r, (method,), baseline=flags.baseline, k=k, c=c, progress=not g.quiet
    )
    out = flags.out
    if out is not None:
        atomic_write_json(out, res)
    if json_requested():
        print_json(res)
        return
    _print_scores(method, res, out)


def _print_scores(method: str, res: dict, out: Path | None) -> None:
    import sys

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    name = {"knn": "k-NN", "probe": "linear probe"}[method]
    table = Table(
        title=f"{name} on frozen features: {res['n_train']} training labels ({res['labels']}), "
        f"{res['n_test']} {res['split_scored']} images",
        title_justify="left",
    )
    for col in ("backbone", "balanced accuracy", "accuracy", "macro-F1", "AUROC"):
        table.add_column(col)
    scores = res["methods"][method]
    for arm, m in scores.items():
        label = escape(res["source"]) if arm == "backbone" else "random (same shape)"
        table.add_row(
            label,
            *(
                "-" if m.get(k) is None else f"{100 * m[k]:.1f}%"
                for k in ("balanced_accuracy", "accuracy", "macro_f1", "auroc")
            ),
        )
    console = Console(file=sys.stdout, highlight=False)
    console.print(table)
    ba = scores["backbone"]["balanced_accuracy"]
    chance = scores["backbone"]["chance_balanced_accuracy"]
    if ba <= chance + 0.02:
        console.print(
            f"[yellow]at chance level[/] ({100 * chance:.0f}% balanced accuracy for "
            f"{len(res['classes'])} classes): these features do not separate the classes yet"
        )
    elif "random" in scores:
        gain = ba - scores["random"]["balanced_accuracy"]
        console.print(f"{method}: {100 * gain:+.1f} points of balanced accuracy over random")
    if out is not None:
        console.print(f"scores written to {out}")


@app.command()
@handle_errors
@opt.grouped
def knn(
    ctx: typer.Context,
    run: RunArg,
    k: Annotated[int, typer.Option("--k", help="Neighbours (cosine similarity, weighted).")] = 20,
    flags: ScoringFlags = opt.offers(),
) -> None:
    """k-NN classification of the test split on frozen features of the training labels.

    The splits and label subsets are fine-tuning's, so the numbers read against
    `beitdomain finetune`. A random backbone of the same shape is scored beside it.

    Examples:

        beitdomain eval knn runs/pre --data /data/cells

        beitdomain eval knn runs/pre --labels-csv labels.csv --labels 10% --out knn.json
    """
    _run(ctx, "knn", run, flags, k=k)


@app.command()
@handle_errors
@opt.grouped
def probe(
    ctx: typer.Context,
    run: RunArg,
    c: Annotated[
        float, typer.Option("--c", help="Inverse L2 strength of the logistic regression.")
    ] = 0.1,
    flags: ScoringFlags = opt.offers(),
) -> None:
    """Linear probe: a logistic regression on frozen features, scored on the test split.

    Examples:

        beitdomain eval probe runs/pre --data /data/cells --labels 1%

        beitdomain --json eval probe runs/pre/backbone.safetensors -r my-recipe
    """
    _run(ctx, "probe", run, flags, c=c)
