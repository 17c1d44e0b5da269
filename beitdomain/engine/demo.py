"""`beitdomain demo`: the whole chain on 2,624 real electroluminescence images of solar cells.

Data: the `elpv-dataset` package (Buerhop-Lutz et al. / Deitsch et al.; non-commercial licence),
300x300 8-bit grayscale cells with a defect probability in {0, 1/3, 2/3, 1}. Task: defective
(probability >= 0.5) vs functional, on a stratified 75/25 train/test split with a fixed seed
(the original papers' setting); validation is carved from train.

The images are exported to an ordinary folder (`<out>/data/images/<class>/cellNNNN.png` plus
`labels.csv` with a split column), so every later stage uses the same readers, cache and
engines as a user's own data. Each stage is a run folder; re-running the demo skips finished
stages and resumes an interrupted one.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from beitdomain.config import JOBS, Recipe, apply_sets
from beitdomain.data.cache import build_cache
from beitdomain.data.index import scan
from beitdomain.engine.curve.grid import parse_grid
from beitdomain.engine.curve.pretrain_length import (
    CSV_NAME,
    PLOT_NAME,
    kept_checkpoints,
    probe_along_pretraining,
)
from beitdomain.engine.curve.run import run_curve
from beitdomain.engine.pretrain import pretrain
from beitdomain.engine.run.folder import RunDir
from beitdomain.engine.run.guard import DEMO_LABELS_HEADER, is_demo_labels
from beitdomain.engine.tokenizer import train_tokenizer
from beitdomain.engine.train import distributed as D
from beitdomain.fileio import atomic_write_text, make_dirs
from beitdomain.io import IntensitySpec
from beitdomain.user import UserError

log = logging.getLogger(__name__)
INSTALL = 'pip install -e ".[demo]"   (or: pip install elpv-dataset)'
DEFECT_THRESHOLD = 0.5
TEST_FRACTION = 0.25
SPLIT_SEED = 0
# What the fp32 notice suggests: two seeds at 1% and 10%, one at 100% (the recipe's: 6, 3, 1).
FP32_FEWER_SEEDS = ["curve.seeds=[0,1]", 'curve.fraction_seeds={"100%": [0]}']


def elpv_folder() -> Path:
    """The installed package's data folder (images/ and labels.csv)."""
    try:
        import elpv_dataset
    except ImportError:
        raise UserError(
            "the demo needs the ELPV solar-cell images from the `elpv-dataset` package, which "
            f"is not installed. Install it with:\n    {INSTALL}"
        ) from None
    folder = Path(elpv_dataset.__file__).parent / "data"
    if not (folder / "labels.csv").is_file():
        raise UserError(f"{folder}: elpv-dataset is installed but has no labels.csv; reinstall it")
    return folder


def demo_inits(recipe: Recipe, pre_dir: Path) -> dict[str, str | None]:
    """The curve's arms: the domain backbone first, then the recipe's arms without pre-training
    (`curve.inits`: scratch, and e.g. `cnn: timm:resnet18`); a recipe's own `domain` entry is
    replaced by the backbone the demo just pre-trained."""
    others = {k: v for k, v in recipe.curve.inits.items() if k != "domain"}
    return {"domain": str(pre_dir), **others}


