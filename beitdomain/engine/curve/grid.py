"""The cells of a label-efficiency curve: `Cell(init, labels, seed)` values of a `CurveGrid`
parsed once from the `curve` settings, each with the folder under `cells/` it runs in.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from beitdomain.config import CurveConfig
from beitdomain.labels import LabelSpec, parse_labels_spec
from beitdomain.user import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    """One fine-tune of the grid: an initialization (by name), a label amount and a seed."""

    init: str
    labels: LabelSpec
    seed: int

    @property
    def name(self) -> str:
        """Its folder under `cells/`."""
        return cell_name(self.init, self.labels, self.seed)


@dataclass(frozen=True)
class CurveGrid:
    """The cells of a curve, from `curve` settings parsed once.

    Label amounts are `LabelSpec`s, so '10%' and '0.1' are the same fraction everywhere (in
    `curve.fractions` and as `curve.fraction_seeds` keys).
    """

    inits: dict[str, str | None]  # name -> resolved weights (None: random initialization)
    fractions: tuple[LabelSpec, ...]
    seeds: dict[LabelSpec, tuple[int, ...]]  # the seeds each fraction runs
    # what every cell fine-tunes (`finetune.task`): a classifier, or a segmenter scored in Dice
    task: str = "classify"

    def cells(self) -> list[Cell]:
        return [Cell(i, f, s) for i in self.inits for f in self.fractions for s in self.seeds[f]]

    def is_first_seed(self, cell: Cell) -> bool:
        """The first seed of its (initialization, fraction): where a 'first' lr grid runs."""
        return cell.seed == self.seeds[cell.labels][0]


def cell_name(init: str, labels: str | LabelSpec, seed: int) -> str:
    text = labels.text if isinstance(labels, LabelSpec) else labels
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("%", "pct").replace("/", "per"))
    return f"{init}-{safe}-s{seed}"


def parse_grid(c: CurveConfig, inits: dict[str, str | None], task: str = "classify") -> CurveGrid:
    """Parses every label amount before any cell runs (a bad one fails the whole grid now).
    `task`: `finetune.task` of every cell.

    Raises:
        LabelSubsetError: a label amount that is not one of the accepted forms.
        UserError: a fraction listed twice, or no fractions or seeds.
    """
    fractions: list[LabelSpec] = []
    for text in c.fractions:
        spec = parse_labels_spec(text)
        if spec in fractions:
            same = fractions[fractions.index(spec)].text
            raise UserError(f"curve.fractions lists one amount twice: {same!r} and {text!r}")
        fractions.append(spec)
    if not fractions or not c.seeds:
        raise UserError("curve.fractions and curve.seeds must each name at least one value")
    extra = {parse_labels_spec(k): list(v) for k, v in c.fraction_seeds.items()}
    stray = sorted(spec.text for spec in extra if spec not in fractions)
    if stray:  # a recipe's extra 1% seeds must not block `--fractions 10%,100%`
        log.warning(
            "curve.fraction_seeds names %s, which are not among curve.fractions %s: those "
            "seeds are not used",
            stray,
            list(c.fractions),
        )
    seeds = {f: tuple(extra.get(f) or c.seeds) for f in fractions}
    return CurveGrid(dict(inits), tuple(fractions), seeds, task)
