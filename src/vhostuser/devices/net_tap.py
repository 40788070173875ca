"""A virtio-net port bridged to a TAP interface, one queue pair per worker: pair k's
transmit queue writes into the TAP's queue k, and what the host sends on that TAP queue
fills pair k's receive queue. With a multi-queue TAP the pairs run in parallel, each in
its own process, as the kernel's vhost-net runs one thread per pair.

Frames from the TAP wait in the kernel while the guest has no receive buffer (the TAP fd
is not read until a receive kick says buffers came), and the TAP queue's own limit
applies, as for any NIC; on our side a frame is dropped only when it needs more merged
buffers than the guest has posted. A pair's TAP queue is attached while its worker runs:
the kernel spreads the host's flows over attached queues only, so a guest that uses fewer
pairs than offered still gets them all.
"""

from __future__ import annotations

import json
import logging
import os

from ..engine.device import Events, QueueService, Timer
from ..engine.queue import DeviceQueue
from ..ratelog import Limited
from .net import NetPort
from .net_frames import Frames
from .net_offload import HDR_SIZE, from_host
from .net_rings import Counters, put_frames, take_frames
from .tap import VNET_HDR_LEN, set_queue

log = logging.getLogger(__name__)

MAX_READ = 64  # frames read from the TAP per look
READ_SIZE = VNET_HDR_LEN + 65536 + 64  # a GSO frame from the kernel, behind its header
RETRY = 1.0  # s before reading again a TAP that failed


class NetTapService(QueueService):
    """Serves one rx/tx pair (in its worker)."""

    def __init__(self, dev: NetPort, queues: dict[int, DeviceQueue], events: Events,
                 tap_fd: int, attach: bool = False) -> None:
        self.dev, self.events, self.fd = dev, events, tap_fd
        self.rxq = next((q for i, q in queues.items() if i % 2 == 0), None)
        self.txq = next((q for i, q in queues.items() if i % 2 == 1), None)
        self.counters = Counters()
        self.watching = False
        self.retry: Timer | None = None
        self.failures = Limited(log)
        if attach and self.rxq is not None:  # the host's flows may come to this queue now
            set_queue(tap_fd, True)
        if self.rxq is not None:
            self._watch()

    def _watch(self) -> None:
        if not self.watching:
            self.watching = True
            self.events.watch(self.fd, self.from_tap)

    def _unwatch(self) -> None:
        if self.watching:
            self.watching = False
            self.events.unwatch(self.fd)

    def kicked(self, q: DeviceQueue) -> None:
        if q is self.txq:
            self.to_tap(q)
        elif q is self.rxq and not self.watching:
            self._watch()  # buffers came: read what waited in the TAP
            self.from_tap()

    def to_tap(self, q: DeviceQueue) -> None:
        """One burst (the engine calls again while the ring has more, so a flood from the
        guest cannot hold the worker). With IFF_VNET_HDR each frame goes behind its
        header: the kernel finishes what it asks for."""
        c = self.counters
        frames = take_frames(q, self.dev, c)
        vnet = frames.vnet
        plain = bytes(VNET_HDR_LEN) if self.dev.vnet_tap else b""
        for i, f in enumerate(frames):
            hdr = plain if vnet is None or not plain else vnet[i].tobytes() + b"\0\0"
            try:
                os.writev(self.fd, (hdr, f))
            except BlockingIOError:
                c.drops["tap_full"] += 1
            except OSError as e:  # the interface is down, say
                c.drops["tap_error"] += 1
                self.failures.log(logging.WARNING, "TAP write: %s", e.strerror)

    def from_tap(self) -> None:
        """At most a burst (the TAP fd stays readable if there is more: the loop comes
        back after a look at everything else)."""
        q = self.rxq
        if q is None or self.retry is not None:
            return
        room = q.available()
        if room <= 0:
            self._unwatch()  # no buffer: frames wait in the TAP until the guest posts some
            return
        frames = []
        for _ in range(min(room, MAX_READ)):
            try:
                frames.append(os.read(self.fd, READ_SIZE))
            except BlockingIOError:
                break
            except OSError as e:  # the interface went away, say: look again later
                self.failures.log(logging.WARNING, "TAP read: %s; retrying in %g s",
                                  e.strerror, RETRY)
                self._unwatch()
                self.retry = self.events.call_later(RETRY, self._retry)
                break
        if frames and self.dev.vnet_tap:  # each behind its header
            whole = [f for f in frames if len(f) >= VNET_HDR_LEN + 14]
            if len(whole) != len(frames):
                self.counters.drops["runt"] += len(frames) - len(whole)
            hdrs = [from_host(f[:HDR_SIZE], self.dev.negotiated) for f in whole]
            frames = [f[VNET_HDR_LEN:] for f in whole]
            put_frames(q, self.dev, self.counters, Frames.of(frames, hdrs))
        elif frames:
            put_frames(q, self.dev, self.counters, Frames.of(frames))

    def _retry(self) -> None:
        self.retry = None
        self._watch()
        self.from_tap()

    def close(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
        self._unwatch()
        q = self.txq or self.rxq
        if q is not None:  # what this pair moved (the switch's counters, for a TAP port)
            log.info("pair %d counters: %s", q.index // 2, json.dumps(self.counters.as_dict()))
