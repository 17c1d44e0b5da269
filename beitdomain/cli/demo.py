"""`beitdomain demo`: the whole chain on real solar-cell images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from beitdomain.cli import options as opt
from beitdomain.cli.common import console, global_options, handle_errors, load, run_job
from beitdomain.cli.output import print_efficiency

app = typer.Typer()


@app.command()
@handle_errors
def demo(
    ctx: typer.Context,
    recipe: opt.RecipeOpt = None,
    transductive: opt.TransductiveOpt = False,
    sets: opt.SetOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for every stage.")] = Path(
        "runs/demo"
    ),
) -> None:
    """Run the whole chain on 2,624 electroluminescence images of solar cells (ELPV).

    Exports the images to an ordinary folder, caches them, trains a domain tokenizer,
    pre-trains BEiT without labels on every image but the test split's (--transductive: on
    those too), then fine-tunes at 1%, 10% and 100% of the training labels from the
    pre-trained backbone, from scratch and as a CNN from random weights (resnet10t), beside
    logistic-regression baselines, probes each pre-training checkpoint to show whether a
    longer run would pay, and writes report.md, curve.png and pretrain_length.png. The CPU
    recipe (elpv-cpu) took 13 minutes on a 2-core EPYC without AMX (two curve cells at a
    time; 11 and a half before the CNN arm); fp32 takes about 1.75 times as long. Its longer
    twin, elpv-cpu-128 (128 px, 8 px patches), took 58 minutes and keeps twice the detail.
    With a GPU the GPU recipe (elpv-gpu: ViT-B/16 at 224 px) is used unless --recipe says
    otherwise.
    Re-running skips finished stages and resumes an interrupted one.

    Needs the images:  pip install -e ".[demo]"

    Examples:

        beitdomain demo

        beitdomain demo --recipe elpv-cpu-128 --out runs/demo128

        beitdomain demo --recipe elpv-gpu --out runs/demo-gpu

        beitdomain --device cpu demo --set curve.seeds=[0]
    """
    import torch

    from beitdomain.engine.demo import elpv_folder, run_demo

    elpv_folder()  # a missing package is reported before anything else happens
    g = global_options(ctx)
    if recipe is None:
        on_gpu = g.device.startswith("cuda") or (g.device == "auto" and torch.cuda.is_available())
        recipe = "elpv-gpu" if on_gpu else "elpv-cpu"
    r = load(ctx, recipe, sets, opt.DataFlags(transductive=transductive).options())
    console.print(f"beitdomain demo: recipe {recipe}, output in {out}")
    try:
        result = run_job(ctx, run_demo, r, out)
    except KeyboardInterrupt:  # a stage's advice names --resume, which demo does not need
        raise KeyboardInterrupt(
            "demo interrupted; run the same `beitdomain demo` command again: finished stages "
            "are skipped and the interrupted one resumes from its checkpoint"
        ) from None
    print_efficiency(out, result, f"report: {out / 'report.md'}   plot: {out / 'curve.png'}")
