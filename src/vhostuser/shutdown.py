"""Clean exit on SIGTERM/SIGINT without raising from a signal handler.

The handler only records the signal; `signal.set_wakeup_fd` makes it readable on a pipe,
and the places where the daemon blocks (accept, the next message, a connect retry) wait
on that pipe too and raise Shutdown there, between two requests, never inside one.
"""

from __future__ import annotations

import os
import select
import signal


class Shutdown(Exception):
    pass


class StopSignal:
    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)):
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.signum: int | None = None
        signal.set_wakeup_fd(self._w)
        for s in signals:
            signal.signal(s, self._record)

    def _record(self, signum: int, _frame: object) -> None:
        self.signum = signum

    def fds(self) -> tuple[int, int]:
        return self._r, self._w

    def wait(self, fd: int, timeout: float | None = None) -> bool:
        """Wait until `fd` is readable (True) or `timeout` passes (False); raise Shutdown
        if a stop signal came first."""
        ready, _, _ = select.select([fd, self._r], [], [], timeout)
        if self._r in ready or self.signum is not None:
            name = signal.Signals(self.signum).name if self.signum else "signal"
            raise Shutdown(name)
        return bool(ready)

    def sleep(self, seconds: float) -> None:
        ready, _, _ = select.select([self._r], [], [], seconds)
        if ready or self.signum is not None:
            raise Shutdown(signal.Signals(self.signum).name if self.signum else "signal")

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        os.close(self._r)
        os.close(self._w)
