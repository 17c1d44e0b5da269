"""Options whose meaning is the same in every command that has them.

One meaning per flag: `--labels-csv FILE` is the label CSV everywhere (`data scan`, `data
cache`, `finetune`, `curve`, `eval`, `pretrain`); `--labels AMOUNT` is how many training labels
to use (`finetune`, `eval`). A spelling that meant something else before stays as a hidden
alias that still works and says what to type instead.

Each is declared once here and used as a parameter's type (`recipe: opt.RecipeOpt = None`). A
default of None means "not given": the recipe's value stands. A command whose flag means
something narrower (`eval --recipe`, `data scan --on-error`) declares its own beside it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

log = logging.getLogger("beitdomain.cli")

# The recipe and the run folder: every job command has them.
RecipeOpt = Annotated[
    str | None,
    typer.Option(
        "--recipe",
        "-r",
        help="Recipe YAML file, or the name of a shipped one (e.g. elpv-cpu). "
        "Precedence: defaults < extends < recipe < options < --set.",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override any recipe value, repeatable: --set pretrain.optim.lr=3e-4 "
        "--set finetune.train.steps=500.",
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Run folder (default: runs/<recipe name>-<command>)."),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue the run in --out (a run of this command) from its newest checkpoint.",
    ),
]
ResumeOtherDataOpt = Annotated[
    bool,
    typer.Option(
        "--resume-other-data",
        help="With --resume: go on although the data differ from what the run's checkpoints "
        "trained on (a warning; the manifest keeps both data fingerprints).",
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Delete the files the previous run in --out wrote and start over (refused when "
        "the folder holds anything else).",
    ),
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow pickle-based weight files (loading them can run code: trusted files only).",
    ),
]

# The recipe's data section (`data_options` turns them into recipe keys).
DataOpt = Annotated[
    Path | None,
    typer.Option("--data", "-d", help="Folder of images (sets data.root); labels from subfolders."),
]
CacheOpt = Annotated[
    Path | None,
    typer.Option("--cache", help="Cache folder from `beitdomain data cache` (sets data.cache)."),
]
LabelsCsvOpt = Annotated[
    Path | None,
    typer.Option(
        "--labels-csv",
        help="Label CSV: path,label[,split], paths relative to the data folder (data.labels).",
    ),
]
SelectionOpt = Annotated[
    str | None,
    typer.Option(
        "--selection",
        help="What picks the checkpoint and lr (finetune.selection): none (default: a fixed "
        "schedule, the final weights; labels stay within the budget), carve (a fifth of the "
        "label subset validates), outside (the split's validation images: labels beyond the "
        "budget, said in the report).",
    ),
]
LabelsAmountOpt = Annotated[
    str | None,
    typer.Option(
        "--labels",
        "-l",
        help="How many training labels to use: 1% | 0.01 | 200 | 5/class. Subsets are "
        "stratified and nested for a seed (1% inside 10%).",
    ),
]
OnErrorOpt = Annotated[
    str | None,
    typer.Option(
        "--on-error",
        help="Unreadable images: fail (list them all and stop) or skip (quarantine report "
        "and go on); sets data.on_error.",
    ),
]
NonfiniteOpt = Annotated[
    str | None,
    typer.Option(
        "--nonfinite", help="NaN/Inf in float images: error or zero (sets data.nonfinite)."
    ),
]
TransductiveOpt = Annotated[
    bool,
    typer.Option(
        "--transductive",
        help="Also use the test split's images (sets data.transductive; by default they are "
        "left out, since every fine-tune is scored on them).",
    ),
]

# A job's train section (`train_options` turns them into recipe keys).
StepsOpt = Annotated[
    int | None, typer.Option("--steps", help="Optimizer steps (overrides epochs).")
]
EpochsOpt = Annotated[float | None, typer.Option("--epochs", help="Epochs over the data.")]
BatchOpt = Annotated[
    int | None, typer.Option("--batch-size", "-b", help="Images per step, per process.")
]

# A curve's grid (`curve`, `ablation`; `curve_options` turns them into recipe keys).
SeedsOpt = Annotated[
    str | None,
    typer.Option(
        "--seeds",
        help="Comma-separated seeds every cell runs, e.g. 0,1,2 (0: seed 0 only); replaces the "
        "recipe's curve.seeds and curve.fraction_seeds.",
    ),
]


def deprecated(old: str, new: str, old_value: Any, new_value: Any, why: str = "") -> Any:
    """The value of `new`, or of the deprecated spelling `old` with a warning saying what to use.

    Raises:
        typer.BadParameter: both spellings given with different values.
    """
    if old_value is None:
        return new_value
    if new_value is not None and new_value != old_value:
        raise typer.BadParameter(f"{old} is the old spelling of {new}; give only {new}")
    log.warning("%s is deprecated here: use %s%s", old, new, f" ({why})" if why else "")
    return old_value


def resume_options(resume: bool, resume_other_data: bool) -> dict[str, bool]:
    """The job options --resume and --resume-other-data set.

    Raises:
        typer.BadParameter: --resume-other-data without --resume.
    """
    if resume_other_data and not resume:
        raise typer.BadParameter("--resume-other-data applies only with --resume")
    return {"resume": resume, "resume_other_data": resume_other_data}


def data_options(
    data: Path | None = None,
    cache: Path | None = None,
    labels_csv: Path | None = None,
    on_error: str | None = None,
    nonfinite: str | None = None,
    transductive: bool = False,
) -> dict[str, Any]:
    """The recipe's `data.*` keys the data flags set; None leaves the recipe's value."""
    return {
        "data.root": str(data) if data else None,
        "data.cache": str(cache) if cache else None,
        "data.labels": str(labels_csv) if labels_csv else None,
        "data.on_error": on_error,
        "data.nonfinite": nonfinite,
        "data.transductive": True if transductive else None,
    }


def train_options(
    job: str, steps: int | None, epochs: float | None, batch_size: int | None
) -> dict[str, Any]:
    """The recipe's `<job>.train.*` keys that --steps, --epochs and --batch-size set."""
    return {
        f"{job}.train.steps": steps,
        f"{job}.train.epochs": epochs,
        f"{job}.train.batch_size": batch_size,
    }


def curve_options(fractions: str | None, seeds: str | None) -> dict[str, Any]:
    """The recipe's `curve.fractions` and `curve.seeds` that --fractions and --seeds set.

    --seeds names the seeds of every cell, so it also clears the recipe's per-fraction seeds
    (`curve.fraction_seeds`): `--seeds 0,1,2` runs three seeds at 1% too.
    """
    return {
        "curve.fractions": [f.strip() for f in fractions.split(",")] if fractions else None,
        "curve.seeds": parse_seeds(seeds) if seeds is not None else None,
        "curve.fraction_seeds": {} if seeds is not None else None,
    }


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` -> [0, 1, 2]; one number is that one seed."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise typer.BadParameter(f"--seeds {text!r}: expected seeds >= 0 like 0,1,2")
    return seeds
