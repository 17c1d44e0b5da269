"""Label-efficiency tables and the plain-words report of a `beitdomain curve` run.

A curve is a grid of fine-tunes (initialization x labelled fraction x seed). This module turns the
per-run rows into mean ± std per cell (`summarize`), answers the question the curve exists for
(`label_efficiency`: with what share of the labels does the pre-trained model match the
from-scratch model trained on all of them?) and writes `curve.csv`, `summary.csv` and `report.md`.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from beitdomain.fileio import atomic_write_text
from beitdomain.user import UserError

# Columns that identify a run or a cell rather than measure it.
ID_COLUMNS = ("init", "fraction", "seed", "n_labels", "labels", "lr")  # settings, not metrics
# Tolerance for "matches": means of the same numbers can differ in the last bits.
_TIE_EPS = 1e-9

METRIC_NAMES = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro-F1",
    "auroc": "AUROC",
    "mean_dice": "foreground-mean Dice",  # a segmentation curve's (engine/curve)
    "mean_iou": "foreground-mean IoU",
}
SEGMENT_METRICS = ("mean_dice", "mean_iou")


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Writes dict rows to CSV atomically; columns in order of first appearance, None -> ''."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def _parse_cell(text: str) -> Any:
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Reads a CSV written by `write_csv`: numbers become int/float, empty cells None."""
    with open(path, newline="") as f:
        return [{k: _parse_cell(v) for k, v in row.items()} for row in csv.DictReader(f)]


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _number(v: Any) -> float | None:
    """A float for numbers and numeric strings; None for missing values and NaN."""
    if v is None or isinstance(v, bool) or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _metric_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Columns whose every non-missing value is a number, in order of first appearance."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns and k not in ID_COLUMNS)
    numeric = []
    for c in columns:
        values = [r.get(c) for r in rows if r.get(c) not in (None, "")]
        if values and all(_is_numeric(v) for v in values):
            numeric.append(c)
    return numeric


