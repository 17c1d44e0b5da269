"""SIGINT/SIGTERM during training: a flag the loop checks between steps, so that an interrupted
run first checkpoints its last finished step (a second signal stops at once)."""

from __future__ import annotations

import signal
import threading
from typing import Any


class stop_on_signals:
    """Turns SIGINT/SIGTERM into a flag checked between steps (main thread only)."""

    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.flag.is_set():  # second signal: stop now
            raise KeyboardInterrupt
        self.flag.set()

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