def export_elpv(out: Path) -> Path:
    """Copies the ELPV images into `out/images/<class>/` and writes `out/labels.csv`. A
    labels.csv already there is replaced only when the demo wrote it (an ELPV export).

    Returns:
        The images folder (the data root for every stage).

    Raises:
        UserError: `out/labels.csv` is not one the demo wrote; nothing was written.
    """
    from sklearn.model_selection import train_test_split

    labels_csv = out / "labels.csv"
    if os.path.lexists(labels_csv) and not is_demo_labels(labels_csv):
        raise UserError(
            f"{labels_csv} is not the ELPV labels the demo writes, so the demo will not replace "
            f"it; nothing was written. Move it away, or give the demo a new folder with --out"
        )

    src = elpv_folder()
    rows = []
    for line in (src / "labels.csv").read_text().splitlines():
        if line.strip():
            path, prob, kind = line.split()
            rows.append((path, float(prob), kind))
    labels = ["defective" if p >= DEFECT_THRESHOLD else "functional" for _, p, _ in rows]
    idx = np.arange(len(rows))
    train_idx, _ = train_test_split(
        idx, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    in_train = set(train_idx.tolist())
    images = out / "images"
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(DEMO_LABELS_HEADER)
    for i, ((path, _, _), label) in enumerate(zip(rows, labels)):
        rel = Path(label) / Path(path).name
        target = images / rel
        if not target.is_file():
            make_dirs(target.parent, "copy the ELPV images")
            shutil.copyfile(src / path, target)
        w.writerow([rel.as_posix(), label, "train" if i in in_train else "test"])
    atomic_write_text(labels_csv, buf.getvalue())
    return images


def fp32_cpu_notice(recipe: Recipe, device: str = "auto") -> str | None:
    """What to tell a user whose CPU will run the CPU recipe in fp32 (no native bf16), or None.

    The recipe's time assumes bf16 autocast; fp32 took 1.75 times as long on the 2-core EPYC
    where both were measured (11 min 22 s and 19 min 58 s, 2026-12-03; BENCHMARKS.md). The
    notice names the seeds to drop for half the fine-tuning cells.
    """
    if recipe.name != "elpv-cpu" or D.resolve_device(device).type != "cpu":
        return None
    precisions = {getattr(recipe, job).train.precision for job in JOBS}
    if "bf16" in precisions or ("auto" in precisions and D.cpu_has_native_bf16()):
        return None
    fewer = apply_sets(recipe, FP32_FEWER_SEEDS)
    return (
        "this CPU trains in fp32 (it has no native bf16, or the recipe asks for fp32): the demo "
        "takes about 1.75 times as long as with bf16 (20 minutes on a quiet 2-core EPYC), half of "
        f"it fine-tuning. Fewer seeds (wider error bars) run {cells_per_init(fewer)} fine-tuning "
        f"cells per initialization instead of {cells_per_init(recipe)}: "
        + " ".join(f"--set '{s}'" for s in FP32_FEWER_SEEDS)
    )


def cells_per_init(recipe: Recipe) -> int:
    """How many (fraction, seed) fine-tuning cells the curve runs for each initialization."""
    return len(parse_grid(recipe.curve, {"one": None}).cells())


def pretraining_length(
    recipe: Recipe, pre_dir: Path, out: Path, *, quiet: bool = False
) -> list[dict[str, Any]]:
    """The pre-training run's kept checkpoints probed on the curve's label subsets (see
    `engine.curve.pretrain_length`); [] where the run kept fewer than two. Re-runs read the CSV."""
    if (out / CSV_NAME).is_file():
        with open(out / CSV_NAME, newline="") as f:
            return [
                {k: (float(v) if k != "labels" and v else v) for k, v in row.items()}
                for row in csv.DictReader(f)
            ]
    if len(kept_checkpoints(pre_dir)) < 2:
        return []
    cells = parse_grid(recipe.curve, recipe.curve.inits).cells()
    pairs = list(dict.fromkeys((cell.labels.text, cell.seed) for cell in cells))
    log.info("probing the pre-training run's checkpoints: would more pre-training help?")
    return probe_along_pretraining(recipe, pre_dir, pairs, out, quiet=quiet)


def length_section(table: list[dict[str, Any]]) -> str:
    """report.md's section on pre-training length: the probe at each kept checkpoint."""
    metric = next(k for k in table[0] if k.startswith("probe_") and k != "probe_std")
    amounts = list(dict.fromkeys(r["labels"] for r in table))
    steps = list(dict.fromkeys(int(r["step"]) for r in table))
    by = {(int(r["step"]), r["labels"]): r for r in table}
    lines = [
        "## Would more pre-training still help?",
        "",
        f"A linear probe ({metric.removeprefix('probe_').replace('_', ' ')}, mean over the "
        "curve's seeds) of each checkpoint the pre-training run kept, on the curve's own label "
        "subsets; step 0 is a random backbone. `pretrain_length.png` draws it.",
        "",
        "| step | " + " | ".join(amounts) + " |",
        "|---:|" + "---:|" * len(amounts),
    ]
    for step in steps:
        lines.append(
            f"| {step} | " + " | ".join(f"{by[(step, a)][metric]:.3f}" for a in amounts) + " |"
        )
    pixels = " / ".join(
        f"{by[(steps[0], a)][metric.replace('probe_', 'pixels_')]:.3f}" for a in amounts
    )
    lines += ["", f"The logistic regression on pixels on the same subsets: {pixels}."]
    for a in amounts:
        last, prev = by[(steps[-1], a)][metric], by[(steps[-2], a)][metric]
        best = max(steps[1:], key=lambda s: by[(s, a)][metric])
        trend = (
            "still rising at the last step: a longer run may pay"
            if last > prev and best == steps[-1]
            else f"best at step {best} of {steps[-1]}: more of the same run is unlikely to pay"
        )
        lines.append(f"- {a}: {trend}.")
    return "\n".join(lines) + "\n"


def _done(folder: Path) -> bool:
    import json

    manifest = folder / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text()).get("status") == "completed"


