"""virtio-rng (virtio 1.x §5.4): one request queue of device-writable buffers, each filled
with bytes from an entropy source (default /dev/urandom). No feature bits, no config.

An optional rate limit, as QEMU's virtio-rng `max-bytes`/`period`: at most `max_bytes` in
any window of `period` seconds that starts with the first request served after the last
window ended. Requests over the budget stay in the ring (not taken) until the window ends.
The window is the device's, not a worker's: resetting the device does not renew it.

The source is read without blocking: a source with nothing to give yet (a FIFO whose writer
is slow) is watched, and requests wait in the ring. A source that fails or ends (EOF) is
reported once, clearly, and requests wait; nothing is made up.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import time
from dataclasses import dataclass

from ..engine.device import Device, Events, QueueService, Timer
from ..engine.queue import DeviceQueue
from ..virtq.iov import iov_write

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "/dev/urandom"
MAX_REQUEST = 64 << 10  # bytes read for one request at most (Linux asks for 32-64)


@dataclass(frozen=True)
class RngOptions:
    source: str = DEFAULT_SOURCE
    max_bytes: int | None = None  # with period: the rate limit
    period: float = 1.0  # seconds


class RngDevice(Device):
    name = "vhost-user-rng"
    num_queues = 1

    def __init__(self, opts: RngOptions) -> None:
        if opts.max_bytes is not None and opts.max_bytes < 1:
            raise ValueError(f"max-bytes must be at least 1, not {opts.max_bytes}")
        if not 0 < opts.period <= 3600:
            raise ValueError(f"period must be more than 0 and at most an hour, not {opts.period}")
        self.opts = opts
        # O_NONBLOCK: a FIFO with no data yet must never stall the queue's worker
        self.fd = os.open(opts.source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        if stat.S_ISDIR(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            raise ValueError(f"{opts.source} is a directory")
        # The rate-limit window outlives each worker (a reset or a ring change starts a new
        # one): [end in monotonic ns, bytes left], in memory shared with them.
        self._shared = mmap.mmap(-1, mmap.PAGESIZE, mmap.MAP_SHARED)
        self.window = memoryview(self._shared).cast("q")

    def features(self) -> int:
        return 0

    def serve(self, queues: dict[int, DeviceQueue], events: Events) -> RngService:
        return RngService(self, queues[0], events)

    def worker_fds(self, indices: list[int]) -> list[int]:
        return [self.fd]

    def close(self) -> None:
        os.close(self.fd)
        self.window.release()
        self._shared.close()


class RngService(QueueService):
    """Fills the request queue's buffers (in its worker)."""

    def __init__(self, dev: RngDevice, q: DeviceQueue, events: Events) -> None:
        self.fd, self.name = dev.fd, dev.opts.source
        self.q, self.events = q, events
        self.max_bytes, self.period = dev.opts.max_bytes, dev.opts.period
        self.window = dev.window  # [end (monotonic ns), bytes left]: kept by the device
        self.timer: Timer | None = None
        self.watching = False
        self.failed = False

    def kicked(self, q: DeviceQueue) -> None:
        self.fill()

    def fill(self) -> None:
        """Serve requests while the budget and the source allow."""
        q = self.q
        while not self.failed:
            chain = q.pop()
            if chain is None:
                return
            room = self._room()  # a window opens with a request to serve
            if not room:
                q.unpop()
                return
            want = min(chain.writable_len(), room, MAX_REQUEST)
            data = self._read(want) if want else b""
            if data is None:  # nothing yet, or the source failed: the request waits
                q.unpop()
                return
            q.complete(chain, iov_write(chain.writable, data))
            if self.max_bytes is not None:
                self.window[1] -= len(data)

    def _room(self) -> int:
        """Bytes we may serve now (arming the timer that ends the window if none)."""
        if self.max_bytes is None:
            return MAX_REQUEST
        w, now = self.window, time.monotonic_ns()
        if now >= w[0]:
            w[0], w[1] = now + int(self.period * 1e9), self.max_bytes
        if w[1] > 0:
            return w[1]
        if self.timer is None:
            self.timer = self.events.call_later((w[0] - now) / 1e9, self._window_ended)
        return 0

    def _window_ended(self) -> None:
        self.timer = None
        self.fill()

    def _read(self, n: int) -> bytes | None:
        try:
            data = os.read(self.fd, n)
        except BlockingIOError:
            self._watch()
            return None
        except OSError as e:
            self._fail(f"cannot read: {os.strerror(e.errno or errno.EIO)}")
            return None
        if not data:
            self._fail("the source ended (EOF)")
            return None
        return data

    def _watch(self) -> None:
        if not self.watching:
            log.debug("entropy source %s has nothing yet: requests wait for it", self.name)
            self.watching = True
            self.events.watch(self.fd, self._readable)

    def _readable(self) -> None:
        self.events.unwatch(self.fd)
        self.watching = False
        self.fill()

    def _fail(self, why: str) -> None:
        log.error("entropy source %s: %s; requests wait (the next connection tries the "
                  "source again)", self.name, why)
        self.failed = True

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.watching:
            self.events.unwatch(self.fd)
