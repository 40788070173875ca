"""vhost-user over an AF_UNIX stream socket, fds passed with SCM_RIGHTS.

The sender attaches fds to the sendmsg carrying the first header byte; the framing is
`vhost_user_framer` (a 12-byte header, then exactly `size` bytes), the non-blocking socket
work `sockets.FramedSocket`.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator

from ..engine.notify import EventfdNotifier, Notifier, is_eventfd
from ..framer import Framer
from ..memory import MemoryTableError, mmap_region
from ..protocol import HEADER_SIZE, MAX_FDS, Header, Message, ProtocolError, decode_header, encode
from ..protocol.payloads import MemRegion
from ..shutdown import StopSignal
from ..sockets import FramedSocket, PeerClosed, PeerStalled

log = logging.getLogger(__name__)

Idle = tuple[float, Callable[[], None]]  # (seconds, what to call when that long idle)

__all__ = ["PeerClosed", "PeerStalled", "UnixChannel", "UnixResources", "connect",
           "connections", "listen", "vhost_user_framer"]


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


def _require_eventfd(fd: int, what: str) -> None:
    if not is_eventfd(fd):
        raise MemoryTableError(f"the {what} fd is not an eventfd")


class UnixResources:
    """Resources for the engine when they arrive as fds."""

    max_mem_slots = 509
    shared_areas = True
    shared_log = True
    shared_state = True

    def map_region(self, desc: MemRegion, res: int) -> mmap.mmap:
        return mmap_region(desc, res)

    def new_area(self, size: int) -> tuple[int, mmap.mmap]:
        """A zeroed memfd of `size` bytes, sealed against resizing, and its mapping."""
        try:
            fd = os.memfd_create("vhost-user-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as e:
            raise MemoryTableError(f"cannot create a shared area: {e}") from e
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(fd)
            raise MemoryTableError(f"cannot create a shared area of {size} bytes: {e}") from e

    def map_area(self, res: int, size: int, offset: int) -> memoryview:
        """The `size` bytes at `offset` of the front-end's file `res` (checked as a memory
        region's are: a file too short for them is refused)."""
        mapping = mmap_region(MemRegion(0, size, 0, offset), res)
        return memoryview(mapping)[len(mapping) - size :]

    def state_file(self, data: bytes) -> int:
        """A memfd holding `data`, its offset at 0 (the front-end reads it to its end, or
        writes into it from there)."""
        try:
            fd = os.memfd_create("vhost-user-device-state", os.MFD_CLOEXEC)
        except OSError as e:
            raise MemoryTableError(f"cannot create a file for the device state: {e}") from e
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.lseek(fd, 0, os.SEEK_SET)
        except OSError as e:
            os.close(fd)
            raise MemoryTableError(f"cannot write the device state: {e}") from e
        return fd

    def read_state_file(self, res: int, limit: int) -> bytes:
        """The whole of the file `res` (the front-end may have written it anywhere, grown
        or shrunk it: its size counts, not the offset)."""
        try:
            size = os.fstat(res).st_size
            if size > limit:
                raise MemoryTableError(f"a device state of {size} bytes (at most {limit})")
            data = os.pread(res, size, 0)
        except OSError as e:
            raise MemoryTableError(f"cannot read the device state: {e}") from e
        if len(data) != size:
            raise MemoryTableError(f"the device state changed size while read ({size} "
                                   f"bytes, then {len(data)})")
        return data

    def check_kick(self, res: int) -> None:
        _require_eventfd(res, "kick")

    def kick_fd(self, res: int | None) -> int | None:
        if res is not None:
            os.set_blocking(res, False)
        return res

    def notifier(self, res: int) -> Notifier:
        try:
            _require_eventfd(res, "call/err")
            os.set_blocking(res, False)  # never block on a counter the front-end keeps full
        except (MemoryTableError, OSError):
            os.close(res)
            raise
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


def listen(path: str, backlog: int = 1) -> socket.socket:
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
        sock.listen(backlog)
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
        if retry_for == 0:  # one attempt, from an event loop: a full backlog is a no
            sock.setblocking(False)
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
