"""A map over files in worker processes, in order, with a progress bar: what scanning a folder
and building a cache both do."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def parallel_map(
    fn: Callable[[Any], T],
    items: Sequence[Any],
    *,
    workers: int,
    progress: bool,
    description: str,
    chunksize: int | None = None,
) -> Iterator[T]:
    """`fn(item)` for each item, in order, in `workers` spawned processes (0: in this one).

    Leaving the loop early (an error, Ctrl-C) cancels the items not yet started.

    Args:
        fn: a picklable (module-level) function.
        items: its arguments, one per call.
        workers: processes; 0, or a single item, runs in this process.
        progress: show a progress bar labelled `description`.
        chunksize: items per task sent to a worker; default a few tasks per worker, <= 64.
    """
    pool = None
    if workers > 0 and len(items) > 1:
        import multiprocessing as mp

        # spawn: safe even when the parent already holds threads (torch, BLAS).
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
        chunk = chunksize or max(1, min(64, len(items) // (4 * workers)))
        results: Iterator[T] = pool.map(fn, items, chunksize=chunk)
    else:
        results = map(fn, items)
    try:
        if progress:  # a bar on a terminal, plain log lines in batch jobs; stderr either way
            from beitdomain.progress import track

            results = track(results, total=len(items), description=description)
        yield from results
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
