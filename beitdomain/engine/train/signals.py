"""SIGINT/SIGTERM during training: the last finished step is checkpointed at once, then the run
stops; a second signal stops at once.

A step can take minutes (a GPU-size recipe on a CPU), and a scheduler's grace period after
SIGTERM is often 30 s. Python runs a signal handler only between bytecodes of the main thread,
so a handler alone would wait for a backward pass that is one long C++ call. The C-level handler
also writes the signal's number to a wakeup fd (`signal.set_wakeup_fd`); a watcher thread reading
it is woken at once, while the main thread is still inside that call, and writes the checkpoint
(the trainer keeps what the last finished step left, see `Trainer._snapshot`).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class stop_on_signals:
    """Turns SIGINT/SIGTERM into `flag`, plus two callbacks (main thread only; elsewhere a no-op).

    Args:
        flag: set by the first signal.
        on_signal: called by the first signal's handler in the main thread, at its next bytecode;
            may raise to stop there (the trainer does so outside an optimizer update).
        on_wakeup: called once, from a watcher thread, as soon as the first signal arrives, even
            while the main thread is inside a long C call.
    """

    def __init__(
        self,
        flag: threading.Event,
        on_signal: Callable[[int], None] | None = None,
        on_wakeup: Callable[[int], None] | None = None,
    ) -> None:
        self.flag = flag
        self.on_signal = on_signal
        self.on_wakeup = on_wakeup
        self.previous: dict[int, Any] = {}
        self._fds: tuple[int, int] | None = None
        self._previous_fd = -1
        self._watcher: threading.Thread | None = None
        self._closing = threading.Event()

    def __enter__(self) -> stop_on_signals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        if self.on_wakeup is not None:
            r, w = os.pipe()
            os.set_blocking(w, False)  # the C handler must never block on a full pipe
            self._fds = (r, w)
            self._previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self._watcher = threading.Thread(
                target=self._watch, name="beitdomain-signal-watcher", daemon=True
            )
            self._watcher.start()
        return self

    def _watch(self) -> None:
        assert self._fds is not None and self.on_wakeup is not None
        r = self._fds[0]
        while not self._closing.is_set():
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if not data:
                return
            sigs = [b for b in data if b in STOP_SIGNALS]
            if sigs and not self._closing.is_set():
                self.on_wakeup(sigs[0])
                return  # once: a second signal is the handler's business (stop at once)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.flag.is_set():  # second signal: stop now
            raise KeyboardInterrupt
        self.flag.set()
        if self.on_signal is not None:
            self.on_signal(signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self._fds is not None:
            signal.set_wakeup_fd(self._previous_fd)
            self._closing.set()
            r, w = self._fds
            try:
                os.write(w, b"\0")  # wakes the watcher if it still waits
            except OSError:
                pass
            if self._watcher is not None:
                self._watcher.join()  # a checkpoint it is writing is finished first
            os.close(w)
            os.close(r)
            self._fds = None
