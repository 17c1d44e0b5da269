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
import json
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from beitdomain.config import Recipe, dump_recipe
from beitdomain.fileio import atomic_write_json
from beitdomain.user import UserError


class RunDirError(UserError):
    """The output folder cannot be used as asked (exists, or is not a run)."""


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


class RunDir:
    """A run's output folder. Create it with `RunDir.open`."""

    MANIFEST = "manifest.json"

    def __init__(self, path: Path, resumed: bool) -> None:
        self.path = path
        self.resumed = resumed

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
        is_main: bool = True,
    ) -> RunDir:
        """Prepares `path` for a run.

        A folder holding a previous run is refused unless `resume` (continue it) or `overwrite`
        (delete it and start over) is given. `resume` on a missing or empty folder starts a fresh
        run, so a restart loop can always pass --resume.

        Raises:
            RunDirError: the folder holds a run and neither flag is given, or `overwrite` is given
                for a non-empty folder that is not a beitdomain run (nothing is deleted then).
        """
        path = Path(path)
        if resume and overwrite:
            raise RunDirError("--resume and --overwrite contradict each other; pick one")
        existing = path.is_dir() and any(path.iterdir())
        is_run = (path / cls.MANIFEST).is_file()
        if existing and not (resume or overwrite):
            raise RunDirError(
                f"{path} already exists and is not empty. Pass --resume to continue that run, "
                f"--overwrite to delete it and start over, or --out to choose another folder."
            )
        if existing and overwrite:
            if not is_run:
                raise RunDirError(
                    f"--overwrite refused: {path} is not a beitdomain run (no {cls.MANIFEST}); "
                    f"nothing was deleted. Choose an empty folder with --out."
                )
            if is_main:
                shutil.rmtree(path)
        if is_main:
            path.mkdir(parents=True, exist_ok=True)
        return cls(path, resumed=bool(resume and is_run))

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
        self.write_manifest(status=status, ended=_now(), **fields)

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
    """Appends one JSON object per logged step to `metrics.jsonl` (and TensorBoard if asked).

    On resume the lines past the resumed step are dropped first, so a run that was killed after
    logging step 130 but checkpointing step 100 does not log steps 101-130 twice.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None, tensorboard: bool = False):
        self.path = Path(path)
        if resume_step is not None and self.path.is_file():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass  # optional: `pip install tensorboard`
            else:
                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))

    def log(self, step: int, **values: Any) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        return v.item()
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
