"""Which folders a run may use, and which files in a run folder are the run's own.

A folder is a beitdomain run when it holds the marker only beitdomain writes
(`.beitdomain-run.json`; for a run from before markers, the manifest.json beside its
recipe.yaml). `--resume` continues a run of the same kind only; `--overwrite` deletes only what
the run wrote, and refuses a folder holding anything else, a filesystem root, the current or
home folder and the recipe's inputs. `RunDir.open` asks `check_folder` before it writes.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import os
import re
from pathlib import Path

from beitdomain.config import Recipe
from beitdomain.fileio import LOCK_FILE, RUN_MARKER, LockFileError, check_lock_file, read_marker
from beitdomain.user import UserError


class RunDirError(UserError):
    """The output folder cannot be used as asked (exists, is not a run, is another kind of run)."""


class RunLockedError(RunDirError):
    """Another process is writing the same run folder."""


# What each kind of run writes, as patterns over the path inside the run folder: each `/`-part
# is an fnmatch pattern for one path component (its `*` never crosses `/`), and a last `**`
# stands for one or more components. With the files recorded in the marker, this is what
# --overwrite may delete; a pattern names only files the run itself writes, so a user's file
# beside them (in checkpoints/, samples/, a tracker's folder) is foreign and --overwrite refuses.
_STEP = "step-[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]*"  # CheckpointManager's step-XXXXXXXX
_MLFLOW_RUN = "[0-9a-f]" * 32  # MLflow's run ids: 32 hex digits
COMMON_OUTPUTS = (
    RUN_MARKER,
    LOCK_FILE,
    "recipe.yaml",
    "manifest.json",
    "metrics.jsonl",
    "quarantine.csv",
    "init_report.json",
    f"checkpoints/{_STEP}.pt",
    f"checkpoints/{_STEP}.pt.json",
    "tensorboard/events.out.tfevents.*",  # SummaryWriter's event files
    "tensorboard/*/events.out.tfevents.*",  # add_hparams writes one folder per call
    # train.trackers: MLflow's file store (experiment folders are numbered)
    "mlruns/[0-9]*/meta.yaml",
    f"mlruns/[0-9]*/{_MLFLOW_RUN}/**",
    "mlruns/.trash/**",
    # train.trackers: W&B's offline run
    "wandb/offline-run-*/**",
    "wandb/run-*/**",
    "wandb/latest-run",
    "wandb/debug.log",
    "wandb/debug-internal.log",
    "wandb/debug-cli.*.log",
)
KIND_OUTPUTS: dict[str, tuple[str, ...]] = {
    "tokenizer": (
        "tokenizer.safetensors",
        "tokenizer.json",
        "eval.json",
        "reconstructions.png",
        "code_usage.png",
        f"samples/{_STEP}.png",  # the tokenizer's preview grids
    ),
    "pretrain": ("mim.safetensors", "backbone.safetensors", "backbone.json"),
    "finetune": (
        "results.json",
        "confusion_matrix.png",
        "test_predictions.csv",
        "labels_used.csv",
        "labels.json",
        "best.safetensors",
        "training_curves.png",
        "head_probe.json",
    ),
    "curve": (
        "grid.json",
        "arms.json",  # curve.report.ARMS_FILE
        "baselines.csv",  # curve.baselines.BASELINES_FILE
        "baselines_labels_used.csv",
        "curve.csv",
        "summary.csv",
        "curve.png",
        "report.md",
    ),
    "cache": ("images.npy", "items.npy", "cache.json", ".images.partial.npy"),
    "demo": (  # its stages are runs of their own
        "data/labels.csv",  # export_elpv: the labels and the images by class
        "data/images/defective/*",
        "data/images/functional/*",
        "cache/images.npy",  # a cache from before markers (now a run of its own)
        "cache/items.npy",
        "cache/cache.json",
        "report.md",
        "curve.png",
    ),
    "ablation": ("ablation.md",),  # its pre-training runs and its curve are runs of their own
    "run": (),  # a run of the Python API with no kind given
}
# The `command` a run's manifest.json recorded before runs had a marker (legacy runs).
_LEGACY_COMMANDS = {
    "tokenizer train": "tokenizer",
    "pretrain": "pretrain",
    "finetune": "finetune",
    "curve": "curve",
}
_CLI = {
    "tokenizer": "beitdomain tokenizer train",
    "pretrain": "beitdomain pretrain",
    "finetune": "beitdomain finetune",
    "curve": "beitdomain curve",
    "cache": "beitdomain data cache",
    "demo": "beitdomain demo",
    "ablation": "beitdomain ablation",
}


def _matches(rel: str, pattern: str) -> bool:
    """Whether the path `rel` matches `pattern` part by part (a last part `**`: one or more)."""
    parts, pats = rel.split("/"), pattern.split("/")
    if pats[-1] == "**":
        pats = pats[:-1]
        return len(parts) > len(pats) and all(map(fnmatch.fnmatchcase, parts, pats))
    return len(parts) == len(pats) and all(map(fnmatch.fnmatchcase, parts, pats))


def _tmp_target(rel: str) -> list[str]:
    """The files an interrupted atomic write named `rel` was writing: `.<name>.tmp` or
    mkstemp's `.<name>.<8 random>.tmp` beside `<name>` (empty when `rel` is no such file)."""
    folder, _, name = rel.rpartition("/")
    if not (name.startswith(".") and name.endswith(".tmp")) or len(name) <= len("..tmp"):
        return []
    stem = name[1 : -len(".tmp")]
    targets = [stem]
    base, dot, rand = stem.rpartition(".")
    if dot and base and len(rand) == 8:
        targets.append(base)
    return [f"{folder}/{t}" if folder else t for t in targets]