def run_demo(
    recipe: Recipe, out: str | Path, *, device: str = "auto", quiet: bool = False
) -> dict[str, Any]:
    """Export -> cache -> tokenizer -> pre-training -> curve (domain vs scratch) -> report."""
    out = Path(out)
    # The demo's folder is a run of its own: re-running continues it, another folder is refused.
    demo_run = RunDir.open(out, kind="demo", resume=True)
    notice = fp32_cpu_notice(recipe, device)
    if notice:
        log.warning(notice)
    log.info("1/5 exporting the ELPV images to %s", out / "data")
    images = export_elpv(out / "data")
    d = replace(recipe.data, root=str(images), labels=str(out / "data" / "labels.csv"))
    spec = IntensitySpec.from_config(d)
    log.info("2/5 decoding every image once into a cache")
    manifest = scan(images, d.labels, progress=not quiet)
    cache_size = round(d.image_size * 1.25)
    build_cache(
        manifest, out / "cache", size=cache_size, dtype="uint8", spec=spec, progress=not quiet
    )
    recipe = replace(recipe, data=replace(d, cache=str(out / "cache")))

    tok_dir = out / "tokenizer"
    if _done(tok_dir):
        log.info("3/5 tokenizer: done already (%s)", tok_dir)
    else:
        log.info("3/5 training the domain tokenizer")
        train_tokenizer(recipe, tok_dir, device=device, resume=True, quiet=quiet)

    pre_dir = out / "pretrain"
    recipe = replace(recipe, tokenizer=replace(recipe.tokenizer, path=str(tok_dir)))
    if _done(pre_dir):
        log.info("4/5 pre-training: done already (%s)", pre_dir)
    else:
        log.info(
            "4/5 BEiT pre-training without labels, on %s",
            "every image, the test split's too (transductive)"
            if recipe.data.transductive
            else "the train split's images (the test split's are left out)",
        )
        pretrain(recipe, pre_dir, device=device, resume=True, quiet=quiet)

    log.info(
        "5/5 label-efficiency curve: domain pre-training vs from scratch and the classical "
        "baselines"
    )
    curve_recipe = replace(recipe, curve=replace(recipe.curve, inits=demo_inits(recipe, pre_dir)))
    result = run_curve(curve_recipe, out / "curve", device=device, quiet=quiet)
    for name in ("report.md", "curve.png"):
        if (out / "curve" / name).is_file():
            shutil.copyfile(out / "curve" / name, out / name)
    length = pretraining_length(curve_recipe, pre_dir, out / "pretrain_length", quiet=quiet)
    if length and (out / "report.md").is_file():
        shutil.copyfile(out / "pretrain_length" / PLOT_NAME, out / PLOT_NAME)
        report = (out / "report.md").read_text() + "\n" + length_section(length)
        atomic_write_text(out / "report.md", report)
    demo_run.close()
    return result
