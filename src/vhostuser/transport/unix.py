"""The vhost-user back-end's AF_UNIX transport: front-end connections (listening,
connecting, inherited fds) and the `Resources` the engine asks for (memory regions, areas,
eventfds, the back-end channel), fds passed with SCM_RIGHTS (the message channel is
`unix_channel.UnixChannel`)."""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import socket
from collections.abc import Iterator

from ..engine.backend import ResourceError
from ..engine.notify import EventfdNotifier, Notifier, is_eventfd
from ..memory import mmap_region
from ..protocol.payloads import MemRegion
from ..shutdown import StopSignal
from ..sockets import connect, inherited, listen
from ..unix_channel import UnixChannel

log = logging.getLogger(__name__)


def _require_eventfd(fd: int, what: str) -> None:
    if not is_eventfd(fd):
        raise ResourceError(f"the {what} fd is not an eventfd")


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
            raise ResourceError(f"cannot create a shared area: {e}") from e
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(fd)
            raise ResourceError(f"cannot create a shared area of {size} bytes: {e}") from e

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
            raise ResourceError(f"cannot create a file for the device state: {e}") from e
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.lseek(fd, 0, os.SEEK_SET)
        except OSError as e:
            os.close(fd)
            raise ResourceError(f"cannot write the device state: {e}") from e
        return fd

    def read_state_file(self, res: int, limit: int) -> bytes:
        """The whole of the file `res` (the front-end may have written it anywhere, grown
        or shrunk it: its size counts, not the offset)."""
        try:
            size = os.fstat(res).st_size
            if size > limit:
                raise ResourceError(f"a device state of {size} bytes (at most {limit})")
            data = os.pread(res, size, 0)
        except OSError as e:
            raise ResourceError(f"cannot read the device state: {e}") from e
        if len(data) != size:
            raise ResourceError(f"the device state changed size while read ({size} "
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
        except (ResourceError, OSError):
            os.close(res)
            raise
        return EventfdNotifier(res)

    def backend_channel(self, res: int) -> UnixChannel:
        try:
            return UnixChannel(socket.socket(fileno=res))
        except OSError as e:
            os.close(res)
            raise ResourceError(f"the back-end channel is not a socket: {e}") from e

    def close(self, res: int) -> None:
        try:
            os.close(res)
        except OSError:
            pass


def connections(*, path: str | None = None, fd: int | None = None, client: bool = False,
                once: bool = False, stop: StopSignal | None = None) -> Iterator[socket.socket]:
    """Front-end connections, one after the other.

    - `path` (server): listen and accept, again after each disconnect.
    - `path`, `client=True`: connect to a listening front-end, reconnecting after each.
    - `fd`: an inherited socket; a listening one is accepted on, a connected one is used
      once.
    """
    if fd is not None:
        sock, listening = inherited(fd, f"--fd {fd}")
        if listening:
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
    try:
        yield from _accepting(listener, once, stop)
    finally:
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
