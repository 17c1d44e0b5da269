"""`beitdomain ablation`: the paper's ablations (masking, target) on your own images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from beitdomain.cli import options as opt
from beitdomain.cli.common import handle_errors, load_job, run_job
from beitdomain.cli.output import print_efficiency

app = typer.Typer()


@dataclass(frozen=True)
class AblationRunFlags(opt.RunFlags):
    """The run flags, where --overwrite starts only the curve over."""

    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Start the curve over (its cells are deleted); finished pre-training runs "
            "are kept and reused.",
        ),
    ] = False


def parse_pretrained(values: list[str]) -> dict[str, str]:
    """`NAME=RUN` -> {NAME: RUN}."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(
                f"--pretrained {v!r}: expected VARIANT=RUN, e.g. beit=runs/pre"
            )
        out[name] = path
    return out


@app.command()
@handle_errors
@opt.grouped
def ablation(
    ctx: typer.Context,
    variants: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated variants (default: all): beit (blockwise masking, visual "
            "tokens), random-mask (uniform random masking), pixels (regress raw pixels, the "
            "paper's), pixels-norm (regress per-patch normalized pixels, MAE's).",
        ),
    ] = None,
    pretrained: Annotated[
        list[str] | None,
        typer.Option(
            help="Repeatable VARIANT=RUN: a finished pre-training run to use for that variant "
            "instead of pre-training it again (its masking and target are checked). "
            "E.g. --pretrained beit=runs/demo/pretrain",
        ),
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(help="Trained tokenizer folder for the token variants (sets tokenizer.path)."),
    ] = None,
    scratch: Annotated[
        bool,
        typer.Option(
            "--scratch/--no-scratch", help="Also fine-tune a randomly initialised backbone."
        ),
    ] = True,
    fractions: Annotated[
        str | None, typer.Option(help="Comma-separated label amounts, e.g. 1%,10%.")
    ] = None,
    seeds: opt.SeedsOpt = None,
    recipe: opt.RecipeOpt = None,
    data: opt.DataFlags = opt.offers(),
    run: AblationRunFlags = opt.offers("sets", "out", "overwrite"),
    trust_pickle: opt.TrustPickleOpt = False,
) -> None:
    """Re-run BEiT's ablations on your images: blockwise vs random masking, tokens vs pixels.

    Pre-trains one variant per choice with your recipe (only the masking or the target
    changes), then fine-tunes every variant at the same label fractions and seeds, beside a
    from-scratch arm and the classical baselines, in one curve: curve/report.md says which
    variant pays on your data and by how much. Every pre-trained variant fine-tunes with the
    recipe's settings for its pre-trained arm (curve.init_sets.domain) unless the recipe gives
    the variant its own. Re-running continues: finished pre-training runs and cells are skipped.

    Cost: one pre-training per variant (four by default) plus the curve's fine-tunes for each.

    Examples:

        beitdomain ablation -r elpv-cpu --cache runs/demo/cache --tokenizer runs/demo/tokenizer
            --pretrained beit=runs/demo/pretrain --fractions 1%,10% --out runs/ablation

        beitdomain ablation -r my-recipe --variants pixels,pixels-norm --no-scratch
    """
    r, out = load_job(
        ctx,
        "ablation",
        recipe,
        run,
        {
            **data.options(),
            "tokenizer.path": str(tokenizer) if tokenizer else None,
            **opt.curve_options(fractions, seeds),
        },
    )
    from beitdomain.engine.ablation import parse_variants, run_ablation

    result = run_job(
        ctx,
        run_ablation,
        r,
        out,
        variants=parse_variants(variants),
        pretrained=parse_pretrained(pretrained) if pretrained else None,
        scratch=scratch,
        overwrite=run.overwrite,
        trust_pickle=trust_pickle,
    )
    print_efficiency(out, result, f"report.md and curve.png in {Path(out) / 'curve'}")
