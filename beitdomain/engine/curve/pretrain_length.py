"""Would more pre-training still help? The checkpoints along one pre-training run, each probed.

Every checkpoint a pre-training run kept (`pretrain.train.keep_checkpoints`, one every
`ckpt_every` steps) is a backbone: its frozen, mean-pooled features go under the curve's own
logistic probe, on the curve's own label subsets (the same (amount, seed) cells, C by
cross-validation inside each subset), beside a random backbone (step 0) and the logistic
regression on pixels. A probe is seconds per checkpoint where a fine-tune is minutes, so the
whole run can be read in one plot: if the probe is still climbing at the last step, a longer run
would likely pay; if it went flat early, the GPU hours past that point bought nothing.
Probes rank backbones, not fine-tuned accuracy: the plot says where pre-training stopped
helping the features, and the curve says what fine-tuning makes of the final ones.
"""

from __future__ import annotations

import csv
import io
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from beitdomain.config import Recipe
from beitdomain.engine.curve.baselines import PIXELS, baseline_rows, probe_name
from beitdomain.engine.curve.report import curve_metric
from beitdomain.engine.run.checkpoint import CheckpointManager
from beitdomain.fileio import atomic_save, atomic_write_text, make_dirs
from beitdomain.user import UserError

log = logging.getLogger(__name__)
RANDOM = "step-0"
CSV_NAME, PLOT_NAME = "pretrain_length.csv", "pretrain_length.png"


def kept_checkpoints(pre_dir: str | Path) -> dict[int, Path]:
    """{step: checkpoint file} for every complete checkpoint of a pre-training run (those whose
    checksum sidecar was written), oldest first."""
    manager = CheckpointManager(Path(pre_dir) / "checkpoints")
    out = {}
    for step in manager.steps():
        path = manager.path_for(step)
        if path.with_name(path.name + ".json").is_file():
            out[step] = path
    return out


def probe_along_pretraining(
    recipe: Recipe,
    pre_dir: str | Path,
    cells: Sequence[tuple[str, int]],
    out: str | Path,
    *,
    quiet: bool = True,
) -> list[dict[str, Any]]:
    """Probes every kept checkpoint of `pre_dir` (and a random backbone as step 0) on `cells`
    ((label amount, seed) pairs: the curve's subsets); writes `pretrain_length.csv` (one row per
    checkpoint and label amount: mean and std over seeds of the recipe's curve metric, and the
    paired gain over the pixel regression) and `pretrain_length.png` into `out`.

    Returns:
        The CSV's rows.

    Raises:
        UserError: the run kept no checkpoint.
    """
    metric = curve_metric(recipe.curve, "classify")  # probes classify whole images
    kept = kept_checkpoints(pre_dir)
    if not kept:
        raise UserError(
            f"{pre_dir}: no complete checkpoint to probe (set pretrain.train.keep_checkpoints "
            "high enough to keep one every ckpt_every steps)"
        )
    inits: dict[str, str | None] = {RANDOM: None}
    inits.update({f"step-{s}": str(p) for s, p in kept.items()})
    if not quiet:
        log.info("probing %d checkpoints of %s on %d label subsets", len(kept), pre_dir, len(cells))
    rows, _ = baseline_rows(recipe, inits, cells, quiet=quiet)
    table = length_table(rows, [0, *kept], metric)
    out = Path(out)
    make_dirs(out)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    atomic_write_text(out / CSV_NAME, buf.getvalue())
    plot_length(table, metric, out / PLOT_NAME)
    return table


def length_table(
    rows: Sequence[dict[str, Any]], steps: Sequence[int], metric: str
) -> list[dict[str, Any]]:
    """One row per (step, label amount): the probe's mean/std over seeds, the pixel regression's
    mean on the same subsets, and the mean paired gain (probe - pixels, seed by seed)."""
    by: dict[tuple[str, str, int], float] = {}
    amounts: list[str] = []
    for r in rows:
        by[(r["init"], r["labels"], int(r["seed"]))] = float(r[metric])
        if r["labels"] not in amounts:
            amounts.append(r["labels"])
    table = []
    for amount in amounts:
        seeds = sorted({s for (i, a, s) in by if i == PIXELS and a == amount})
        pixels = [by[(PIXELS, amount, s)] for s in seeds]
        for step in steps:
            name = probe_name(f"step-{step}")
            probe = [by[(name, amount, s)] for s in seeds]
            gains = [p - q for p, q in zip(probe, pixels)]
            table.append(
                {
                    "step": step,
                    "labels": amount,
                    "seeds": len(seeds),
                    f"probe_{metric}": round(statistics.fmean(probe), 4),
                    "probe_std": round(statistics.stdev(probe), 4) if len(probe) > 1 else "",
                    f"pixels_{metric}": round(statistics.fmean(pixels), 4),
                    "gain_over_pixels": round(statistics.fmean(gains), 4),
                }
            )
    return table


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def plot_length(table: Sequence[dict[str, Any]], metric: str, path: Path) -> None:
    """The probe's metric against pre-training steps, one line per label amount, with the
    pixel regression on the same subsets as a dashed line of the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    amounts = list(dict.fromkeys(r["labels"] for r in table))
    for k, amount in enumerate(amounts):
        part = [r for r in table if r["labels"] == amount]
        x = [r["step"] for r in part]
        y = [r[f"probe_{metric}"] for r in part]
        err = [r["probe_std"] or 0.0 for r in part]
        color = f"C{k}"
        ax.errorbar(
            x,
            y,
            yerr=err if part[0]["seeds"] > 1 else None,
            color=color,
            marker="o",
            capsize=3,
            label=f"probe of the backbone, {amount} ({_seeds(part[0]['seeds'])})",
        )
        ax.axhline(
            part[0][f"pixels_{metric}"],
            color=color,
            linestyle="--",
            linewidth=1,
            label=f"logistic regression on pixels, {amount}",
        )
    ax.set_xlabel("pre-training steps (0: a random backbone)")
    ax.set_ylabel(f"test {metric.replace('_', ' ')}")
    ax.set_title("Would more pre-training still help?")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
