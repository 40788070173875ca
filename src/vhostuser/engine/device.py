"""What a device implements. Devices see chains of guest buffers, config bytes and event
sources of their own (host sockets, an evdev, a timer): never the transport's sockets or
fds.

The engine splits a device's queues into groups (`Device.queue_groups`); each group runs in
a worker process of its own, so groups run in parallel. In its worker a group is served by
the `QueueService` that `Device.serve` returns: the engine calls `kicked(q)` when queue `q`
has chains available, and the callbacks the service registered with `Events` when its own
fds become readable or its timers expire. The service takes chains and completes them when
it likes (in any order, from any callback); after each callback the engine makes the
completions visible and notifies the driver if it asked. A service that keeps chains
(waiting for host data, I/O in flight) finishes them in `quiesce`, called before the
queues stop (GET_VRING_BASE, a memory table change, a disconnect).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..virtq.ring import Chain
from .queue import DeviceQueue

STATE_BYTES = 56  # what `Device.state` may keep


class ConfigError(Exception):
    """A GET/SET_CONFIG the device refuses (the front-end gets a NACK or an empty reply)."""


class StateError(Exception):
    """The device's state cannot be saved or taken up (DEVICE_STATE): the migration fails,
    the source serves on."""


class Timer(Protocol):
    def cancel(self) -> None: ...


class Events(Protocol):
    """The worker's event loop, as a queue service sees it."""

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call `callback` whenever `fd` is readable (until `unwatch`)."""
        ...

    def unwatch(self, fd: int) -> None: ...

    def watch_write(self, fd: int, callback: Callable[[], None]) -> None:
        """Call `callback` whenever `fd` is writable (until `unwatch_write`)."""
        ...

    def unwatch_write(self, fd: int) -> None: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Call `callback` once, `delay` seconds from now."""
        ...


@dataclass
class Carried:
    """What a group's worker leaves to the next worker of the group (its queues stop and
    start again: a VM pause, a memory table change): the service's state as bytes and the
    fds that go with it. The engine holds it in between; it lasts until the device resets
    or the front-end goes away."""

    data: bytes = b""
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


