"""Framed messages over a non-blocking AF_UNIX stream socket, fds passed with SCM_RIGHTS:
what the vhost-user and vfio-user transports share.

`FramedSocket` never blocks on its peer. Reads take at most what the framer wants (so the
fds that come with a read belong to the message in progress) and hand over complete
messages; writes go out as far as the socket takes them and the rest waits in a bounded
backlog. A peer that holds back the rest of a message, or stops reading what we send, only
stalls itself: `check` raises PeerStalled once it has done so for longer than its timeout,
and the owner drops that connection. Loops that serve one connection and have nothing else
to do use the waiting helpers, which wait on the socket and the stop signal's pipe only.
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import stat
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from .framer import Frame, Framer, close_fds
from .shutdown import StopSignal

H = TypeVar("H")

MESSAGE_TIMEOUT = 5.0  # s a peer may take to finish a message it started, or to read ours
MAX_BACKLOG = 1 << 20  # bytes we keep for a peer that does not read them
_INT_SIZE = array.array("i").itemsize


def set_message_timeout(seconds: float) -> None:
    """The default message timeout of sockets made from now on (--message-timeout)."""
    global MESSAGE_TIMEOUT
    if not seconds > 0:
        raise ValueError("the message timeout must be positive")
    MESSAGE_TIMEOUT = seconds


class PeerClosed(ConnectionError):
    """The peer closed the connection."""

    def __init__(self, message: str = "the peer closed the connection") -> None:
        super().__init__(message)


class PeerStalled(ConnectionError):
    """The peer left a message half sent, or stopped reading ours, for too long."""


def recv_some(sock: socket.socket, n: int, max_fds: int) -> tuple[bytes, list[int], bool]:
    """Up to `n` bytes and the fds that came with them, and whether the kernel dropped
    fds for lack of room (those that came are returned: the caller closes them). Raises
    BlockingIOError when nothing is there, PeerClosed at EOF."""
    data, anc, flags, _ = sock.recvmsg(n, socket.CMSG_SPACE(max_fds * _INT_SIZE))
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % _INT_SIZE])
            fds.extend(arr)
    if not data:
        close_fds(fds)
        raise PeerClosed()
    return data, fds, bool(flags & socket.MSG_CTRUNC)


def send_with_fds(sock: socket.socket, data: bytes | memoryview,
                  fds: list[int] | tuple[int, ...] = ()) -> int:
    """One sendmsg of `data` with `fds` attached to its first byte; returns bytes sent."""
    anc = []
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    return sock.sendmsg([data], anc)


class FramedSocket(Generic[H]):
    def __init__(self, sock: socket.socket, framer: Framer[H], *,
                 message_timeout: float | None = None,
                 max_backlog: int = MAX_BACKLOG) -> None:
        """`message_timeout`: None for the default (`set_message_timeout`)."""
        sock.setblocking(False)
        self.sock = sock
        self.framer = framer
        self.message_timeout = MESSAGE_TIMEOUT if message_timeout is None else message_timeout
        self.max_backlog = max_backlog
        self._frames: deque[Frame[H]] = deque()
        self._eof = False
        self._out: deque[tuple[memoryview, list[int]]] = deque()
        self._backlog = 0
        self._partial_since: float | None = None
        self._out_since: float | None = None  # when the backlog last made no progress

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- receiving -------------------------------------------------------------------------

    def read(self, limit: int = 64) -> int:
        """Read what the socket holds, without blocking, until `limit` messages are
        complete and waiting; returns how many are. PeerClosed at EOF (also mid-message),
        the framer's error on a bad header or too many fds."""
        framer = self.framer
        while len(self._frames) < limit:
            if self._eof:
                if self._frames:
                    break  # what came before the end is served first
                raise PeerClosed()
            try:
                data, fds, truncated = recv_some(self.sock, framer.want(), framer.max_fds)
            except BlockingIOError:
                break
            except (PeerClosed, ConnectionResetError):  # a reset ends the stream as EOF does
                self._eof = True
                continue
            if truncated:
                close_fds(fds)
                framer.close()
                raise framer.too_many_fds(f"more than {framer.max_fds} fds attached to one "
                                          "message")
            framer.feed(data, fds)
            while (frame := framer.pop()) is not None:
                self._frames.append(frame)
        if framer.partial:
            if self._partial_since is None:
                self._partial_since = time.monotonic()
        else:
            self._partial_since = None
        return len(self._frames)

    def pop(self) -> Frame[H] | None:
        return self._frames.popleft() if self._frames else None

    # -- sending ---------------------------------------------------------------------------

    def send(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Queue `data` (fds on its first byte) and send what the socket takes now. The
        fds are duplicated: the caller may close its own at once (a number closed and
        reused meanwhile can never go out in their place). PeerStalled if the peer has left
        more than `max_backlog` bytes unread (one message of any size is always taken)."""
        if self._out and self._backlog + len(data) > self.max_backlog:
            raise PeerStalled(f"the peer does not read: {self._backlog} bytes wait for it")
        if not self._out:
            self._out_since = time.monotonic()
        self._out.append((memoryview(data), [os.dup(fd) for fd in fds]))
        self._backlog += len(data)
        self.flush()

    def flush(self) -> None:
        """Send as much of the backlog as the socket takes, without blocking."""
        while self._out:
            view, fds = self._out[0]
            try:
                n = send_with_fds(self.sock, view, fds)
            except BlockingIOError:
                return
            except (BrokenPipeError, ConnectionResetError) as e:
                raise PeerClosed() from e
            self._backlog -= n
            self._out_since = time.monotonic()
            close_fds(fds)  # our duplicates: they went with the first byte
            if n < len(view):
                self._out[0] = (view[n:], [])
            else:
                self._out.popleft()
        self._out_since = None

    @property
    def wants_write(self) -> bool:
        return bool(self._out)

    # -- deadlines -------------------------------------------------------------------------

    def deadline(self) -> float | None:
        """When `check` will raise if the peer does nothing more (None: never)."""
        times = [t for t in (self._partial_since, self._out_since) if t is not None]
        return min(times) + self.message_timeout if times else None

    def check(self, now: float | None = None, reading: bool = True) -> None:
        """PeerStalled if the peer has left a message half sent (while we were reading:
        `reading`), or ours unread, for longer than `message_timeout`."""
        now = time.monotonic() if now is None else now
        t = self.message_timeout
        if not reading and self._partial_since is not None:
            self._partial_since = now  # we are not reading: the peer is not late
        if self._partial_since is not None and now - self._partial_since > t:
            raise PeerStalled(f"the peer left a message incomplete for more than {t:g} s")
        if self._out_since is not None and now - self._out_since > t:
            raise PeerStalled(f"the peer has not read our messages for more than {t:g} s")

    # -- waiting, for loops that serve this connection alone -------------------------------

    def wait(self, timeout: float | None, stop: StopSignal | None = None,
             write: bool = False) -> bool:
        """Wait until the socket is readable (or writable, with `write`), at most
        `timeout` seconds (None: no limit); raise Shutdown if a stop signal comes."""
        poller = select.poll()  # not select(): fds may be numbered past FD_SETSIZE
        poller.register(self.sock, select.POLLOUT if write else select.POLLIN)
        if stop is not None:
            poller.register(stop.fds()[0], select.POLLIN)
        ready = dict(poller.poll(None if timeout is None else timeout * 1000))
        if stop is not None and (stop.fds()[0] in ready or stop.signum is not None):
            stop.check()
        return self.sock.fileno() in ready

    def recv(self, timeout: float | None = None, stop: StopSignal | None = None,
             idle: tuple[float, Callable[[], None]] | None = None) -> Frame[H]:
        """The next message, waiting for it. PeerStalled when the peer leaves a message
        half sent for longer than the message timeout, TimeoutError after `timeout` (None:
        no limit) with no message; `idle` = (seconds, fn): call fn every that many seconds
        while no message comes."""
        start = time.monotonic()
        next_idle = start + idle[0] if idle is not None else None
        end = None if timeout is None else start + timeout
        while True:
            if self.read(1):
                frame = self.pop()
                assert frame is not None
                return frame
            now = time.monotonic()
            self.check(now)
            waits = [t for t in (next_idle, self.deadline(), end) if t is not None]
            if self.wait(max(0.0, min(waits) - now) if waits else None, stop):
                continue
            now = time.monotonic()
            if end is not None and now >= end:
                raise TimeoutError(f"no message within {timeout:g} s")
            if idle is not None and next_idle is not None and now >= next_idle:
                idle[1]()
                next_idle = now + idle[0]

    def send_waiting(self, data: bytes, fds: list[int] | tuple[int, ...] = (),
                     stop: StopSignal | None = None) -> None:
        """`send`, then wait (up to the message timeout) until the peer took it all."""
        self.send(data, fds)
        while self._out:
            dl = self.deadline()
            left = None if dl is None else max(0.0, dl - time.monotonic())
            if self.wait(left, stop, write=True):
                self.flush()
            else:
                self.check()

    def close(self) -> None:
        self.framer.close()
        while self._frames:
            close_fds(self._frames.popleft().fds)
        while self._out:
            close_fds(self._out.popleft()[1])
        self._backlog = 0
        self.sock.close()


def inherited(fd: int, what: str) -> tuple[socket.socket, bool]:
    """The UNIX stream socket `fd` that whoever started us handed over (QEMU's --fd
    convention), and whether it listens; OSError naming `what` for anything else (the fd
    is left as it was: not ours to close)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise OSError(e.errno, f"{what}: {e.strerror}") from e
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise OSError(f"{what} is not a UNIX stream socket")
    return sock, bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def is_listening(fd: int) -> bool:
    """Whether `fd` is a listening socket (asked of a copy, closed whatever it is)."""
    try:
        copy = os.dup(fd)
    except OSError:  # not open
        return False
    try:
        sock = socket.socket(fileno=copy)
    except OSError:  # not a socket
        os.close(copy)
        return False
    with sock:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


UNIX_PATH_MAX = 107  # bytes of a socket's path (sun_path: 108, with its NUL)


def listen(path: str, backlog: int = 1) -> socket.socket:
    """Listen on `path`, replacing a stale socket file (not any other kind of file). The
    path appears only once the socket listens (bound under a temporary name, then
    renamed), so a client that sees it can connect at once."""
    if not path:
        raise OSError(errno.EINVAL, "the socket path is empty")
    if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    tmp = f"{path}.{os.getpid()}.tmp"
    size, extra = len(os.fsencode(path)), len(os.fsencode(tmp)) - len(os.fsencode(path))
    if size + extra > UNIX_PATH_MAX:  # (the temporary name's length, bound first)
        raise OSError(errno.ENAMETOOLONG, f"cannot listen on {path}: the path is too long "
                      f"for a socket ({size} bytes, {UNIX_PATH_MAX - extra} "
                      f"at most here: AF_UNIX takes {UNIX_PATH_MAX}, and the socket is bound "
                      f"under a name {extra} bytes longer first)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        sock.bind(tmp)
        sock.listen(backlog)
        os.rename(tmp, path)
    except OSError as e:
        sock.close()
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise OSError(e.errno, f"cannot listen on {path}: {e.strerror or e}") from e
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
