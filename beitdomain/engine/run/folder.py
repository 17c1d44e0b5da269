"""Run directories: `runs/<name>/` with the resolved recipe, metrics, checkpoints and a manifest.

runs/<name>/
  recipe.yaml        the fully resolved recipe (loads back with --recipe)
  manifest.json      versions, git commit, device, command line, times, data fingerprint, status
  metrics.jsonl      one JSON object per logged step
  checkpoints/       step-XXXXXXXX.pt (+ .json checksums), newest k kept
  ...                plots and artefacts of the command

Whether a folder may be used (and which of its files are the run's) is `rundir_guard`;
metrics.jsonl is written and read by `metrics_log`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from beitdomain.config import Recipe, dump_recipe
from beitdomain.engine.run.guard import (
    COMMON_OUTPUTS,
    KIND_OUTPUTS,
    RunDirError,
    RunLockedError,
    check_folder,
    is_run_output,
    run_kind,
)
from beitdomain.engine.run.metrics_log import read_metrics
from beitdomain.fileio import (
    LOCK_FILE,
    FolderLock,
    FolderLockedError,
    atomic_write_json,
    make_dirs,
    read_marker,
    write_marker,
)

log = logging.getLogger(__name__)


def _torch_threads() -> int | None:
    """torch's intra-op threads, where the caller has imported torch (this module does not)."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """The commit of the checkout beitdomain runs from (full hash), or None outside one."""
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