class QueueService(ABC):
    """Serves one group of a device's queues, in that group's worker."""

    @abstractmethod
    def kicked(self, q: DeviceQueue) -> None:
        """`q` has chains available: take what the device can serve now. A service that
        takes nothing (a receive queue with nothing to deliver) is not called again for
        `q` until the driver kicks it."""

    def offloaded(self) -> bool:
        """Whether requests are in flight on threads of the service's own (their
        completions come through an fd it watches). The worker then waits for events
        (kicks on) instead of polling the rings, leaving the CPU (and the GIL) to them."""
        return False

    def quiesce(self) -> None:  # noqa: B027 - nothing in flight by default
        """The queues stop: complete every chain still held."""

    def suspend(self) -> None:
        """The queues stop, and every queue has an in-flight area (GET_VRING_BASE with
        GET_VRING_BASE_INFLIGHT): requests not started yet may be left uncompleted, the
        area keeps them for whoever starts the rings next. Those started must still end
        before this returns (nothing may touch guest memory after). By default: quiesce."""
        self.quiesce()

    def carry(self) -> Carried | None:
        """After `quiesce`, before `close`: state the next worker of this group takes up
        (`Device.adopt`); its fds are the engine's from then on. None: nothing."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """The worker ends: release what the service opened."""


class InOrderService(QueueService):
    """For devices that serve each request at once: `handle` gets every available chain of
    a queue and returns the bytes written into each."""

    def kicked(self, q: DeviceQueue) -> None:
        chains = q.pop_batch()
        if chains:
            q.complete_batch(chains, self.handle(q.index, chains))

    @abstractmethod
    def handle(self, index: int, chains: list[Chain]) -> list[int]: ...


class Device(ABC):
    """A virtio device type served by the engine."""

    name: str = "device"
    num_queues: int = 1
    max_queue_size: int = 1024
    protocol_features: int = 0  # device-specific extras (e.g. CONFIG, RARP, MTU)

    @abstractmethod
    def features(self) -> int:
        """Device-type feature bits offered (transport bits are the engine's)."""

    def set_features(self, features: int) -> None:  # noqa: B027 - optional hook
        """The negotiated features (all bits); called before any queue starts."""

    def queue_num(self) -> int:
        """What GET_QUEUE_NUM reports (net devices report queue pairs)."""
        return self.num_queues

    def queue_groups(self) -> list[list[int]]:
        """Queues served together by one worker (default: each queue on its own)."""
        return [[i] for i in range(self.num_queues)]

    def get_config(self) -> bytes:
        return b""

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        raise ConfigError("device config space is read-only")

    def set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU (offered with the MTU protocol feature)."""
        raise ConfigError("this device has no MTU")

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: announce `mac` (offered with the RARP protocol feature)."""
        raise ConfigError("this device does not send RARP announcements")

    def config_changed(self) -> bool:
        """Whether the config space changed on the device's own account since last asked
        (e.g. a resized disk: the device takes the change as it answers); polled about once
        a second while the front-end is quiet and has given a back-end channel."""
        return False

    def tick(self) -> bool:
        """Called about once a second in the engine's process while a front-end is
        connected and quiet (a control socket of the device's own may be looked at here;
        it must not block). True: the device has a change of what its workers inherit (a
        LUN to add): the engine stops every running group (each worker finishing what it
        holds), calls `commit`, and starts them again."""
        return False

    def commit(self) -> None:  # noqa: B027 - optional hook
        """Apply the change `tick` announced; no worker runs meanwhile."""

    def reset(self) -> None:  # noqa: B027 - optional hook
        """RESET_DEVICE, or the front-end disconnected."""

    def worker_fds(self, indices: list[int]) -> list[int]:
        """The fds of the device's own that the worker of queues `indices` uses (an image,
        its TAP queue, a socket it accepts on): a worker lets go of every fd of the
        engine's but these and its queues' (engine/worker.py), so one left out fails there
        (EBADF, EPIPE). Called in the engine's process as the worker starts."""
        return []

    def stopped(self, indices: list[int]) -> None:  # noqa: B027 - optional hook
        """The worker of these queues is gone (stopped, or died): called in the engine's
        process, to clear what the device shares with workers about them."""

    def state(self) -> bytes:
        """Settings the driver made that must outlive a back-end crash (QEMU does not make
        them again for the next back-end): at most STATE_BYTES, kept in the front-end's
        in-flight area (INFLIGHT_SHMFD) when it gives one. Called in the engine's process
        after each SET_CONFIG."""
        return b""

    def restore(self, state: bytes) -> None:  # noqa: B027 - nothing to restore by default
        """What `state` returned in the back-end that had the in-flight area before (it
        died): take those settings up. Untrusted bytes (the area is the front-end's)."""

    def save_state(self, carried: dict[int, Carried]) -> bytes:
        """DEVICE_STATE (a device that offers it, in `protocol_features`): its state, for
        another back-end's `load_state` (live migration), once every queue stopped; what
        the groups' last workers handed over is in `carried` (group -> it), left as it is
        (the source serves on if the migration fails). StateError if it cannot be saved
        whole. Called in the engine's process."""
        raise StateError(f"{self.name} has no state to migrate")

    def load_state(self, data: bytes) -> dict[int, Carried]:
        """What another back-end's `save_state` gave: what each group's next worker takes
        up (`adopt`). Untrusted bytes (they come through the front-end): StateError for
        anything it cannot take up whole. Called in the engine's process, no queue
        running."""
        raise StateError(f"{self.name} has no state to migrate")

    def adopt(self, carried: Carried) -> None:
        """In a group's new worker, before `serve`: what the group's last worker left
        (`QueueService.carry`). The device owns it from then on."""
        carried.close()

    @abstractmethod
    def serve(self, queues: dict[int, DeviceQueue], events: Events) -> QueueService:
        """A service for the running queues of one group (those of the group that the
        front-end has started and enabled); called in the worker process that runs them."""
