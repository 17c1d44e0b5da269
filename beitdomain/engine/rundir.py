"""Run directories: `runs/<name>/` with the resolved recipe, metrics, checkpoints and a manifest.

runs/<name>/
  recipe.yaml        the fully resolved recipe (loads back with --recipe)
  manifest.json      versions, git commit, device, command line, times, data fingerprint, status
  metrics.jsonl      one JSON object per logged step
  checkpoints/       step-XXXXXXXX.pt (+ .json checksums), newest k kept
  ...                plots and artefacts of the command
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fnmatch
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from beitdomain.config import Recipe, dump_recipe
from beitdomain.fileio import (
    LOCK_FILE,
    RUN_MARKER,
    FolderLock,
    FolderLockedError,
    atomic_write_json,
    atomic_write_text,
    read_marker,
    write_marker,
)
from beitdomain.user import UserError

log = logging.getLogger(__name__)


class RunDirError(UserError):
    """The output folder cannot be used as asked (exists, is not a run, is another kind of run)."""


class RunLockedError(RunDirError):
    """Another process is writing the same run folder."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str]:
    """Versions of beitdomain and the libraries whose behaviour shapes results."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("beitdomain", "torch", "timm", "monai", "albumentations", "pydicom", "tifffile"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


# What each kind of run writes (fnmatch patterns over the path inside the run folder, `*` also
# crossing `/`); with the files recorded in the marker, this is what --overwrite may delete.
COMMON_OUTPUTS = (
    RUN_MARKER,
    LOCK_FILE,
    "recipe.yaml",
    "manifest.json",
    "metrics.jsonl",
    "quarantine.csv",
    "init_report.json",
    "checkpoints/*",
    "tensorboard/*",
    "mlruns/*",  # train.trackers: MLflow's file store
    "wandb/*",  # train.trackers: W&B's offline run
    ".*.tmp",  # an atomic write cut short (kill -9)
    "*/.*.tmp",
)
KIND_OUTPUTS: dict[str, tuple[str, ...]] = {
    "tokenizer": (
        "tokenizer.safetensors",
        "tokenizer.json",
        "eval.json",
        "reconstructions.png",
        "code_usage.png",
        "samples/*",
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
    "curve": ("grid.json", "curve.csv", "summary.csv", "curve.png", "report.md"),
    "cache": ("images.npy", "items.npy", "cache.json", ".images.partial.npy"),
    "demo": ("data/*", "cache/*", "report.md", "curve.png"),  # its stages are runs of their own
    "ablation": (),  # its pre-training runs and its curve are runs of their own
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


def run_kind(path: str | Path) -> str | None:
    """The kind of beitdomain run in `path` (tokenizer, pretrain, ...), or None if it is none.

    A run is recognised by the marker only beitdomain writes; a run written before markers
    existed is recognised by its manifest.json (the command, versions and argv beitdomain
    records there) beside its recipe.yaml, never by a file name alone.
    """
    path = Path(path)
    marker = read_marker(path)
    if marker is not None:
        return str(marker.get("kind") or "run")
    if (path / "data" / "labels.csv").is_file() and any(
        run_kind(path / stage) for stage in ("tokenizer", "pretrain", "curve")
    ):
        return "demo"  # a demo folder from before markers: its stages are runs
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

    A file is the run's own when its marker records it or it matches what a run of its kind
    writes; a subfolder that is itself a run (a curve's cells, an lr grid's runs) is judged by
    its own marker. Symbolic links are never followed.
    """
    path = Path(path)
    kind = kind or run_kind(path) or "run"
    marker = read_marker(path) or {}
    recorded = set(marker.get("files", []))
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
            if rel not in recorded and not any(fnmatch.fnmatchcase(rel, p) for p in patterns):
                foreign.append(rel)
    return sorted(foreign)


def _files_since(path: Path, since_ns: int) -> list[str]:
    """Files under `path` (not in nested runs) modified at or after `since_ns`."""
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if read_marker(here / d) is None]
        for name in filenames:
            p = here / name
            with contextlib.suppress(OSError):
                if p.lstat().st_mtime_ns >= since_ns:
                    out.append(p.relative_to(path).as_posix())
    return out


