"""Options whose meaning is the same in every command that has them.

One meaning per flag: `--labels-csv FILE` is the label CSV everywhere (`data scan`, `data
cache`, `finetune`, `curve`, `eval`, `pretrain`); `--labels AMOUNT` is how many training labels
to use (`finetune`, `eval`). A spelling that meant something else before stays as a hidden
alias that still works and says what to type instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

log = logging.getLogger("beitdomain.cli")

LabelsCsvOpt = Annotated[
    Path | None,
    typer.Option(
        "--labels-csv",
        help="Label CSV: path,label[,split], paths relative to the data folder (data.labels).",
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
