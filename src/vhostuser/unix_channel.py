"""vhost-user messages over an AF_UNIX stream socket, fds passed with SCM_RIGHTS.

The sender attaches fds to the sendmsg carrying the first header byte; the framing is
`vhost_user_framer` (a 12-byte header, then exactly `size` bytes), the non-blocking socket
work `sockets.FramedSocket`. Used by both sides: the back-end's transport, our front-end,
the tracer, the bridge.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from .framer import Framer
from .protocol import HEADER_SIZE, MAX_FDS, Header, Message, ProtocolError, decode_header, encode
from .shutdown import StopSignal
from .sockets import FramedSocket

Idle = tuple[float, Callable[[], None]]  # (seconds, what to call when that long idle)


def vhost_user_framer() -> Framer[Header]:
    """The framing of vhost-user messages: a 12-byte header giving the body's size, up to
    MAX_FDS fds on the first byte."""
    def parse(data: bytes) -> tuple[Header, int]:
        header = decode_header(data)
        return header, header.size
    return Framer(HEADER_SIZE, parse, MAX_FDS, ProtocolError)


class UnixChannel:
    """Framed vhost-user messages over a connected stream socket, which it makes
    non-blocking. Event loops call `poll` when the socket is readable, `flush` when it is
    writable (while `wants_write`), and `check` now and then; a loop that serves this
    connection alone uses `recv_raw` and `send`, which wait, on this socket and the stop
    signal only, within the message timeout."""

    def __init__(self, sock: socket.socket, stop: StopSignal | None = None, *,
                 timeout: float | None = None,
                 message_timeout: float | None = None) -> None:
        """`timeout`: how long `recv_raw` waits for a message (None: forever)."""
        self.sock = sock
        self.stream = FramedSocket(sock, vhost_user_framer(), message_timeout=message_timeout)
        self.stop = stop
        self.timeout = timeout

    def fileno(self) -> int:
        return self.sock.fileno()

    def fds(self) -> list[int]:
        return [self.sock.fileno()]  # workers hold the connection (engine/worker.py)

    def poll(self, limit: int = 64) -> list[tuple[Header, bytes, list[int]]]:
        """The messages that have arrived, without blocking (at most `limit`). PeerClosed
        at EOF, ProtocolError on a bad header (the connection must go)."""
        self.stream.read(limit)
        out = []
        while (frame := self.stream.pop()) is not None:
            out.append((frame.header, frame.body, frame.fds))
        return out

    def recv_raw(self, idle: Idle | None = None) -> tuple[Header, bytes, list[int]]:
        """One message as (validated header, body, fds). Raises PeerClosed at EOF,
        ProtocolError on a bad header, PeerStalled when the peer leaves a message half sent
        for longer than the message timeout, TimeoutError after `timeout` with no message.
        `idle` = (seconds, fn): call fn every that many seconds while no message comes."""
        frame = self.stream.recv(self.timeout, self.stop, idle)
        return frame.header, frame.body, frame.fds

    def send(self, msg: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send `msg` (with `fds`, or else the message's own), waiting (within the message
        timeout) until the peer has taken it."""
        self.stream.send_waiting(encode(msg), fds or msg.fds, self.stop)

    def send_nowait(self, msg: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send `msg` as far as the socket takes it; the rest waits for `flush`."""
        self.stream.send(encode(msg), fds or msg.fds)

    def send_bytes(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """An already encoded (or deliberately broken) message, waiting as `send` does."""
        self.stream.send_waiting(data, fds, self.stop)

    @property
    def wants_write(self) -> bool:
        return self.stream.wants_write

    def flush(self) -> None:
        self.stream.flush()

    def check(self, now: float | None = None, reading: bool = True) -> None:
        self.stream.check(now, reading)

    def deadline(self) -> float | None:
        return self.stream.deadline()

    def close(self) -> None:
        self.stream.close()
