"""Options whose meaning is the same in every command that has them.

One meaning per flag: `--labels-csv FILE` is the label CSV everywhere (`data scan`, `data
cache`, `finetune`, `curve`, `eval`, `pretrain`); `--labels AMOUNT` is how many training labels
to use (`finetune`, `eval`). A spelling that meant something else before stays as a hidden
alias that still works and says what to type instead.

Each is declared once here and used as a parameter's type (`recipe: opt.RecipeOpt = None`). A
default of None means "not given": the recipe's value stands. A command whose flag means
something narrower (`eval --recipe`, `data scan --on-error`) declares its own beside it.

Flags that travel together (the data section, a job's train section, the run folder) are also
declared once as a group: a dataclass whose fields are the flags, taken by a command as one
parameter (`data: opt.DataFlags = opt.offers("data", "cache")`) under `@opt.grouped`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

log = logging.getLogger("beitdomain.cli")
F = TypeVar("F", bound=Callable[..., Any])

# The recipe and its overrides: every job command has them (the run folder: `RunFlags`).
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
TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow pickle-based weight files (loading them can run code: trusted files only).",
    ),
]

# The recipe's data section (`DataFlags` groups them).
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


# --------------------------------------------------------------------------------------------
# Groups of flags
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Offered:
    names: tuple[str, ...]
    defaults: dict[str, Any]


def offers(*names: str, **defaults: Any) -> Any:
    """The default of a group parameter: which of the group's flags the command has, in the
    order its --help lists them (none named: all, in the group's order), and any default of
    the command's own (`data scan` shows `--normalize auto`, `data cache` none)."""
    return _Offered(names, defaults)


def grouped(fn: F) -> F:
    """Lets a command take a flag group (a dataclass of options) as one parameter.

    Typer sees the group's fields as ordinary parameters in place of the group's parameter;
    the command receives the group, built from their values. The flags, their help and their
    order in --help are those of the fields.
    """
    sig = inspect.signature(fn, eval_str=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, tuple[type, tuple[str, ...]]] = {}
    for p in sig.parameters.values():
        if not isinstance(p.default, _Offered):
            params.append(p)
            continue
        group = p.annotation
        fields = {f.name: f for f in dataclasses.fields(group)}
        types = typing.get_type_hints(group, include_extras=True)
        names = p.default.names or tuple(fields)
        for name in names:
            default = p.default.defaults.get(name, fields[name].default)
            params.append(inspect.Parameter(name, p.kind, default=default, annotation=types[name]))
        groups[p.name] = (group, names)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for name, (group, names) in groups.items():
            kwargs[name] = group(**{n: kwargs.pop(n) for n in names})
        return fn(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    wrapper.__annotations__["return"] = sig.return_annotation
    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class DataFlags:
    """The recipe's data section as flags; `options()` turns them into recipe keys."""

    data: DataOpt = None
    cache: CacheOpt = None
    labels_csv: LabelsCsvOpt = None
    on_error: OnErrorOpt = None
    nonfinite: NonfiniteOpt = None
    transductive: TransductiveOpt = False

    def options(self, **apart: Any) -> dict[str, Any]:
        """The recipe's `data.*` keys the flags set; None leaves the recipe's value.

        `apart`: the values of the group's flags that a command lists elsewhere in its --help
        (`pretrain` has --knn-every between them).
        """
        d = dataclasses.replace(self, **apart)
        return {
            "data.root": str(d.data) if d.data else None,
            "data.cache": str(d.cache) if d.cache else None,
            "data.labels": str(d.labels_csv) if d.labels_csv else None,
            "data.on_error": d.on_error,
            "data.nonfinite": d.nonfinite,
            "data.transductive": True if d.transductive else None,
        }


@dataclass(frozen=True)
class TrainFlags:
    """A job's train section as flags; `options(job)` turns them into recipe keys."""

    steps: Annotated[
        int | None, typer.Option("--steps", help="Optimizer steps (overrides epochs).")
    ] = None
    epochs: Annotated[float | None, typer.Option("--epochs", help="Epochs over the data.")] = None
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", "-b", help="Images per step, per process.")
    ] = None

    def options(self, job: str) -> dict[str, Any]:
        """The recipe's `<job>.train.*` keys that --steps, --epochs and --batch-size set."""
        return {
            f"{job}.train.steps": self.steps,
            f"{job}.train.epochs": self.epochs,
            f"{job}.train.batch_size": self.batch_size,
        }


@dataclass(frozen=True)
class RunFlags:
    """The recipe overrides and the run folder: what a job command starts from."""

    sets: SetOpt = None
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Run folder (default: runs/<recipe name>-<command>)."),
    ] = None
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out (a run of this command) from its newest checkpoint.",
        ),
    ] = False
    resume_other_data: Annotated[
        bool,
        typer.Option(
            "--resume-other-data",
            help="With --resume: go on although the data differ from what the run's "
            "checkpoints trained on (a warning; the manifest keeps both data fingerprints).",
        ),
    ] = False
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Delete the files the previous run in --out wrote and start over (refused "
            "when the folder holds anything else).",
        ),
    ] = False

    def resuming(self) -> dict[str, bool]:
        """The job options --resume and --resume-other-data set.

        Raises:
            typer.BadParameter: --resume-other-data without --resume.
        """
        if self.resume_other_data and not self.resume:
            raise typer.BadParameter("--resume-other-data applies only with --resume")
        return {"resume": self.resume, "resume_other_data": self.resume_other_data}
