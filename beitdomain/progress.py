"""Progress that fits a terminal and a batch job alike, always on stderr.

On a terminal: rich progress bars. When stderr is a file or a pipe (SLURM, nohup, CI), a bar
draws nothing until it ends, so instead a plain line is logged every `BEITDOMAIN_LOG_EVERY`
seconds (default 30): what, step/total, loss, img/s, elapsed and ETA. stdout stays for results,
so `beitdomain data scan DIR > summary.txt` captures the summary and nothing else.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("beitdomain.progress")

ENV_INTERVAL = "BEITDOMAIN_LOG_EVERY"  # seconds between plain progress lines off a terminal


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def log_interval() -> float:
    """Seconds between plain progress lines (`BEITDOMAIN_LOG_EVERY`, default 30)."""
    try:
        return max(0.0, float(os.environ.get(ENV_INTERVAL, "30")))
    except ValueError:
        return 30.0


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def format_duration(seconds: float) -> str:
    """`75` -> `1m15s`, `4000` -> `1h06m`, `200000` -> `2d07h`: the ETA format of the logs."""
    s = round(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 2 * 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


class PlainLines:
    """Logs `desc step/total (pct) [loss] [img/s] elapsed ETA` at most every `interval` s."""

    def __init__(self, desc: str, total: int, start: int = 0, interval: float | None = None):
        self.desc, self.total, self.start = desc, total, start
        self.interval = log_interval() if interval is None else interval
        self.t0 = time.monotonic()
        self.last = self.t0
        # img/s over the time since the last printed line, weighted by time: the caller's value
        # covers a few steps, and one of them may hold a loader restart at an epoch's end.
        self._prev = self.t0
        self._ips_time = self._time = 0.0

    def line(self, done: int, loss: float | None = None, ips: float | None = None) -> str:
        elapsed = time.monotonic() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        parts = [f"{self.desc} {done}/{self.total} ({100 * done / max(1, self.total):.0f}%)"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if ips is not None:
            parts.append(f"{ips:,.0f} img/s")
        parts.append(f"elapsed {format_duration(elapsed)}")
        parts.append(f"ETA {format_duration(eta) if eta == eta else '?'}")
        return ", ".join(parts)

    def update(self, done: int, loss: float | None = None, ips: float | None = None) -> None:
        now = time.monotonic()
        if ips is not None:
            self._ips_time += ips * (now - self._prev)
            self._time += now - self._prev
        self._prev = now
        if done >= self.total or now - self.last >= self.interval:
            self.last = now
            if ips is not None and self._time > 0:
                ips = self._ips_time / self._time
            self._ips_time = self._time = 0.0
            log.info("%s", self.line(done, loss, ips))


def track(items: Iterable[T], total: int, description: str, quiet: bool = False) -> Iterator[T]:
    """Yields `items`, showing progress on stderr: a bar on a terminal, plain lines elsewhere."""
    if quiet:
        yield from items
        return
    if stderr_is_terminal():
        from rich.progress import track as rich_track

        yield from rich_track(items, total=total, description=description, console=_console())
        return
    lines = PlainLines(description, total)
    for i, item in enumerate(items, 1):
        yield item
        lines.update(i)


class StepProgress:
    """The training loop's progress: a rich bar with loss, img/s and ETA on a terminal; plain
    log lines every `BEITDOMAIN_LOG_EVERY` seconds otherwise; nothing when `quiet`."""

    def __init__(self, desc: str, total: int, start: int, quiet: bool) -> None:
        self.quiet = quiet
        self.desc, self.total, self.start = desc, total, start
        self.bar: Any = None
        self.lines: PlainLines | None = None

    def __enter__(self) -> StepProgress:
        if self.quiet:
            return self
        if not stderr_is_terminal():
            self.lines = PlainLines(self.desc, self.total, self.start)
            return self
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[ips]} img/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
            console=_console(),
        )
        self.bar.__enter__()
        self.task = self.bar.add_task(
            self.desc, total=self.total, completed=self.start, loss="-", ips="-"
        )
        return self

    def update(self, step: int, loss: float | None, ips: float) -> None:
        if self.lines is not None:
            self.lines.update(step, loss, ips)
        elif self.bar is not None:
            self.bar.update(
                self.task,
                completed=step,
                loss=f"{loss:.4f}" if loss is not None else "-",
                ips=f"{ips:,.0f}",
            )

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


class CountProgress:
    """Progress over a count of units (the curve's cells, the baselines' fits): a rich bar on
    a terminal, plain `desc done/total, elapsed, ETA` lines every `BEITDOMAIN_LOG_EVERY` seconds
    (and at the end) otherwise, nothing when `quiet`. `start` units were done before (a resumed
    run): the ETA counts only the rate of this run's own."""

    def __init__(self, desc: str, total: int, start: int = 0, quiet: bool = False) -> None:
        self.desc, self.total, self.done, self.quiet = desc, total, start, quiet
        self.bar: Any = None
        self.lines: PlainLines | None = None

    def __enter__(self) -> CountProgress:
        if self.quiet:
            return self
        if not stderr_is_terminal():
            self.lines = PlainLines(self.desc, self.total, self.done)
            log.info("%s", self.lines.line(self.done))  # the count before the first unit ends
            return self
        from rich.progress import Progress

        self.bar = Progress(console=_console())
        self.bar.__enter__()
        self.task = self.bar.add_task(self.desc, total=self.total, completed=self.done)
        return self

    def describe(self, text: str) -> None:
        """What is running now (the bar's label on a terminal; the plain lines keep `desc`)."""
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.lines is not None:
            self.lines.update(self.done)
        elif self.bar is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
