"""Log lines an untrusted peer can cause at will, without letting it flood the log: the
first few one by one, then a count now and then."""

from __future__ import annotations

import logging


class Limited:
    """`log(...)` logs the first `first` calls, then every `every`-th with its count."""

    def __init__(self, logger: logging.Logger, first: int = 10, every: int = 1000) -> None:
        self.logger, self.first, self.every = logger, first, every
        self.count = 0

    def log(self, level: int, msg: str, *args: object) -> None:
        self.count += 1
        if self.count <= self.first:
            self.logger.log(level, msg, *args)
        elif self.count % self.every == 0:
            self.logger.log(level, "%s (%d times so far)", msg % args, self.count)
