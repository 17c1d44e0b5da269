"""`beitdomain ablation`: BEiT's two ablations re-run on the user's own images.

The paper (Bao et al. 2021, Table 4) pre-trains variants that differ in one choice each and
compares them after fine-tuning: blockwise against uniform random masking, and visual tokens
against pixel regression. Here each variant is an ordinary pre-training run of the same recipe
with one or two keys changed, and all of them go through one label-efficiency curve, beside
the from-scratch arm and the classical baselines, so the answer is read on the user's data, at
the user's label budgets, under the same protocol as every other curve.

Layout of the output folder (a run of its own; re-running continues it):

    <out>/pretrain-<variant>/   one pre-training run per variant (skipped when finished)
    <out>/curve/                the curve over every variant (+ scratch + baselines)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from beitdomain.config import Recipe, apply_sets, load_recipe
from beitdomain.engine.build import backbone_config
from beitdomain.engine.curve.run import run_curve
from beitdomain.engine.job import is_finished
from beitdomain.engine.pretrain import pretrain
from beitdomain.engine.run.folder import RunDir
from beitdomain.eval.report import paired_gains, read_csv, summarize
from beitdomain.fileio import atomic_write_text
from beitdomain.user import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One pre-training variant: the recipe keys it changes, and what it tests."""

    sets: tuple[str, ...]
    what: str

    @property
    def needs_tokenizer(self) -> bool:
        """Whether it pre-trains against visual tokens (a trained tokenizer)."""
        return "model.target=tokens" in self.sets


# Each variant changes only what its ablation is about; everything else is the recipe's.
VARIANTS: dict[str, Variant] = {
    "beit": Variant(("mask.kind=block", "model.target=tokens"), "blockwise masking, visual tokens"),
    "random-mask": Variant(
        ("mask.kind=random", "model.target=tokens"), "uniform random masking, visual tokens"
    ),
    "pixels": Variant(
        ("mask.kind=block", "model.target=pixels", "model.norm_pix_loss=false"),
        "blockwise masking, raw pixel regression (the paper's)",
    ),
    "pixels-norm": Variant(
        ("mask.kind=block", "model.target=pixels", "model.norm_pix_loss=true"),
        "blockwise masking, per-patch normalized pixel regression (MAE's target)",
    ),
}
# A variant without its own `curve.init_sets` fine-tunes with the recipe's pre-trained arm's
# settings, so the variants differ only in how they were pre-trained.
PRETRAINED_ARM = "domain"


def parse_variants(text: str | None) -> list[str]:
    """`beit,random-mask` -> the names, checked; None: every variant."""
    if text is None:
        return list(VARIANTS)
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise UserError(
            f"--variants {text!r}: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(VARIANTS)}"
        )
    return list(dict.fromkeys(names))


def variant_recipe(recipe: Recipe, name: str) -> Recipe:
    """The recipe a variant pre-trains with: the user's, with the variant's keys set."""
    return apply_sets(recipe, list(VARIANTS[name].sets), source=f"ablation variant {name}:")


# What must match between a reused run and the variants pre-trained here, so that the variants
# differ only in their ablation's keys (the architecture is compared as built, below).
COMPARED_KEYS = (
    "mask.kind",
    "mask.ratio",
    "model.target",
    "model.norm_pix_loss",
    "data.image_size",
    "pretrain.train.epochs",
    "pretrain.train.steps",
)
COMPARED_ARCH = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")


def check_reused_run(folder: Path, name: str, recipe: Recipe) -> None:
    """Refuses a run given for `name` that is unfinished or was pre-trained otherwise than
    `recipe` would pre-train that variant (another masking, target, model size or length)."""
    if not is_finished(folder, "pretrain"):
        raise UserError(
            f"--pretrained {name}={folder}: not a finished pre-training run (no "
            "backbone.safetensors); finish it, or leave the variant to the ablation"
        )
    saved = folder / "recipe.yaml"
    if not saved.is_file():
        raise UserError(f"--pretrained {name}={folder}: no recipe.yaml to check the variant by")

    ran, want = load_recipe(saved), variant_recipe(recipe, name)
    pairs = []
    for key in COMPARED_KEYS:
        if key == "model.norm_pix_loss" and want.model.target != "pixels":
            continue  # meaningless for a token target
        have, need = ran, want
        for part in key.split("."):
            have, need = getattr(have, part), getattr(need, part)
        pairs.append((key, have, need))
    ran_arch, want_arch = backbone_config(ran), backbone_config(want)
    pairs += [(f"model {k}", getattr(ran_arch, k), getattr(want_arch, k)) for k in COMPARED_ARCH]
    for key, have, need in pairs:
        if have != need:
            raise UserError(
                f"--pretrained {name}={folder}: that run has {key}={have}, the variant "
                f"{name!r} needs {key}={need} ({VARIANTS[name].what}, as this recipe "
                "pre-trains it)"
            )


