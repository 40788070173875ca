"""Clean exit on SIGTERM/SIGINT without raising from a signal handler.

The handler only records the signal; `signal.set_wakeup_fd` makes it readable on a pipe,
and the places where the daemon blocks (accept, the next message, a connect retry) wait
on that pipe too and raise Shutdown there, between two requests, never inside one.
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Callable


class Shutdown(Exception):
    pass


def readable(fds: list[int], timeout: float | None) -> list[int]:
    """Those of `fds` that are readable (or hung up) within `timeout` seconds (None: no
    limit). poll, not select: fds may be numbered past FD_SETSIZE."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(None if timeout is None else max(0.0, timeout) * 1000)]


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
        ready = readable([fd, self._r], timeout)
        if self._r in ready or self.signum is not None:
            name = signal.Signals(self.signum).name if self.signum else "signal"
            raise Shutdown(name)
        return bool(ready)

    def check(self) -> None:
        """Raise Shutdown if a stop signal has come (its byte on the pipe counts too: the
        Python-level handler may not have run yet)."""
        try:
            data = os.read(self._r, 16)
        except BlockingIOError:
            data = b""
        signum = self.signum if self.signum is not None else (data[-1] if data else None)
        if signum is not None:
            raise Shutdown(signal.Signals(signum).name)

    def sleep(self, seconds: float) -> None:
        ready = readable([self._r], seconds)
        if ready or self.signum is not None:
            raise Shutdown(signal.Signals(self.signum).name if self.signum else "signal")

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        os.close(self._r)
        os.close(self._w)


class Watch:
    """The fds an event loop waits on and what to do when each is readable, the stop
    signal's pipe among them. Loops build a new one whenever the set changes, and a
    handler that changes it (closes an fd) calls `invalidate`: the rest of that round is
    skipped, so no handler runs for an fd that was closed, or reused, meanwhile (the fds
    are level-triggered: what was skipped is seen again by the next watch)."""

    def __init__(self, stop: StopSignal) -> None:
        self.poller = select.poll()
        self.handlers: dict[int, Callable[[], None]] = {}
        self.stale = False
        self.add(stop.fds()[0], stop.check)

    def invalidate(self) -> None:
        self.stale = True

    def add(self, fd: int, fn: Callable[[], None], write: bool = False,
            read: bool = True) -> None:
        """Call `fn` when `fd` is readable (if `read`), writable (if `write`) or hung up."""
        self.poller.register(fd, (select.POLLIN if read else 0)
                             | (select.POLLOUT if write else 0))
        self.handlers[fd] = fn

    def dispatch(self, timeout_ms: int) -> None:
        """Wait up to `timeout_ms` (-1: forever) and run the handlers of ready fds."""
        for fd, _ev in self.poller.poll(timeout_ms):
            if self.stale:
                return
            fn = self.handlers.get(fd)
            if fn is not None:
                fn()
