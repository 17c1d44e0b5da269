"""A run's metrics log: `metrics.jsonl`, one JSON object per logged step, and reading it back."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from beitdomain.engine.run.trackers import numeric, open_trackers
from beitdomain.fileio import atomic_write_text

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON object per logged step to `metrics.jsonl`, and to any trackers asked for.

    On resume the lines past the resumed step are dropped first, so a run that was killed after
    logging step 130 but checkpointing step 100 does not log steps 101-130 twice. Trackers
    (TensorBoard, MLflow, W&B: `beitdomain.engine.run.trackers`) get the same numbers; one that is
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

        self.path = Path(path)
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        names = [*(["tensorboard"] if tensorboard else []), *trackers]
        self._trackers = open_trackers(names, self.path.parent, config=config) if names else []

    def log(self, step: int, **values: Any) -> None:

        record = {"step": step, **{k: _as_number(v) for k, v in values.items()}}
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


def _as_number(v: Any) -> Any:
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