def _is_numeric(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds for every (init, fraction) cell and every numeric column.

    Args:
        rows: one dict per finished run with at least `init` and `fraction` (in (0, 1]), usually
            `seed`, `n_labels` and metrics (`accuracy`, `balanced_accuracy`, ...). Rows read back
            from CSV (strings) work too.

    Returns:
        One row per cell, sorted by init then fraction: init, fraction, n_runs, n_labels (mean
        over runs; identical across seeds for nested subsets), and for every metric `m`:
        `m_mean` and `m_std` (sample std, ddof=1; None with a single run or no values). Missing
        metric values (e.g. an undefined AUROC) are left out of that metric's mean.
    """
    metrics = _metric_columns(rows)
    cells: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for row in rows:
        frac = _number(row.get("fraction"))
        if frac is None or "init" not in row:
            raise ValueError(f"a curve row needs 'init' and a numeric 'fraction': {dict(row)}")
        cells.setdefault((str(row["init"]), frac), []).append(row)
    out = []
    for (init, frac), group in sorted(cells.items()):
        n_labels = [x for x in (_number(r.get("n_labels")) for r in group) if x is not None]
        mean_labels = statistics.fmean(n_labels) if n_labels else None
        summary: dict[str, Any] = {
            "init": init,
            "fraction": frac,
            "n_runs": len(group),
            "n_labels": (
                int(mean_labels)
                if mean_labels is not None and float(mean_labels).is_integer()
                else mean_labels
            ),
        }
        for m in metrics:
            values = [x for x in (_number(r.get(m)) for r in group) if x is not None]
            summary[f"{m}_mean"] = statistics.fmean(values) if values else None
            summary[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(summary)
    return out


# --------------------------------------------------------------------------------------------
# Label efficiency
# --------------------------------------------------------------------------------------------


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"  # the realised fraction: 18 of 1,771 labels -> 1.02%


def _cells(summary: Iterable[Mapping[str, Any]], init: str, metric: str) -> dict[float, dict]:
    """fraction -> {'mean', 'std', 'n_labels'} for one init, skipping cells without a mean."""
    out = {}
    for row in summary:
        if str(row.get("init")) != init:
            continue
        mean = _number(row.get(f"{metric}_mean"))
        frac = _number(row.get("fraction"))
        if mean is None or frac is None:
            continue
        out[frac] = {
            "mean": mean,
            "std": _number(row.get(f"{metric}_std")),
            "n_labels": _number(row.get("n_labels")),
        }
    return dict(sorted(out.items()))


def label_efficiency(
    summary: Sequence[Mapping[str, Any]],
    metric: str,
    reference_init: str = "scratch",
    pretrained_init: str | None = None,
) -> dict[str, Any]:
    """How many labels pre-training saves: the label-efficiency factor and the gain per fraction.

    The factor is 1 / f for the smallest labelled fraction f at which the pre-trained model's
    mean matches or beats (ties count) the mean of `reference_init` trained on 100% of the
    labels: matching at 10% means "10× fewer labels". If it never does, the factor is None and
    the statement says so.

    Args:
        summary: rows from `summarize`.
        metric: the metric compared ('balanced_accuracy', 'accuracy', 'auroc', 'macro_f1').
        reference_init: the from-scratch initialization.
        pretrained_init: the pre-trained initialization; None: the only init that is not the
            reference.

    Returns:
        {metric, reference_init, pretrained_init, reference_value (reference mean at 100%, or
        None), matching_fraction, matching_n_labels, factor, statement (one sentence),
        gains: [{fraction, n_labels, pretrained_mean, reference_mean, gain_points}]} where
        gain_points = 100 × (pretrained − reference) at the same fraction (None where the
        reference lacks that fraction).

    Raises:
        UserError: when the init names are not in the summary or `pretrained_init` is ambiguous.
    """
    inits = sorted({str(r.get("init")) for r in summary})
    others = [i for i in inits if i != reference_init]
    if pretrained_init is None:
        if len(others) != 1:
            raise UserError(
                f"which initialization is the pre-trained one? The summary has {inits} besides "
                f"the reference '{reference_init}'; pass pretrained_init"
            )
        pretrained_init = others[0]
    if pretrained_init not in inits:
        raise UserError(
            f"initialization '{pretrained_init}' is not in the summary (it has: {', '.join(inits)})"
        )
    name = METRIC_NAMES.get(metric, metric)
    pre = _cells(summary, pretrained_init, metric)
    ref = _cells(summary, reference_init, metric)
    if not pre:
        raise UserError(f"no '{metric}' values for initialization '{pretrained_init}'")

    gains = []
    for frac, cell in pre.items():
        r = ref.get(frac)
        gains.append(
            {
                "fraction": frac,
                "n_labels": cell["n_labels"],
                "pretrained_mean": cell["mean"],
                "reference_mean": None if r is None else r["mean"],
                "gain_points": None if r is None else 100.0 * (cell["mean"] - r["mean"]),
            }
        )

    ref_full = next((c for f, c in ref.items() if math.isclose(f, 1.0)), None)
    result: dict[str, Any] = {
        "metric": metric,
        "reference_init": reference_init,
        "pretrained_init": pretrained_init,
        "reference_value": None if ref_full is None else ref_full["mean"],
        "matching_fraction": None,
        "matching_n_labels": None,
        "factor": None,
        "gains": gains,
    }
    if ref_full is None:
        result["statement"] = (
            f"The label-efficiency factor cannot be computed: '{reference_init}' was not trained "
            "on 100% of the labels, so there is no reference to match."
        )
        return result
    target = ref_full["mean"]
    match = next((f for f, c in pre.items() if c["mean"] >= target - _TIE_EPS), None)
    if match is None:
        best_f, best = max(pre.items(), key=lambda fc: fc[1]["mean"])
        result["statement"] = (
            f"'{pretrained_init}' does not match '{reference_init}' trained on 100% of the labels "
            f"({name} {target:.3f}) at any labelled fraction tried; its best is "
            f"{best['mean']:.3f} at {_pct(best_f)}. No label-efficiency factor: pre-training "
            "did not save labels on this data by this measure."
        )
        return result
    factor = 1.0 / match
    n_match = pre[match]["n_labels"]
    images = f" ({n_match:g} images)" if n_match is not None else ""
    result.update(matching_fraction=match, matching_n_labels=n_match, factor=factor)
    if math.isclose(match, 1.0):
        saving = "no fewer labels, but at least as good with the same labels"
    else:
        saving = f"{factor:.3g}× fewer labels"
    result["statement"] = (
        f"'{pretrained_init}' matches or beats '{reference_init}' trained on 100% of the labels "
        f"({name} {target:.3f}) with {_pct(match)} of the labels{images}: "
        f"{pre[match]['mean']:.3f} — {saving}. Label-efficiency factor: {factor:.3g}."
        + _margin_caution(pre[match], ref_full)
    )
    return result


def _margin_caution(pre: Mapping[str, Any], ref: Mapping[str, Any]) -> str:
    """A warning when the matching margin is within the seed-to-seed spread of either side."""
    margin = 100.0 * (pre["mean"] - ref["mean"])
    stds = [s for s in (pre.get("std"), ref.get("std")) if s is not None]
    if not stds:
        return (
            " One run per cell, so the seed-to-seed spread is unknown: treat the factor as "
            "tentative and run more seeds."
        )
    spread = 100.0 * max(stds)
    if margin < spread:
        return (
            f" The margin ({margin:+.1f} points) is within the seed-to-seed spread "
            f"(std up to {spread:.1f} points): treat the factor as tentative and run more seeds."
        )
    return ""


# --------------------------------------------------------------------------------------------
# The strongest arm without domain pre-training, and the verdict against it
# --------------------------------------------------------------------------------------------

STRONGEST = "strongest without pre-training"


def strongest_arms(
    summary: Sequence[Mapping[str, Any]], metric: str, arms: Iterable[str]
) -> dict[float, str]:
    """fraction -> the arm among `arms` with the highest mean `metric` at that fraction.

    A pre-trained model is only worth its pre-training if it beats everything a user could do
    without it: training from scratch, a logistic regression on pixels, a probe of a random
    backbone. Which of those is strongest changes with the number of labels, so the reference
    is chosen per fraction.
    """
    arms = set(arms)
    best: dict[float, tuple[float, str]] = {}
    for row in summary:
        name, f = str(row.get("init")), _number(row.get("fraction"))
        mean = _number(row.get(f"{metric}_mean"))
        if name not in arms or f is None or mean is None:
            continue
        if f not in best or mean > best[f][0] + _TIE_EPS:
            best[f] = (mean, name)
    return {f: name for f, (_, name) in sorted(best.items())}


def as_reference(
    rows: Sequence[Mapping[str, Any]], choice: Mapping[float, str]
) -> list[dict[str, Any]]:
    """The rows (runs or summary cells) of each fraction's chosen arm, renamed `STRONGEST` and
    keeping the arm's name in `arm`: a reference `label_efficiency` and `paired_gains` can use."""
    out = []
    for row in rows:
        f = _number(row.get("fraction"))
        if f is not None and choice.get(f) == str(row.get("init")):
            out.append({**row, "init": STRONGEST, "arm": row["init"]})
    return out


def verdict(
    paired: Sequence[Mapping[str, Any]],
    choice: Mapping[float, str],
    pretrained: str,
    metric: str,
    n_labels: Mapping[float, Any] | None = None,
) -> str:
    """One plain sentence: does pre-training pay on this data, fraction by fraction?

    `paired` is `paired_gains(rows, metric, STRONGEST, pretrained)`. A fraction counts as a win
    when the mean paired gain is more than two standard errors above zero, a loss when more
    than two below, and within noise otherwise. A fraction with a single seed has no spread to
    judge by: its sign is reported as one seed's and counts as neither, so "pays" always rests
    on repeated seeds.
    """
    name = METRIC_NAMES.get(metric, metric)
    if not paired:
        return f"No seed of '{pretrained}' pairs with an arm without pre-training: no verdict."
    parts, wins, losses = [], 0, 0
    for g in paired:
        f = g["fraction"]
        n = (n_labels or {}).get(f)
        where = f"{_pct(f)}" + (f" ({_number(n):g} labels)" if _number(n) is not None else "")
        se = g["se"]
        arm = choice.get(f, "?")
        if se is None:
            side = "ahead of" if g["mean"] > 0 else "behind" if g["mean"] < 0 else "level with"
            parts.append(
                f"at {where} {side} {arm} on its one seed ({g['mean']:+.1f} points; one seed "
                "cannot tell a gain from noise)"
            )
            continue
        state = "ahead" if g["mean"] - 2 * se > 0 else "behind" if g["mean"] + 2 * se < 0 else ""
        wins += state == "ahead"
        losses += state == "behind"
        phrase = {"ahead": f"ahead of {arm}", "behind": f"behind {arm}"}.get(
            state, f"within noise of {arm}"
        )
        how = (
            f"{g['mean']:+.1f} ± {se:.1f} points, ahead on {g['ahead']} of {len(g['seeds'])} seeds"
        )
        parts.append(f"at {where} {phrase} ({how})")
    if wins and not losses:
        head = f"Domain pre-training ('{pretrained}') pays on this data"
    elif not wins:
        head = (
            f"Domain pre-training ('{pretrained}') does not pay on this data: it is never "
            "clearly ahead of the strongest arm without it"
        )
    else:
        head = f"Domain pre-training ('{pretrained}') pays only in part on this data"
    return f"{head} ({name}, paired by seed): " + "; ".join(parts) + "."


# --------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------


def paired_gains(
    rows: Sequence[Mapping[str, Any]], metric: str, reference: str, init: str
) -> list[dict[str, Any]]:
    """The gain of `init` over `reference` per fraction, paired by seed.

    A seed fixes the label subset, so both initializations of one seed saw the same labelled
    images; the per-seed differences remove the subset-to-subset spread that dominates with
    few labels, and their standard error says whether the mean gain is beyond noise.

    Returns:
        One dict per fraction both ran with a common seed, by fraction: `fraction`, `seeds`,
        `gains` (points per seed), `mean` (points), `se` (standard error of the mean, None for
        one seed), `ahead` (seeds on which `init` scored higher).
    """
    score: dict[tuple[str, float, int], float] = {}
    for r in rows:
        v, f, seed = _number(r.get(metric)), _number(r.get("fraction")), _number(r.get("seed"))
        if v is not None and f is not None and seed is not None:
            score[(str(r["init"]), f, int(seed))] = v
    out = []
    for f in sorted({k[1] for k in score if k[0] == init}):
        seeds = sorted(
            s for i, ff, s in score if i == init and ff == f and (reference, f, s) in score
        )
        if not seeds:
            continue
        gains = [100 * (score[(init, f, s)] - score[(reference, f, s)]) for s in seeds]
        se = statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else None
        out.append(
            {
                "fraction": f,
                "seeds": seeds,
                "gains": gains,
                "mean": statistics.fmean(gains),
                "se": se,
                "ahead": sum(g > 0 for g in gains),
            }
        )
    return out


def _paired_lines(paired: Mapping[str, Sequence[Mapping[str, Any]]], reference: str) -> list[str]:
    lines = []
    for init, per_fraction in paired.items():
        if not per_fraction:
            continue
        against = {g.get("against") for g in per_fraction}
        name = against.pop() if len(against) == 1 and None not in against else reference
        lines += [
            f"## Paired by seed: {init} vs {name}",
            "",
            "Each seed's two runs saw the same labelled images; the gain is their difference.",
            "",
            "| labelled fraction | seeds | mean gain ± s.e. (points) | ahead on | gain per seed |"
            + (" against |" if any("against" in g for g in per_fraction) else ""),
            "|---|---|---|---|---|" + ("---|" if any("against" in g for g in per_fraction) else ""),
        ]
        for g in per_fraction:
            se = "" if g["se"] is None else f" ± {g['se']:.1f}"
            per_seed = ", ".join(f"{x:+.1f}" for x in g["gains"])
            lines.append(
                f"| {_pct(g['fraction'])} | {len(g['seeds'])} | {g['mean']:+.1f}{se} | "
                f"{g['ahead']} of {len(g['seeds'])} | {per_seed} |"
                + (f" {g['against']} |" if "against" in g else "")
            )
        lines.append("")
    return lines


def _mean_std(mean: Any, std: Any) -> str:
    m = _number(mean)
    if m is None:
        return "–"
    s = _number(std)
    return f"{m:.3f} ± {s:.3f}" if s is not None else f"{m:.3f}"


CHANCE_MARGIN = 0.02  # a mean within 2 points of chance has learned nothing measurable


def chance_level(metric: str, n_classes: int | None) -> float | None:
    """The score of a model that has learned nothing: 1 / K for balanced accuracy, 0.5 for
    AUROC; None where it depends on the class balance (accuracy, macro-F1)."""
    if metric == "balanced_accuracy" and n_classes:
        return 1.0 / n_classes
    if metric == "auroc":
        return 0.5
    return None


def chance_warnings(
    summary: Sequence[Mapping[str, Any]], metric: str, n_classes: int | None
) -> list[str]:
    """Sentences for report.md when models sit at chance level, where a "matches or beats"
    compares two models that learned nothing (both at 0.500 read as a factor of 1)."""
    chance = chance_level(metric, n_classes)
    if chance is None:
        return []
    name = METRIC_NAMES.get(metric, metric)
    at_chance: dict[str, list[float]] = {}
    arms: set[str] = set()
    for row in summary:
        mean, f = _number(row.get(f"{metric}_mean")), _number(row.get("fraction"))
        if mean is None or f is None:
            continue
        arms.add(str(row["init"]))
        if mean <= chance + CHANCE_MARGIN:
            at_chance.setdefault(str(row["init"]), []).append(f)
    if not at_chance:
        return []
    level = f"{name} {chance:.3f}" + (f" for {n_classes} classes" if n_classes else "")
    if set(at_chance) == arms and all(
        len(fs) == sum(1 for r in summary if str(r["init"]) == a) for a, fs in at_chance.items()
    ):
        return [
            f"every model sits at chance level ({level}): none has learned the task, so the "
            "comparison above says nothing about pre-training. Check the labels (`beitdomain "
            "data scan --labels-csv`), train longer, or look at the images (`data inspect`)."
        ]
    return [
        f"'{arm}' sits at chance level ({level}) at "
        + ", ".join(_pct(f) for f in sorted(fs))
        + ": a comparison with it there measures nothing learned."
        for arm, fs in sorted(at_chance.items())
    ]


def write_report(
    out_md: str | Path,
    summary: Sequence[Mapping[str, Any]],
    efficiency: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    metric: str,
    context: Mapping[str, Any] | None = None,
) -> Path:
    """Writes `report.md`: the label-efficiency factor in words, the table, and how it was made.

    Args:
        out_md: where to write the report.
        summary: rows from `summarize`.
        efficiency: one `label_efficiency` result, or one per pre-trained initialization.
        metric: the metric of the table and the factor.
        context: how the numbers were obtained; known keys are written in words: `seeds`
            (list), `n_test` (test images), `n_train` (train images at 100%), `data`, `inits`
            ({name: source}), `command`, `figure` (PNG file name), `paired` ({init:
            `paired_gains(...)`}, a table per pre-trained initialization), `verdicts` (sentences
            put first under Result), `selection_note` (a bold line above everything),
            `arm_settings` ({arm: how it was trained}); others are listed as is.

    Returns:
        The written path.
    """
    effs = [efficiency] if isinstance(efficiency, Mapping) else list(efficiency)
    ctx = dict(context or {})
    name = METRIC_NAMES.get(metric, metric)
    reference = effs[0]["reference_init"] if effs else "scratch"
    inits = sorted({str(r["init"]) for r in summary}, key=lambda n: (n != reference, n))
    lines = [f"# Label-efficiency report ({name})", ""]
    note = ctx.pop("selection_note", None)
    if note:  # e.g. labels beyond the budget were used for selection: the reader must know first
        lines += [f"**{note}**", ""]

    lines += ["## Result", ""]
    for v in ctx.pop("verdicts", None) or []:
        lines.append(f"- **{v}**")
    # One line per distinct statement: "cannot be computed" reads the same for every arm.
    for statement in dict.fromkeys(eff["statement"] for eff in effs):
        lines.append(f"- {statement}")
    if not effs:
        lines.append("- No pre-trained initialization was compared.")
    for warning in chance_warnings(summary, metric, ctx.pop("n_classes", None)):
        lines.append(f"- **Warning:** {warning}")
    lines.append("")

    lines += ["## Mean ± std over seeds", ""]
    header = ["labelled fraction", "labels", *inits]
    header += [f"gain {e['pretrained_init']} vs {e['reference_init']} (points)" for e in effs]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * len(header)) + "|")
    by_cell = {(str(r["init"]), _number(r.get("fraction"))): r for r in summary}
    fractions = sorted({f for _, f in by_cell if f is not None})
    gains = [{g["fraction"]: g["gain_points"] for g in e["gains"]} for e in effs]
    for f in fractions:
        n_labels = next((by_cell[(i, f)].get("n_labels") for i in inits if (i, f) in by_cell), None)
        cells = [_pct(f), "–" if n_labels is None else f"{_number(n_labels):g}"]
        for i in inits:
            row = by_cell.get((i, f), {})
            cells.append(_mean_std(row.get(f"{metric}_mean"), row.get(f"{metric}_std")))
        for g in gains:
            v = g.get(f)
            cells.append("–" if v is None else f"{v:+.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if ctx.get("figure"):
        lines += [f"![{name} vs labelled fraction]({ctx.pop('figure')})", ""]
    else:
        ctx.pop("figure", None)
    lines += _paired_lines(ctx.pop("paired", None) or {}, reference)

    lines += ["## How these numbers were obtained", ""]
    seeds = ctx.pop("seeds", None)
    fraction_seeds = ctx.pop("fraction_seeds", None) or {}
    n_runs = sorted({int(r["n_runs"]) for r in summary if r.get("n_runs") is not None})
    if seeds is not None:
        extra = "".join(
            f"; at {f}: {', '.join(str(s) for s in fs)} ({len(fs)})"
            for f, fs in fraction_seeds.items()
        )
        lines.append(
            f"- Seeds: {', '.join(str(s) for s in seeds)} ({len(seeds)} fine-tunes per cell"
            f"{extra}); the seed fixes the label subset and the training order. Subsets are "
            "nested: the images of a smaller fraction are part of every larger one for the "
            "same seed."
        )
    if n_runs:
        lines.append(f"- Runs per cell: {', '.join(map(str, n_runs))}; ± is the sample std.")
    n_test = ctx.pop("n_test", None)
    if n_test is not None:
        lines.append(
            f"- Test set: {n_test} images, the same fixed "
            # masks have no class to stratify by: the segmentation split is by file and group
            f"{'split' if metric in SEGMENT_METRICS else 'stratified split'} for every run "
            "(never used for training or checkpoint selection)."
        )
    n_train = ctx.pop("n_train", None)
    if n_train is not None:
        lines.append(f"- Train split: {n_train} labelled images at 100%.")
    data = ctx.pop("data", None)
    if data is not None:
        lines.append(f"- Data: {data}")
    init_sources = ctx.pop("inits", None)
    if init_sources:
        for k, v in init_sources.items():
            lines.append(f"- Initialization `{k}`: {v if v else 'random (from scratch)'}")
    for arm, how in (ctx.pop("arm_settings", None) or {}).items():
        lines.append(f"- Arm `{arm}`: {how}")
    lrs = ctx.pop("learning_rates", None)
    if lrs:
        lines.append(f"- Fine-tuning learning rate (peak) per cell: {lrs}")
    lines.append(
        f"- Metric: {name} on the test set. The label-efficiency factor is 1 / f for the "
        f"smallest fraction f at which the pre-trained mean matches or beats the "
        f"'{reference}' mean at 100% of the labels; gains are the difference of means at "
        "the same fraction, in points (×100)."
    )
    command = ctx.pop("command", None)
    if command:
        lines.append(f"- Command: `{command}`")
    for k, v in ctx.items():
        lines.append(f"- {k}: {v}")
    lines.append("")
    atomic_write_text(out_md, "\n".join(lines))
    return Path(out_md)
