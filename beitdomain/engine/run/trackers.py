"""Experiment trackers behind one interface: TensorBoard, MLflow, Weights & Biases.

`metrics.jsonl` is always written (`MetricsLog`); a recipe may also send every logged record to
the trackers a team already runs (`train.trackers: [tensorboard, mlflow, wandb]`). Each is an
optional extra: one that is asked for but not installed is a warning naming the package, never
a failed run, and the run goes on with the others.

- tensorboard: event files in `<run>/tensorboard` (`pip install tensorboard`).
- mlflow: a run in `MLFLOW_TRACKING_URI`, or in a local file store `<run>/mlruns` when unset
  (`pip install mlflow-skinny`); the recipe is logged as parameters.
- wandb: a W&B run in project `WANDB_PROJECT` (default `beitdomain`), files under `<run>/wandb`;
  offline unless `WANDB_MODE` says otherwise or `WANDB_API_KEY` is set, so a cluster node
  without network never blocks (`wandb sync` uploads later) (`pip install wandb`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "mlflow", "wandb")
_INSTALL = {
    "tensorboard": "pip install tensorboard",
    "mlflow": "pip install mlflow-skinny",
    "wandb": "pip install wandb",
}


class Tracker(Protocol):
    """Receives every record written to metrics.jsonl (numbers only)."""

    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


class TensorBoardTracker:
    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder / "tensorboard"))

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    def __init__(self, folder: Path, name: str, config: Mapping[str, Any] | None) -> None:
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # No server named: a file store inside the run folder, which needs no database
            # driver (mlflow-skinny has none); MLflow 3 wants that choice made explicitly.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((folder / "mlruns").resolve().as_uri())
        self.run = mlflow.start_run(run_name=name)
        if config:
            # MLflow caps a parameter value at a few hundred characters; recipes stay well below.
            params = {k: str(v)[:500] for k, v in _flatten(config).items()}
            mlflow.log_params(params)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.mlflow.log_metrics(dict(values), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class WandbTracker:
    def __init__(self, folder: Path, name: str, config: Mapping[str, Any] | None) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or (
            "online" if os.environ.get("WANDB_API_KEY") else "offline"
        )
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "beitdomain"),
            name=name,
            dir=str(folder),
            config=dict(config or {}),
            mode=mode,
            reinit="finish_previous",
        )

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(
    names: Sequence[str],
    folder: str | Path,
    *,
    run_name: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> list[Tracker]:
    """The trackers in `names` that can start; a missing package is a warning, not an error.

    Raises:
        ValueError: an unknown tracker name (the recipe check names the valid ones first).
    """
    folder = Path(folder)
    name = run_name or folder.name
    out: list[Tracker] = []
    for tracker in dict.fromkeys(names):  # once each, in order
        if tracker not in TRACKERS:
            raise ValueError(f"unknown tracker {tracker!r}; valid: {', '.join(TRACKERS)}")
        try:
            if tracker == "tensorboard":
                out.append(TensorBoardTracker(folder))
            elif tracker == "mlflow":
                out.append(MLflowTracker(folder, name, config))
            else:
                out.append(WandbTracker(folder, name, config))
        except ImportError as e:
            log.warning(
                "%s was asked for but is not installed (%s): metrics go to metrics.jsonl "
                "only. Install it with `%s`.",
                tracker,
                e,
                _INSTALL[tracker],
            )
    return out


def numeric(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record, without its step (what trackers take)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
