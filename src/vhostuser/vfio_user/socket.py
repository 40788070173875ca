"""vfio-user messages over an AF_UNIX stream socket, fds passed with SCM_RIGHTS.

The sender attaches the fds to the sendmsg that carries the first byte of the header (as
QEMU and libvfio-user do); the framing is a 16-byte header whose size field gives the
whole message's length (`vfio_user_framer`), the non-blocking socket work
`sockets.FramedSocket`. Nothing here interprets a payload beyond what `protocol` does.
"""

from __future__ import annotations

import socket
from itertools import count

from ..framer import Framer, close_fds
from ..shutdown import StopSignal
from ..sockets import FramedSocket, PeerClosed, PeerStalled, connect, listen
from .protocol import (
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER_SIZE,
    MAX_MSG_FDS,
    BadFdCount,
    Header,
    Message,
    Peer,
    VfioUserError,
    decode_command,
    decode_header,
    decode_reply,
    encode,
)

__all__ = ["PeerClosed", "PeerStalled", "VfioUserChannel", "close_fds", "connect", "listen",
           "vfio_user_framer"]


def vfio_user_framer(max_fds: int = MAX_MSG_FDS,
                     max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Framer[Header]:
    def parse(data: bytes) -> tuple[Header, int]:
        header = decode_header(data, max_size)
        return header, header.body_size
    return Framer(HEADER_SIZE, parse, max_fds, BadFdCount)


class VfioUserChannel:
    """Framed vfio-user messages over a connected stream socket.

    ``max_fds`` is the room left for fds on each message: what this side advertises as
    ``max_msg_fds``. ``max_size`` bounds a whole message (see
    `protocol.max_message_size`). Received fds belong to the caller, who must close them;
    on any error the fds of the offending message are closed here.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_fds: int = MAX_MSG_FDS,
        max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        stop: StopSignal | None = None,
        timeout: float | None = None,
        message_timeout: float | None = None,
    ) -> None:
        self.sock = sock
        self.max_fds = max_fds
        self.max_send_fds = MAX_MSG_FDS  # what the peer takes (its max_msg_fds, if known)
        self.max_size = max_size
        self.stop = stop
        self.timeout = timeout  # how long recv_raw waits for a message (None: forever)
        self.stream = FramedSocket(sock, vfio_user_framer(max_fds, max_size),
                                   message_timeout=message_timeout)
        self._ids = count()

    def fileno(self) -> int:
        return self.sock.fileno()

    def next_msg_id(self) -> int:
        """A msg_id for the next command this side sends (wraps at 16 bits)."""
        return next(self._ids) & 0xFFFF

    # -- receiving

    def poll(self) -> tuple[Header, bytes, list[int]] | None:
        """The next message if one has arrived, without blocking. PeerClosed at EOF,
        VfioUserError on a bad header (the connection must go)."""
        self.stream.read(1)
        frame = self.stream.pop()
        return None if frame is None else (frame.header, frame.body, frame.fds)

    def recv_raw(self) -> tuple[Header, bytes, list[int]]:
        """One message as (validated header, body, fds). Raises PeerClosed at EOF (also in
        the middle of a message), VfioUserError on a bad header (its fds are closed),
        PeerStalled if the peer leaves a message half sent for too long, TimeoutError after
        `timeout` with no message."""
        frame = self.stream.recv(self.timeout, self.stop)
        return frame.header, frame.body, frame.fds

    def recv_command(
        self, *, sender: Peer = Peer.CLIENT, max_data_xfer_size: int | None = None
    ) -> tuple[Message, list[int]]:
        """The next message, which must be a command from ``sender``. On a VfioUserError
        raised after the header arrived, ``exc.header`` tells whom to send the error reply
        (`protocol.error_reply(exc.header, exc.errno)`); the fds are closed."""
        header, body, fds = self.recv_raw()
        try:
            msg = decode_command(
                header, body, len(fds), sender=sender, max_data_xfer_size=max_data_xfer_size
            )
        except VfioUserError:
            close_fds(fds)
            raise
        return msg, fds

    def recv_reply(
        self, request: Message, *, max_data_xfer_size: int | None = None
    ) -> tuple[Message, list[int]]:
        """The next message, which must be the reply to ``request``."""
        header, body, fds = self.recv_raw()
        try:
            msg = decode_reply(
                header, body, len(fds), request=request, max_data_xfer_size=max_data_xfer_size
            )
        except VfioUserError:
            close_fds(fds)
            raise
        return msg, fds

    # -- sending

    def send(self, msg: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send ``msg`` with ``fds`` attached to its first byte, waiting (within the message
        timeout) until the peer has taken it."""
        if len(fds) > self.max_fds:
            raise ValueError(f"{len(fds)} fds in one message, at most {self.max_fds}")
        self.send_bytes(encode(msg), fds)

    def send_bytes(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send an already encoded message (or a deliberately broken one, in tests)."""
        self.stream.send_waiting(data, fds, self.stop)

    def send_nowait(self, msg: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send as far as the socket takes it; the rest waits for `flush` (event loops)."""
        if len(fds) > self.max_send_fds:
            raise ValueError(f"{len(fds)} fds in one message, at most {self.max_send_fds}")
        self.stream.send(encode(msg), fds)

    @property
    def wants_write(self) -> bool:
        return self.stream.wants_write

    def flush(self) -> None:
        self.stream.flush()

    def check(self, now: float | None = None) -> None:
        self.stream.check(now)

    def deadline(self) -> float | None:
        return self.stream.deadline()

    def close(self) -> None:
        self.stream.close()
