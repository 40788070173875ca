"""Log lines an untrusted peer can cause at will, without letting it flood the log: the
first few of each minute one by one, then a count now and then."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class Limited:
    """`log(...)` logs the first `first` calls of every `period` seconds one by one (the
    period starting at the first call after the last one ended), and of the rest every
    `every`-th; a line that comes after calls left out says how many there were so far.
    Threads may share one (the count is kept under a lock)."""

    def __init__(self, logger: logging.Logger, first: int = 10, every: int = 1000,
                 period: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.first, self.every, self.period = logger, first, every, period
        self.count = 0  # calls so far
        self._clock = clock
        self._start = float("-inf")  # when this period started
        self._shown = 0  # lines logged one by one in it
        self._hidden = 0  # calls left out since the last line
        self._lock = threading.Lock()

    def log(self, level: int, msg: str, *args: object) -> None:
        now = self._clock()
        with self._lock:
            self.count += 1
            count, hidden = self.count, self._hidden
            if now - self._start >= self.period:
                self._start, self._shown = now, 0
            if self._shown < self.first:
                self._shown += 1
            elif count % self.every:
                self._hidden += 1
                return
            self._hidden = 0
        if hidden:
            self.logger.log(level, msg + " (%d times so far)", *args, count)
        else:
            self.logger.log(level, msg, *args)
