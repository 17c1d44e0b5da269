"""The `--labels` syntax: '1%', '0.01', '200' or '5/class', parsed into a `LabelSpec`.

Below config and data, so that a recipe's `finetune.labels`, `curve.fractions` and the keys of
`curve.fraction_seeds` are checked when the recipe loads (a typo fails in under a second), and
the label subsets in data/splits.py read the same parsed value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from beitdomain.user import UserError

LABELS_FORMS = (
    "a percentage ('1%'), a fraction in (0, 1] ('0.01'), a count of images ('200') "
    "or a count per class ('5/class')"
)


class LabelSubsetError(UserError):
    """A `--labels` request or a split that cannot be met by the labelled data."""


# --------------------------------------------------------------------------------------------
# --labels syntax
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelSpec:
    """A parsed `--labels` value.

    Attributes:
        kind: 'fraction' (from '1%' or '0.01'), 'count' ('200') or 'per_class' ('5/class').
        value: the fraction in (0, 1], or the count (>= 1).
        text: what the user wrote, for messages and the run folder.
    """

    kind: Literal["fraction", "count", "per_class"]
    value: float | int
    text: str = field(compare=False)  # '10%' and '0.1' are the same request

    @property
    def fraction(self) -> float | None:
        """The requested fraction of the train split, or None for counts."""
        return float(self.value) if self.kind == "fraction" else None


_PER_CLASS = re.compile(r"^(\d+)\s*/\s*class$", re.IGNORECASE)
_PERCENT = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*%$")
_INT = re.compile(r"^\d+$")
_FLOAT = re.compile(r"^(\d+\.\d*|\.\d+|\d+(?:\.\d*)?[eE][-+]?\d+)$")


def parse_labels_spec(spec: str | LabelSpec) -> LabelSpec:
    """Parses a `--labels` value: '1%', '0.01', '200' or '5/class'.

    A whole number without '%' is a count ('1' is one image); write '1.0' or '100%' for all.

    Raises:
        LabelSubsetError: for anything else; the message lists the four accepted forms.
    """
    if isinstance(spec, LabelSpec):
        return spec
    text = str(spec).strip()

    def bad(why: str) -> LabelSubsetError:
        return LabelSubsetError(f"labels {spec!r}: {why}. Use {LABELS_FORMS}.")

    if m := _PER_CLASS.match(text):
        n = int(m.group(1))
        if n < 1:
            raise bad("a per-class count must be at least 1")
        return LabelSpec("per_class", n, text)
    if m := _PERCENT.match(text):
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise bad("a percentage must be in (0%, 100%]")
        return LabelSpec("fraction", round(pct / 100.0, 12), text)  # 33.3% == 0.333
    if _INT.match(text):
        n = int(text)
        if n < 1:
            raise bad("a count must be at least 1")
        return LabelSpec("count", n, text)
    if _FLOAT.match(text):
        f = float(text)
        if not 0 < f <= 1:
            raise bad("a fraction must be in (0, 1]; for a percentage add '%'")
        return LabelSpec("fraction", f, text)
    raise bad("not a recognised form")
