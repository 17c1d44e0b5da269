"""Training checkpoints: atomic, checksummed, last-k kept, with fallback past a damaged one.

A checkpoint is `step-00001200.pt` (torch.save of plain tensors, numbers and strings, so it loads
with `weights_only=True`) beside `step-00001200.pt.json` holding its SHA-256 and size. The sidecar
is written after the checkpoint is complete, so a checkpoint without one was cut short and is
never trusted. Loading walks from the newest checkpoint back until one verifies.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from beitdomain.fileio import atomic_save, atomic_write_json, sha256_file
from beitdomain.user import UserError

log = logging.getLogger(__name__)
_NAME = re.compile(r"^step-(\d{8,})\.pt$")


class CheckpointError(UserError):
    """No usable checkpoint, or one that cannot be used for this run."""


class CheckpointManager:
    """Saves and finds a run's training checkpoints.

    Args:
        folder: where checkpoints live (`<run>/checkpoints`).
        keep: how many of the newest checkpoints to keep; older ones are deleted after a save.
    """

    def __init__(self, folder: str | Path, keep: int = 3) -> None:
        self.folder = Path(folder)
        self.keep = max(1, keep)

    def path_for(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}.pt"

    def steps(self) -> list[int]:
        """Steps of the checkpoints on disk, oldest first (complete or not)."""
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _NAME.match(p.name)))

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Writes `state` as the checkpoint of `step` and prunes old ones.

        Raises:
            fileio.WriteError: e.g. disk full; the previous checkpoints are intact.
        """
        path = self.path_for(step)
        atomic_save(path, lambda f: torch.save(state, f))
        atomic_write_json(
            path.with_name(path.name + ".json"),
            {"step": step, "sha256": sha256_file(path), "bytes": path.stat().st_size},
        )
        for old in self.steps()[: -self.keep]:
            for p in (self.path_for(old), self.path_for(old).with_name(f"step-{old:08d}.pt.json")):
                p.unlink(missing_ok=True)
        return path

    def verify(self, path: Path) -> str | None:
        """None when `path` is complete and matches its checksum, else what is wrong."""
        side = path.with_name(path.name + ".json")
        if not side.is_file():
            return "no checksum file (the save was interrupted)"
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError) as e:
            return f"unreadable checksum file ({e})"
        size = path.stat().st_size
        if size != meta.get("bytes"):
            return f"truncated: {size} bytes, expected {meta.get('bytes')}"
        if sha256_file(path) != meta.get("sha256"):
            return "checksum mismatch (the file is corrupt)"
        return None

    def load_latest(
        self, map_location: str | torch.device = "cpu"
    ) -> tuple[int, dict[str, Any]] | None:
        """The newest checkpoint that verifies and loads, as (step, state); None when none exist.

        Damaged checkpoints are skipped with a warning naming them and the reason.

        Raises:
            CheckpointError: checkpoints exist but none of them is usable.
        """
        steps = self.steps()
        problems = []
        for step in reversed(steps):
            path = self.path_for(step)
            problem = self.verify(path)
            if problem is None:
                try:
                    state = torch.load(path, map_location=map_location, weights_only=True)
                    return step, state
                except Exception as e:
                    problem = f"cannot be loaded ({type(e).__name__}: {e})"
            problems.append(f"{path.name}: {problem}")
            log.warning("skipping checkpoint %s: %s; falling back to the one before", path, problem)
        if steps:
            raise CheckpointError(f"no usable checkpoint in {self.folder}: " + "; ".join(problems))
        return None


def rng_state() -> dict[str, Any]:
    """torch RNG states (CPU and CUDA). NumPy/Python RNGs are not used for training randomness:
    data augmentation draws from per-sample generators seeded by (seed, epoch, index)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