def _check_request(path: Path, kind: str, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; pick one")
    if kind not in KIND_OUTPUTS:
        raise ValueError(f"kind={kind!r}; valid: {', '.join(KIND_OUTPUTS)}")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {path} is a file, not a folder; choose a folder")


def _check_unlocked(path: Path, kind: str) -> None:
    """Refuses a folder another process is writing, leaving it as it was held. Only a folder
    with a lock file can be held; one this process holds (an earlier run object's, which a
    later `open` takes over) is not tried, as trying would release it."""
    if (path / LOCK_FILE).is_file() and os.path.realpath(path) not in FolderLock._held:
        try:
            FolderLock(path).acquire(f"a {kind} run").release()
        except FolderLockedError as e:
            raise RunLockedError(e.strerror or str(e)) from None


class OtherDataError(RunDirError):
    """--resume would continue a run on data other than the data its checkpoints trained on."""


def check_same_data(path: str | Path, data_fingerprint: str | None, allow: bool = False) -> None:
    """Before a run in `path` resumes from a checkpoint: the data must be what it trained on.

    A run's steps so far saw the images of its recorded `data_fingerprint`; resuming on other
    images (another folder, files added, removed or changed) would mix the two silently. With
    `allow` it goes on with a warning naming both, and the manifest keeps the first fingerprint
    (`RunDir.start` lists the new one under `other_data`). Nothing is written here.

    Raises:
        OtherDataError: the data differ and `allow` is False; nothing was changed.
    """
    path = Path(path)
    try:
        first = json.loads((path / RunDir.MANIFEST).read_text()).get("data_fingerprint")
    except (OSError, ValueError, AttributeError):
        return
    if not (first and data_fingerprint) or first == data_fingerprint:
        return
    if not any((path / "checkpoints").glob("step-*.pt")):
        return  # nothing to resume: training starts again from step 0 on these images
    if allow:
        log.warning(
            "%s: resuming on other data: its checkpoints trained on data %s, this run reads "
            "data %s; the manifest keeps the first and lists this one under other_data",
            path,
            first[:16],
            data_fingerprint[:16],
        )
        return
    raise OtherDataError(
        f"{path} trained on other data (data fingerprint {first[:16]}) than --resume reads "
        f"now ({data_fingerprint[:16]}): files were added, removed or changed, or the data "
        f"option points elsewhere. Resume with the run's own data, choose a new --out, or "
        f"add --resume-other-data (resume_other_data=True in Python) to go on and record both"
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

    @staticmethod
    def check(
        path: str | Path,
        *,
        kind: str = "run",
        resume: bool = False,
        overwrite: bool = False,
        recipe: Recipe | None = None,
    ) -> str | None:
        """Everything `open` checks, writing nothing: a job asks this before it reads its data,
        so a folder it cannot use is refused at once, and the folder is created (by `open`)
        only once the data, the tokenizer and the model are known to be good.

        Returns:
            The kind of the run already in `path`; None for a missing or empty folder.

        Raises:
            RunDirError: the folder cannot be used as asked.
            RunLockedError: another process is writing this folder (its PID is named).
        """
        path = Path(path).expanduser()  # a quoted '~/runs/x' means the home folder
        _check_request(path, kind, resume, overwrite)
        found = check_folder(path, kind, resume, overwrite, recipe)
        _check_unlocked(path, kind)
        return found

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
        fresh_since_ns: int | None = None,
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
        - `fresh_since_ns`: the caller found the folder missing or empty at that time (`check`);
          files named like the run's outputs written there since (the quarantine report of
          reading its data) are the run's own, and `discard` removes them too.

        Raises:
            RunDirError: the folder cannot be used as asked; nothing was changed.
            RunLockedError: another process is writing this folder (its PID is named).
        """
        path = Path(path).expanduser()  # a quoted '~/runs/x' means the home folder
        if not is_main:  # rank 0 checks, locks and writes; the others only use the folder
            _check_request(path, kind, resume, overwrite)
            return cls(path, resumed=bool(resume and run_kind(path)), kind=kind)
        _check_request(path, kind, resume, overwrite)
        check_folder(path, kind, resume, overwrite, recipe, fresh_since_ns)
        make_dirs(path, f"write the {kind} run")
        try:
            lock = FolderLock(path).acquire(f"a {kind} run")
        except FolderLockedError as e:
            raise RunLockedError(e.strerror or str(e)) from None
        try:
            # Checked again under the lock: another process may have changed the folder.
            existing = check_folder(path, kind, resume, overwrite, recipe, fresh_since_ns)
            if existing is not None and overwrite:
                _delete_own_files(path)
                existing = None
            if existing is None or read_marker(path) is None:
                write_marker(path, kind, files=None if existing else [])
        except BaseException:
            lock.release()
            raise
        run = cls(path, resumed=bool(resume and existing), kind=kind)
        if existing is None and fresh_since_ns is not None:
            run._since_ns = min(run._since_ns, fresh_since_ns)
        run._lock = lock
        run.previous_status = run.read_manifest().get("status") if existing else None
        return run

    def discard(self, remove_folder: bool) -> None:
        """Undoes a start that failed in a folder that was missing or empty: deletes the files
        this run wrote (named like its outputs and written since it began: `_own_files`), the
        folders they leave empty and, with `remove_folder` (this run created the folder), the
        folder itself once nothing else is in it; then releases the lock. Anything else
        (a user's file written meanwhile) is left where it is."""
        if self._lock is None:
            return
        since = self._since_ns - 2_000_000_000
        for rel in sorted(self._own_files(), key=lambda f: (-f.count("/"), f)):
            p = self.path / rel
            with contextlib.suppress(OSError):
                if p.lstat().st_mtime_ns >= since:
                    p.unlink()
        with contextlib.suppress(OSError):
            (self.path / LOCK_FILE).unlink()  # still held: no other process can be using it
        self._lock.release()
        self._lock = None
        for dirpath, _, _ in sorted(os.walk(self.path), key=lambda w: -len(w[0])):
            here = Path(dirpath)
            if here != self.path or remove_folder:
                with contextlib.suppress(OSError):
                    here.rmdir()  # only when empty

    def close(self) -> None:
        """Records the files the run wrote and releases the folder's lock."""
        if self._lock is None:
            return
        with contextlib.suppress(OSError):
            write_marker(self.path, self.kind, self._own_files())
        self._lock.release()
        self._lock = None

    def _own_files(self) -> list[str]:
        """The files this run (and the runs before it in this folder) wrote: those named like
        what a run of its kind writes, recorded before or modified since it started. A file
        modified during the run under any other name (a user's NOTES.md) is not the run's,
        however recent, so --overwrite refuses the folder instead of deleting it."""
        patterns = COMMON_OUTPUTS + KIND_OUTPUTS.get(self.kind, ())
        old = (read_marker(self.path) or {}).get("files", [])
        # 2 s of slack: file systems stamp mtimes with a coarse clock
        new = _files_since(self.path, self._since_ns - 2_000_000_000)
        return [
            f for f in {*old, *new} if is_run_output(f, patterns) and os.path.lexists(self.path / f)
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
        if "error" in previous:  # how the last start stopped: history, not this run's state
            stopped = {k: previous[k] for k in ("status", "error", "ended") if k in previous}
            previous.pop("error")
            previous.pop("ended", None)
            previous["stops"] = [*previous.get("stops", []), stopped]
            atomic_write_json(self.path / self.MANIFEST, previous)
        first = previous.get("data_fingerprint")
        if self.resumed and first and data_fingerprint and first != data_fingerprint:
            # resumed on other data (allowed by the caller, see `check_same_data`): the record
            # keeps what the first steps saw, and lists each start on other data after it
            other = {"data_fingerprint": data_fingerprint, "started": starts[-1], **extra}
            extra = {k: previous.get(k, v) for k, v in extra.items()}
            extra["other_data"] = [*previous.get("other_data", []), other]
            data_fingerprint = first
        self.write_manifest(
            command=command,
            argv=sys.argv,
            versions=versions(),
            git_commit=git_commit(),
            device=device,
            platform=platform.platform(),
            # A CPU run's float sums depend on how many threads split them.
            cpu_threads=_torch_threads(),
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