def run_ablation(
    recipe: Recipe,
    out: str | Path,
    *,
    variants: list[str] | None = None,
    pretrained: dict[str, str] | None = None,
    scratch: bool = True,
    device: str = "auto",
    overwrite: bool = False,
    quiet: bool = False,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Pre-trains each variant (or reuses a finished run), then runs one curve over them all.

    Args:
        recipe: the user's recipe: data, tokenizer (for the token variants), model, the
            pre-training and fine-tuning settings, and the curve's fractions and seeds.
        out: the ablation's folder; re-running continues it (finished runs are skipped).
        variants: names from `VARIANTS`; None: all of them.
        pretrained: {variant: finished pretrain run} used instead of pre-training it again
            (checked: the run's recipe must have the variant's masking and target).
        scratch: also fine-tune a randomly initialised backbone (the curve's reference arm).
        overwrite: start the curve over; finished pre-training runs are always reused.
        trust_pickle: allow a pickle-based `model.init` (it can run code): trusted files only.

    Returns:
        The curve's result (summary, label-efficiency statements) and each variant's run.
    """

    names = variants or list(VARIANTS)
    pretrained = dict(pretrained or {})
    stray = sorted(set(pretrained) - set(names))
    if stray:
        raise UserError(
            f"--pretrained names {', '.join(stray)}, which is not among the variants to run "
            f"({', '.join(names)})"
        )
    needs_tokenizer = any(VARIANTS[n].needs_tokenizer for n in names if n not in pretrained)
    if needs_tokenizer and not recipe.tokenizer.path:
        raise UserError(
            "the token variants pre-train against a trained tokenizer: give --tokenizer RUN "
            "(or --set tokenizer.path=...), or run only the pixel variants with "
            "--variants pixels,pixels-norm"
        )
    for name, folder in pretrained.items():
        check_reused_run(Path(folder), name, recipe)

    out = Path(out)
    run = RunDir.open(out, kind="ablation", resume=True, recipe=recipe)
    runs: dict[str, str] = {}
    for i, name in enumerate(names, 1):
        folder = Path(pretrained[name]) if name in pretrained else out / f"pretrain-{name}"
        runs[name] = str(folder)
        if name in pretrained:
            log.info("%d/%d %s: reusing %s", i, len(names), name, folder)
        elif is_finished(folder, "pretrain"):
            log.info("%d/%d %s: done already (%s)", i, len(names), name, folder)
        else:
            log.info("%d/%d pre-training %s: %s", i, len(names), name, VARIANTS[name].what)
            pretrain(
                variant_recipe(recipe, name),
                folder,
                device=device,
                resume=True,
                quiet=quiet,
                trust_pickle=trust_pickle,
            )

    c = recipe.curve
    shared = c.init_sets.get(PRETRAINED_ARM, [])
    init_sets = {n: list(c.init_sets.get(n, shared)) for n in names}
    inits: dict[str, str | None] = dict(runs)
    if scratch:
        inits["scratch"] = None
        if c.init_sets.get("scratch"):
            init_sets["scratch"] = list(c.init_sets["scratch"])
    curve_recipe = replace(
        recipe, curve=replace(c, inits=inits, init_sets={k: v for k, v in init_sets.items() if v})
    )
    log.info("curve over %s", ", ".join(inits))
    result = run_curve(
        curve_recipe,
        out / "curve",
        device=device,
        overwrite=overwrite,
        quiet=quiet,
        trust_pickle=trust_pickle,
    )
    rows = read_csv(out / "curve" / "curve.csv")
    text = ablation_report(rows, names, c.metric)
    atomic_write_text(out / "ablation.md", text)
    run.close()
    return {"variants": runs, "ablation_report": str(out / "ablation.md"), **result}


NOT_PRETRAINED = {"scratch": "random initialization, no pre-training"}
# The paper's two questions, each a pair (variant, the variant it is measured against).
CONTRASTS = (
    ("beit", "random-mask", "blockwise vs random masking"),
    ("beit", "pixels", "visual tokens vs raw pixel regression"),
    ("beit", "pixels-norm", "visual tokens vs normalized pixel regression"),
)


def ablation_report(rows: list[dict[str, Any]], names: list[str], metric: str) -> str:
    """ablation.md: each arm's score per fraction, then each contrast paired by seed.

    Args:
        rows: the curve's rows (curve.csv), baselines included.
        names: the variants that ran.
        metric: the curve's metric column.
    """

    summary = summarize(rows)
    seen = dict.fromkeys(str(r["init"]) for r in summary)
    arms = [n for n in names if n in seen] + [a for a in seen if a not in names]
    fractions = sorted({float(r["fraction"]) for r in summary})
    score = {(str(r["init"]), float(r["fraction"])): r for r in summary}
    # A fraction is named as asked ('1%') with the labels it came to; realised fractions differ.
    named = {
        float(r["fraction"]): f"{r['labels']} ({int(float(r['n_labels']))} labels)" for r in rows
    }

    def cell(arm: str, f: float) -> str:
        r = score.get((arm, f))
        if r is None or r.get(f"{metric}_mean") is None:
            return "–"
        std = r.get(f"{metric}_std")
        return f"{r[f'{metric}_mean']:.3f}" + (f" ± {std:.3f}" if std is not None else "")

    lines = [
        "# Ablations on this data",
        "",
        f"{metric} on the test split, mean ± std over seeds.",
        "",
        "| arm | what | " + " | ".join(named[f] for f in fractions) + " |",
        "|---|---|" + "---:|" * len(fractions),
    ]
    for arm in arms:
        what = VARIANTS[arm].what if arm in VARIANTS else NOT_PRETRAINED.get(arm, "")
        lines.append(f"| {arm} | {what} | " + " | ".join(cell(arm, f) for f in fractions) + " |")
    lines += ["", "## The paper's questions, paired by seed (points; + favours the first)", ""]
    asked = [(a, b, q) for a, b, q in CONTRASTS if a in names and b in names]
    if not asked:
        lines.append("No contrast: it needs `beit` and at least one other variant.")
    for a, b, question in asked:
        for g in paired_gains(rows, metric, reference=b, init=a):
            se = f" ± {g['se']:.1f}" if g.get("se") is not None else ""
            lines.append(
                f"- {question}, {named[g['fraction']]}: {g['mean']:+.1f}{se} "
                f"({a} ahead on {g['ahead']} of {len(g['seeds'])} seeds)"
            )
    lines += [
        "",
        "The verdict against the strongest arm without pre-training (scratch and the "
        "baselines) is in curve/report.md.",
        "",
    ]
    return "\n".join(lines)
