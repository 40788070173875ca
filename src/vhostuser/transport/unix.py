"""vhost-user over an AF_UNIX stream socket, fds passed with SCM_RIGHTS.

The sender attaches fds to the sendmsg carrying the first header byte, so a reader
receives the 12-byte header with room for MAX_FDS fds, then exactly `size` bytes more.
"""

from __future__ import annotations

import array
import logging
import os
import select
import socket
import stat
import time
from collections.abc import Callable, Iterator

from ..engine.notify import EventfdNotifier, Notifier
from ..memory import MemoryTableError, mmap_region
from ..protocol import HEADER_SIZE, MAX_FDS, Header, Message, ProtocolError, decode_header, encode
from ..protocol.payloads import MemRegion
from ..shutdown import StopSignal

log = logging.getLogger(__name__)

Idle = tuple[float, Callable[[], None]]  # (seconds, what to call when that long idle)

_INT_SIZE = array.array("i").itemsize


class PeerClosed(Exception):
    """The peer closed the connection."""


def recv_with_fds(sock: socket.socket, n: int, max_fds: int,
                  too_many: type[ProtocolError] = ProtocolError) -> tuple[bytes, list[int]]:
    """The first `n` bytes of a message (its header) and the fds attached to them, with
    room for `max_fds` (both vhost-user and vfio-user attach them to the first byte).
    PeerClosed at EOF; `too_many` if the kernel had to drop fds (those that came are
    closed, as they are on any error here)."""
    data, anc, flags, _ = sock.recvmsg(n, socket.CMSG_SPACE(max_fds * _INT_SIZE))
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % _INT_SIZE])
            fds.extend(arr)
    try:
        if flags & socket.MSG_CTRUNC:
            raise too_many(f"more than {max_fds} fds attached to one message")
        if not data:
            raise PeerClosed()
        if len(data) < n:
            data += recv_exact(sock, n - len(data))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return data, fds


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...]) -> None:
    """Send `data` with `fds` attached to its first byte (SCM_RIGHTS)."""
    anc = []
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes from a stream socket; PeerClosed if it ends first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise PeerClosed()
        got += k
    return bytes(buf)


class UnixChannel:
    """Framed vhost-user messages over a connected stream socket."""

    def __init__(self, sock: socket.socket, stop: StopSignal | None = None) -> None:
        self.sock = sock
        self.stop = stop

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_raw(self, idle: Idle | None = None) -> tuple[Header, bytes, list[int]]:
        """One message as (validated header, body, fds). Raises PeerClosed at EOF and
        ProtocolError on a bad header (its fds are closed). `idle` = (seconds, fn): call
        fn every that many seconds while no message comes."""
        if idle is not None:
            interval, fn = idle
            while not self._readable(interval):
                fn()
        elif self.stop is not None:
            self.stop.wait(self.sock.fileno())
        data, fds = recv_with_fds(self.sock, HEADER_SIZE, MAX_FDS)
        try:
            header = decode_header(data)
            body = self._recv_exact(header.size)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return header, body, fds

    def _recv_exact(self, n: int) -> bytes:
        return recv_exact(self.sock, n)

    def _readable(self, timeout: float) -> bool:
        if self.stop is not None:
            return self.stop.wait(self.sock.fileno(), timeout)
        return bool(select.select([self.sock], [], [], timeout)[0])

    def send(self, msg: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
        send_with_fds(self.sock, encode(msg), fds)

    def close(self) -> None:
        self.sock.close()


class UnixResources:
    """Resources for the engine when they arrive as fds."""

    max_mem_slots = 509

    def map_region(self, desc: MemRegion, res: int) -> object:
        return mmap_region(desc, res)

    def kick_fd(self, res: int | None) -> int | None:
        if res is not None:
            os.set_blocking(res, False)
        return res

    def notifier(self, res: int) -> Notifier:
        return EventfdNotifier(res)

    def backend_channel(self, res: int) -> UnixChannel:
        try:
            return UnixChannel(socket.socket(fileno=res))
        except OSError as e:
            os.close(res)
            raise MemoryTableError(f"the back-end channel is not a socket: {e}") from e

    def close(self, res: int) -> None:
        try:
            os.close(res)
        except OSError:
            pass


def listen(path: str) -> socket.socket:
    """Listen on `path`, replacing a stale socket file (not any other kind of file). The
    path appears only once the socket listens (bound under a temporary name, then
    renamed), so a client that sees it can connect at once."""
    if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    tmp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        sock.bind(tmp)
        sock.listen(1)
        os.rename(tmp, path)
    except OSError:
        sock.close()
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return sock


def connect(path: str, retry_for: float | None = None, interval: float = 0.1,
            stop: StopSignal | None = None) -> socket.socket:
    """Connect to a front-end that listens; retry until `retry_for` seconds pass
    (forever if None)."""
    deadline = None if retry_for is None else time.monotonic() + retry_for
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError as e:
            sock.close()
            if deadline is not None and time.monotonic() > deadline:
                raise ConnectionError(f"cannot connect to {path}: {e}") from e
            if stop is not None:
                stop.sleep(interval)
            else:
                time.sleep(interval)


def connections(*, path: str | None = None, fd: int | None = None, client: bool = False,
                once: bool = False, stop: StopSignal | None = None) -> Iterator[socket.socket]:
    """Front-end connections, one after the other.

    - `path` (server): listen and accept, again after each disconnect.
    - `path`, `client=True`: connect to a listening front-end, reconnecting after each.
    - `fd`: an inherited socket; a listening one is accepted on, a connected one is used
      once.
    """
    from ..engine.worker import parent_only_fds

    if fd is not None:
        sock = socket.socket(fileno=fd)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            parent_only_fds.add(fd)
            yield from _accepting(sock, once, stop)
        else:  # a connection: workers hold it too (engine/worker.py)
            yield sock
        return
    if path is None:
        raise ValueError("a socket path or an fd is needed")
    if client:
        while True:
            yield connect(path, stop=stop)
            if once:
                return
    listener = listen(path)
    parent_only_fds.add(listener.fileno())
    try:
        yield from _accepting(listener, once, stop)
    finally:
        parent_only_fds.discard(listener.fileno())
        listener.close()
        try:
            os.unlink(path)
        except OSError:
            pass


def _accepting(listener: socket.socket, once: bool,
               stop: StopSignal | None) -> Iterator[socket.socket]:
    while True:
        if stop is not None:
            stop.wait(listener.fileno())
        conn, _ = listener.accept()
        yield conn
        if once:
            return