def _delete_own_files(path: Path) -> None:
    """Deletes everything the run in `path` wrote (nested runs included), keeping the lock file
    (it is held) and folders that still hold something."""
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        here = Path(dirpath)
        for name in filenames:
            if here == path and name == LOCK_FILE:
                continue
            (here / name).unlink()
        for d in dirnames:
            sub = here / d
            if sub.is_symlink():
                sub.unlink()
            else:
                with contextlib.suppress(OSError):
                    sub.rmdir()


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


class RunDir:
    """A run's output folder. Create it with `RunDir.open`; the process holds its lock until
    `finish` (or a failure recorded by `recording_failures`, or `close`)."""

    MANIFEST = "manifest.json"

    def __init__(self, path: Path, resumed: bool, kind: str = "run") -> None:
        self.path = path
        self.resumed = resumed
        self.kind = kind
        self._lock: FolderLock | None = None
        self._since_ns = time.time_ns()
        self.previous_status: str | None = None  # the manifest's status when the run was opened

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        kind: str = "run",
        resume: bool = False,
        overwrite: bool = False,
        is_main: bool = True,
        recipe: Recipe | None = None,
    ) -> RunDir:
        """Prepares `path` for a run of `kind` and takes its lock; nothing is written or deleted
        before every check has passed.

        - A missing or empty folder starts a fresh run (also with `resume`, so a restart loop
          can always pass --resume).
        - `resume` continues a run of the same kind, and nothing else.
        - `overwrite` deletes the files the previous run wrote and starts over. It refuses a
          folder holding any file the run did not write, a folder that is not a beitdomain run,
          a filesystem root, the current or home folder and the recipe's inputs (or a folder
          above them), naming them.

        Raises:
            RunDirError: the folder cannot be used as asked; nothing was changed.
            RunLockedError: another process is writing this folder (its PID is named).
        """
        path = Path(path)
        if resume and overwrite:
            raise RunDirError("--resume and --overwrite contradict each other; pick one")
        if kind not in KIND_OUTPUTS:
            raise ValueError(f"kind={kind!r}; valid: {', '.join(KIND_OUTPUTS)}")
        if path.exists() and not path.is_dir():
            raise RunDirError(f"--out {path} is a file, not a folder; choose a folder")
        if not is_main:  # rank 0 checks, locks and writes; the others only use the folder
            return cls(path, resumed=bool(resume and run_kind(path)), kind=kind)
        cls._check(path, kind, resume, overwrite, recipe)
        path.mkdir(parents=True, exist_ok=True)
        try:
            lock = FolderLock(path).acquire(f"a {kind} run")
        except FolderLockedError as e:
            raise RunLockedError(e.strerror or str(e)) from None
        try:
            # Checked again under the lock: another process may have changed the folder.
            existing = cls._check(path, kind, resume, overwrite, recipe)
            if existing is not None and overwrite:
                _delete_own_files(path)
                existing = None
            if existing is None or read_marker(path) is None:
                write_marker(path, kind, files=None if existing else [])
        except BaseException:
            lock.release()
            raise
        run = cls(path, resumed=bool(resume and existing), kind=kind)
        run._lock = lock
        run.previous_status = run.read_manifest().get("status") if existing else None
        return run

    @staticmethod
    def _check(
        path: Path, kind: str, resume: bool, overwrite: bool, recipe: Recipe | None
    ) -> str | None:
        """The kind of the run already in `path` (None for a missing or empty folder), or the
        reason the folder cannot be used, raised."""
        entries = [p.name for p in path.iterdir()] if path.is_dir() else []
        if not [e for e in entries if e not in (LOCK_FILE, RUN_MARKER)]:
            return None  # missing, empty, or a run that died before writing anything
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

    def close(self) -> None:
        """Records the files the run wrote and releases the folder's lock."""
        if self._lock is None:
            return
        with contextlib.suppress(OSError):
            write_marker(self.path, self.kind, self._own_files())
        self._lock.release()
        self._lock = None

    def _own_files(self) -> list[str]:
        old = (read_marker(self.path) or {}).get("files", [])
        # 2 s of slack: file systems stamp mtimes with a coarse clock
        new = _files_since(self.path, self._since_ns - 2_000_000_000)
        return [
            f for f in {*old, *new} if (self.path / f).exists() or os.path.lexists(self.path / f)
        ]

    # ---- manifest -------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        p = self.path / self.MANIFEST
        return json.loads(p.read_text()) if p.is_file() else {}

    def write_manifest(self, **fields: Any) -> dict[str, Any]:
        """Merges `fields` into manifest.json (atomically)."""
        manifest = self.read_manifest()
        manifest.update(fields)
        atomic_write_json(self.path / self.MANIFEST, manifest)
        return manifest

    def start(
        self,
        command: str,
        recipe: Recipe | None,
        device: str,
        data_fingerprint: str | None = None,
        **extra: Any,
    ) -> None:
        """Writes recipe.yaml and the manifest's start fields (kept from the first start)."""
        if recipe is not None:
            dump_recipe(recipe, self.path / "recipe.yaml")
        previous = self.read_manifest()
        starts = [*previous.get("starts", []), _now()]
        self.write_manifest(
            command=command,
            argv=sys.argv,
            versions=versions(),
            git_commit=_git_commit(),
            device=device,
            platform=platform.platform(),
            data_fingerprint=data_fingerprint,
            started=previous.get("started", starts[0]),
            starts=starts,
            status="running",
            **extra,
        )

    def finish(self, status: str = "completed", **fields: Any) -> None:
        """Records the end of the run (status, time, results) and releases the folder."""
        self.write_manifest(status=status, ended=_now(), **fields)
        self.close()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_nothing_to_resume(self) -> None:
        """Called when --resume finds no checkpoint: a run that already completed must not
        silently train again from step 0 (its checkpoints were deleted).

        Raises:
            RunDirError: the run completed and its checkpoints are gone.
        """
        if self.previous_status == "completed":
            raise RunDirError(
                f"{self.path} holds a completed run whose checkpoints are gone ({self.checkpoints} "
                f"has none), so there is nothing to resume; training again from step 0 would "
                f"replace its results. Pass --overwrite to start over, or --out for a new run"
            )
        steps = [r.get("step", 0) for r in read_metrics(self.path / "metrics.jsonl", quiet=True)]
        if steps and max(steps) > 0:
            log.warning(
                "%s: no checkpoint to resume from (the run logged up to step %d before it "
                "stopped, before its first checkpoint); starting again from step 0",
                self.path,
                max(steps),
            )

    @contextlib.contextmanager
    def recording_failures(self, is_main: bool = True) -> Iterator[None]:
        """Marks the manifest `interrupted` or `failed` (with the reason) when the body raises."""
        try:
            yield
        except KeyboardInterrupt as e:
            if is_main:
                self.finish("interrupted", error=str(e) or "interrupted")
            raise
        except Exception as e:
            if is_main:
                self.finish("failed", error=f"{type(e).__name__}: {e}")
            raise

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"


