"""Incremental framing of header + body messages with fds attached: bytes and fds in,
complete messages out. No I/O, no protocol knowledge beyond what `parse` says.

Both vhost-user and vfio-user frame a message as a fixed-size header that gives the body's
size, and attach a message's fds to the sendmsg that carries its first byte. A reader asks
`want()` bytes at most, so one read never spans two messages and the fds that come with it
belong to the message in progress (the rule `feed` applies to any split it is given).

A header that `parse` rejects poisons the framer: the stream cannot be resynchronised, so
the connection must go. Fds of a message not yet complete, and of complete messages not
yet taken, belong to the framer until `close`.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

H = TypeVar("H")


@dataclass
class Frame(Generic[H]):
    header: H
    body: bytes
    fds: list[int] = field(default_factory=list)


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Framer(Generic[H]):
    def __init__(self, header_size: int, parse: Callable[[bytes], tuple[H, int]],
                 max_fds: int, too_many_fds: Callable[[str], Exception]) -> None:
        """`parse(header bytes) -> (header, body size)` raises on a bad header;
        `too_many_fds(message)` makes the error for a message with more than `max_fds`."""
        self.header_size = header_size
        self.parse = parse
        self.max_fds = max_fds
        self.too_many_fds = too_many_fds
        self._buf = bytearray()
        self._need = header_size
        self._header: H | None = None
        self._fds: list[int] = []
        self._done: deque[Frame[H]] = deque()
        self._error: Exception | None = None

    def want(self) -> int:
        """Bytes still needed to finish the header or body in progress."""
        return self._need - len(self._buf)

    @property
    def partial(self) -> bool:
        """Whether part of a message (bytes or fds) is buffered."""
        return bool(self._buf) or self._header is not None or bool(self._fds)

    def feed(self, data: bytes | bytearray | memoryview, fds: Iterable[int] = ()) -> None:
        """Take bytes from the stream and the fds that came with them. Raises what `parse`
        raises, or the too-many-fds error; the framer is unusable after that (its fds and
        the offending ones are closed)."""
        fds = list(fds)
        if self._error is not None:
            close_fds(fds)
            raise self._error
        self._fds += fds
        try:
            if len(self._fds) > self.max_fds:
                raise self.too_many_fds(f"more than {self.max_fds} fds attached to one message")
            view = memoryview(data)
            while view:
                take = min(len(view), self._need - len(self._buf))
                self._buf += view[:take]
                view = view[take:]
                if len(self._buf) == self._need:
                    self._complete_piece()
        except Exception as e:
            self._error = e
            self.close()
            raise

    def _complete_piece(self) -> None:
        if self._header is None:
            header, size = self.parse(bytes(self._buf))
            self._buf.clear()
            if size:
                self._header, self._need = header, size
                return
            body = b""
        else:
            header, body = self._header, bytes(self._buf)
        self._done.append(Frame(header, body, self._fds))
        self._fds = []
        self._buf = bytearray()
        self._header, self._need = None, self.header_size

    def pop(self) -> Frame[H] | None:
        """The next complete message (its fds are the caller's now), or None."""
        return self._done.popleft() if self._done else None

    def close(self) -> None:
        """Close every fd the framer holds (partial and untaken messages)."""
        close_fds(self._fds)
        self._fds = []
        while self._done:
            close_fds(self._done.popleft().fds)
