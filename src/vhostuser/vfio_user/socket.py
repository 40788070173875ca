"""vfio-user messages over an AF_UNIX stream socket, fds passed with SCM_RIGHTS.

The sender attaches the fds to the sendmsg that carries the first byte of the header (as
QEMU and libvfio-user do), so a reader receives the 16-byte header with room for
`max_fds` fds, then exactly ``header.size - 16`` more bytes. Nothing here interprets a
payload beyond what `protocol` does.
"""

from __future__ import annotations

import os
import socket
from itertools import count

from ..shutdown import StopSignal
from ..transport.unix import PeerClosed, connect, listen, recv_exact, recv_with_fds, send_with_fds
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

__all__ = ["PeerClosed", "VfioUserChannel", "close_fds", "connect", "listen"]


def close_fds(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


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
    ) -> None:
        self.sock = sock
        self.max_fds = max_fds
        self.max_size = max_size
        self.stop = stop
        self._ids = count()

    def fileno(self) -> int:
        return self.sock.fileno()

    def next_msg_id(self) -> int:
        """A msg_id for the next command this side sends (wraps at 16 bits)."""
        return next(self._ids) & 0xFFFF

    # -- receiving

    def recv_raw(self) -> tuple[Header, bytes, list[int]]:
        """One message as (validated header, body, fds). Raises PeerClosed at EOF (also in
        the middle of a message) and VfioUserError on a bad header (its fds are closed)."""
        if self.stop is not None:
            self.stop.wait(self.sock.fileno())
        data, fds = recv_with_fds(self.sock, HEADER_SIZE, self.max_fds, BadFdCount)
        try:
            header = decode_header(data, self.max_size)
            body = self._recv_exact(header.body_size)
        except BaseException:
            close_fds(fds)
            raise
        return header, body, fds

    def _recv_exact(self, n: int) -> bytes:
        return recv_exact(self.sock, n)

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
        """Send ``msg`` with ``fds`` attached to its first byte."""
        if len(fds) > self.max_fds:
            raise ValueError(f"{len(fds)} fds in one message, at most {self.max_fds}")
        self.send_bytes(encode(msg), fds)

    def send_bytes(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send an already encoded message (or a deliberately broken one, in tests)."""
        send_with_fds(self.sock, data, fds)

    def close(self) -> None:
        self.sock.close()