class MetricsLog:
    """Appends one JSON object per logged step to `metrics.jsonl`, and to any trackers asked for.

    On resume the lines past the resumed step are dropped first, so a run that was killed after
    logging step 130 but checkpointing step 100 does not log steps 101-130 twice. Trackers
    (TensorBoard, MLflow, W&B: `beitdomain.engine.trackers`) get the same numbers; one that is
    not installed is a warning.
    """

    def __init__(
        self,
        path: str | Path,
        resume_step: int | None = None,
        tensorboard: bool = False,
        trackers: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
    ):
        from beitdomain.engine.trackers import open_trackers

        self.path = Path(path)
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        names = [*(["tensorboard"] if tensorboard else []), *trackers]
        self._trackers = open_trackers(names, self.path.parent, config=config) if names else []

    def log(self, step: int, **values: Any) -> None:
        from beitdomain.engine.trackers import numeric

        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._trackers:
            numbers = numeric(record)
            for t in self._trackers:
                t.log(step, numbers)

    def close(self) -> None:
        for t in self._trackers:
            t.close()
        self._trackers = []


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        return v.item()
    return v


def read_metrics(path: str | Path, quiet: bool = False) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file ([] when there is none).

    A line that does not parse (the last one, cut short by a kill or a full disk during the
    write) is dropped with a warning naming the file and line, rather than failing a resume.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if not quiet:
                log.warning("%s line %d is damaged (cut short?); dropped: %.60r", path, n, line)
            continue
        records.append(record)
    return records