def is_run_output(rel: str, patterns: tuple[str, ...]) -> bool:
    """Whether `rel` (a path inside a run folder) is a file a run writing `patterns` writes:
    one of them, or the temporary file of an atomic write of one of them cut short (kill -9)."""
    if any(_matches(rel, p) for p in patterns):
        return True
    return any(is_run_output(t, patterns) for t in _tmp_target(rel))


# The labels.csv the demo's export_elpv writes: this header, then one row per ELPV cell image
# under the folder of its class, with the class and the split.
DEMO_LABELS_HEADER = ["path", "label", "split"]
_DEMO_LABELS_ROW = re.compile(r"(defective|functional)/cell[0-9]{4}\.png")


def is_demo_labels(path: str | Path) -> bool:
    """Whether `path` is a labels.csv the demo wrote (its ELPV export), and not a user's."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = csv.reader(f)
            if next(rows, None) != DEMO_LABELS_HEADER:
                return False
            n = 0
            for row in rows:
                m = len(row) == 3 and _DEMO_LABELS_ROW.fullmatch(row[0])
                if not m or row[1] != m.group(1) or row[2] not in ("train", "test"):
                    return False
                n += 1
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return n > 0


def run_kind(path: str | Path) -> str | None:
    """The kind of beitdomain run in `path` (tokenizer, pretrain, ...), or None if it is none.

    A run is recognised by the marker only beitdomain writes; a run written before markers
    existed is recognised by its manifest.json (the command, versions and argv beitdomain
    records there) beside its recipe.yaml, and a demo's by the ELPV labels its export wrote,
    never by a file name alone.
    """
    path = Path(path)
    marker = read_marker(path)
    if marker is not None:
        return str(marker.get("kind") or "run")
    if is_demo_labels(path / "data" / "labels.csv") and any(
        run_kind(path / stage) for stage in ("tokenizer", "pretrain", "curve")
    ):
        return "demo"  # a demo folder from before markers: its ELPV export, its stages runs
    try:
        m = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    legacy = (
        isinstance(m, dict)
        and m.get("command") in _LEGACY_COMMANDS
        and isinstance(m.get("versions"), dict)
        and "argv" in m
        and (path / "recipe.yaml").is_file()
    )
    return _LEGACY_COMMANDS[m["command"]] if legacy else None


def foreign_files(path: str | Path, kind: str | None = None) -> list[str]:
    """Files in the run folder `path` that the run did not write (paths inside `path`).

    A file is the run's own when it matches what a run of its kind writes; the files its marker
    records count only where they match too (a marker written before this rule could record a
    user's file written during the run). A subfolder that is itself a run (a curve's cells, an
    lr grid's runs) is judged by its own marker. Symbolic links are never followed.
    """
    path = Path(path)
    kind = kind or run_kind(path) or "run"
    patterns = COMMON_OUTPUTS + KIND_OUTPUTS.get(kind, ())
    foreign: list[str] = []
    for dirpath, dirnames, filenames in os.walk(path):
        here = Path(dirpath)
        for d in list(dirnames):
            sub = here / d
            if sub.is_symlink():
                dirnames.remove(d)
                filenames.append(d)  # a link is judged as a file (and only unlinked)
            elif run_kind(sub) is not None:
                dirnames.remove(d)
                foreign += [f"{sub.relative_to(path).as_posix()}/{f}" for f in foreign_files(sub)]
        for name in filenames:
            rel = (here / name).relative_to(path).as_posix()
            if not is_run_output(rel, patterns):
                foreign.append(rel)
    return sorted(foreign)


def protected_paths(recipe: Recipe | None) -> dict[str, Path]:
    """Folders --overwrite must never clear: the working folder, the home folder and the
    inputs the recipe names (data root, cache, labels, tokenizer, init weights)."""
    out = {"the current folder": Path.cwd(), "the home folder": Path.home()}
    if recipe is not None:
        for label, value in (
            ("data.root", recipe.data.root),
            ("data.cache", recipe.data.cache),
            ("data.labels", recipe.data.labels),
            ("tokenizer.path", recipe.tokenizer.path),
            ("model.init", recipe.model.init),
            ("finetune.init", getattr(recipe.finetune, "init", None)),
        ):
            if isinstance(value, (str, os.PathLike)) and str(value):
                out[label] = Path(value)
    return out


def _refuse_dangerous(path: Path, protected: dict[str, Path]) -> None:
    real = path.resolve()
    if real.parent == real:
        raise RunDirError(f"--overwrite refused: {path} is a filesystem root; nothing was deleted")
    for label, p in protected.items():
        try:
            other = p.expanduser().resolve()
        except (OSError, RuntimeError):
            continue
        if other == real or other.is_relative_to(real):
            what = "is" if other == real else "holds"
            raise RunDirError(
                f"--overwrite refused: {path} {what} {label} ({p}); nothing was deleted. Give "
                f"the run its own folder with --out"
            )


def written_since(path: Path, kind: str, since_ns: int) -> bool:
    """Whether every file under `path` but its lock and marker is named like what a run of
    `kind` writes and was written at or after `since_ns` (links count as files, and are never
    followed)."""
    patterns = COMMON_OUTPUTS + KIND_OUTPUTS.get(kind, ())
    since = since_ns - 2_000_000_000  # file systems stamp mtimes with a coarse clock
    for dirpath, dirnames, filenames in os.walk(path):
        here = Path(dirpath)
        links = [d for d in dirnames if (here / d).is_symlink()]
        dirnames[:] = [d for d in dirnames if d not in links]
        for name in [*filenames, *links]:
            p = here / name
            if here == path and name in (LOCK_FILE, RUN_MARKER):
                continue
            try:
                newer = p.lstat().st_mtime_ns >= since
            except OSError:
                return False
            if not (newer and is_run_output(p.relative_to(path).as_posix(), patterns)):
                return False
    return True


def check_folder(
    path: Path,
    kind: str,
    resume: bool,
    overwrite: bool,
    recipe: Recipe | None,
    own_since_ns: int | None = None,
) -> str | None:
    """The kind of the run already in `path` (None for a missing or empty folder), or the
    reason the folder cannot be used, raised.

    `own_since_ns`: the caller found no run in the folder at that time (a job checks its
    folder before it reads its data); a folder holding, beside a lock and marker, only files
    named like the run's outputs written since (the quarantine report of reading the data) is
    still the caller's fresh one.

    Raises:
        RunDirError: the folder cannot be used as asked; nothing was changed.
    """
    if path.is_dir():
        try:
            # A lock that is a link or not a file is not ours: the folder is not empty.
            check_lock_file(path)
        except LockFileError as e:
            raise RunDirError(str(e)) from None
    entries = [p.name for p in path.iterdir()] if path.is_dir() else []
    if not [e for e in entries if e not in (LOCK_FILE, RUN_MARKER)]:
        return None  # missing, empty, or a run that died before writing anything
    if own_since_ns is not None and written_since(path, kind, own_since_ns):
        return None  # what this job wrote while it read its data, before opening the folder
    found = run_kind(path)
    name = _CLI.get(kind, "this command")
    if found is None:
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        what = "--overwrite refused: " if overwrite else ""
        raise RunDirError(
            f"{what}{path} is not empty ({shown}) and is not a beitdomain run; nothing was "
            f"changed. Choose an empty or new folder with --out"
        )
    if found != kind and kind != "run":
        raise RunDirError(
            f"{path} holds a {found} run, not a {kind} run; {name} will not "
            f"{'resume' if resume else 'replace'} it. Choose another folder with --out"
        )
    if overwrite:
        _refuse_dangerous(path, protected_paths(recipe))
        foreign = foreign_files(path, found)
        if foreign:
            shown = ", ".join(foreign[:8]) + (
                f" and {len(foreign) - 8} more" if len(foreign) > 8 else ""
            )
            raise RunDirError(
                f"--overwrite refused: {path} holds files this run did not write ({shown}); "
                f"nothing was deleted. Move them out, or choose another folder with --out"
            )
    elif not resume:
        raise RunDirError(
            f"{path} already holds a {found} run. Pass --resume to continue it, --overwrite "
            f"to delete its files and start over, or --out to choose another folder."
        )
    return found
