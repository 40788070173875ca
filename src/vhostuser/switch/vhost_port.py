"""A switch port that is a vhost-user net device.

The engine (`Backend`) handles the port's vhost-user messages as for any device; its queues
are run in the switch's own loop by `InlineQueue` instead of worker processes, because
frames move between the guest memories of different ports and all of them are mapped here.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence

import numpy as np

from ..appliance.vvu_link import VvuLink
from ..devices import net_kernel
from ..devices.net import F_MRG_RXBUF, NetPort
from ..devices.net_frames import Frames
from ..devices.net_kernel import Check
from ..devices.net_rings import MAX_BURST, put_frames, put_rest, take_rest, tx_check
from ..engine.backend import Backend
from ..engine.device import Carried, Device
from ..engine.notify import Notifier
from ..engine.queue import DeviceQueue, open_ring
from ..engine.worker import QueueSpec, Running, Stopped
from ..framer import close_fds
from ..memory import GuestMemory
from ..protocol import Header, ProtocolError, encode
from ..sockets import PeerClosed, PeerStalled, connect, inherited, listen
from ..transport.unix import UnixResources
from ..transport.vvu import VvuResources, split_message
from ..unix_channel import UnixChannel
from ..virtq.ring import RingError
from ..vvu.abi import S_BACKEND_UP
from .port import Port

log = logging.getLogger(__name__)


class InlineQueue:
    """A queue served in this process."""

    def __init__(self, port: VhostPort, q: DeviceQueue, kick_fd: int | None,
                 err: Notifier) -> None:
        self.port, self.q, self.index = port, q, q.index
        self.kick_fd, self.err = kick_fd, err
        self.broken = False
        self.checks: tuple[int, Check | None] | None = None  # a transmit queue's: the
        # features negotiated, and net_rings.tx_check's for them (made again if they
        # change)

    @property
    def is_tx(self) -> bool:
        return self.index % 2 == 1

    def check(self) -> None:
        """Stop the queue if its ring broke the rules."""
        if self.q.error is not None and not self.broken:
            log.error("%s queue %d: stopped: %s", self.port.name, self.index, self.q.error)
            self.broken = True
            self.port.forget_queues()
            self.err.notify()


class InlineGroup:
    """A queue group served in this process (the engine's `Running` for the switch).
    A queue whose ring lies outside guest memory does not run; GET_VRING_BASE gets its
    index back, and the front-end must set it up again."""

    carried: Carried | None = None  # ports carry nothing across restarts

    def __init__(self, port: VhostPort, queues: list[InlineQueue],
                 broken: dict[int, int]) -> None:
        self.port, self.queues, self.broken = port, queues, broken

    def stop(self, suspend: bool = False) -> Stopped:
        """(Nothing is ever held: frames are taken and returned in one go.)"""
        out: Stopped = {i: (last, True) for i, last in self.broken.items()}
        for iq in self.queues:
            self.port.queues.pop(iq.index, None)
            out[iq.index] = (iq.q.ring.base(), iq.broken)
            iq.q.release()
        self.port.forget_queues()
        self.port.changed()
        return out


class VhostPort(Port):
    def __init__(self, name: str, path: str | None, mac: bytes, *, client: bool = False,
                 fd: int | None = None, vvu: str | None = None, poll: bool = False,
                 queue_pairs: int = 1, mtu: int = 1500, offloads: bool = True,
                 changed: Callable[[], None] = lambda: None,
                 message_timeout: float | None = None) -> None:
        super().__init__(name)
        if sum(x is not None for x in (path, fd, vvu)) != 1:
            raise ValueError(f"{name}: one of a socket path, an inherited fd or a vvu device")
        self.path = path
        self.fd = fd
        self.vvu = vvu  # served through a virtio-vhost-user device (its vfio-user socket)
        self.poll = poll
        self.link: VvuLink | None = None
        self.client = client
        self.device = NetPort(mac, queue_pairs, mtu, offloads=offloads)
        self.queues: dict[int, InlineQueue] = {}
        self._tx: list[InlineQueue] | None = None  # the running ones, made when asked
        self._rx: list[InlineQueue] | None = None
        self.listener: socket.socket | None = None
        self.conn: UnixChannel | None = None
        self.backend: Backend | None = None
        self.changed = changed  # tell the loop to rebuild what it watches
        self.message_timeout = message_timeout
        self._rr = 0

    # -- connection ----------------------------------------------------------------------------

    def open(self) -> None:
        if self.vvu is not None:
            self.link = VvuLink(self.vvu, self.poll)
            self.link.begin_session()
            return
        if self.fd is not None:  # inherited: a listening socket, or one connection
            sock, listening = inherited(self.fd, f"{self.name}: fd {self.fd}")
            if not listening:
                self._attach(sock)
                return
            self.listener = sock
        elif not self.client:
            assert self.path is not None
            self.listener = listen(self.path)
        if self.listener is not None:
            self.listener.setblocking(False)

    def try_connect(self) -> bool:
        """Client mode: one attempt to reach the front-end."""
        assert self.path is not None
        try:
            sock = connect(self.path, retry_for=0)
        except ConnectionError:
            return False
        self._attach(sock)
        return True

    def accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except OSError as e:  # nothing waiting, or out of fds: the front-end waits
            if not isinstance(e, BlockingIOError):
                log.error("%s: cannot accept a front-end: %s", self.name, e)
            return
        if self.conn is not None:  # one front-end per port
            log.warning("%s: refusing a second front-end", self.name)
            sock.close()
            return
        self._attach(sock)

    def _attach(self, sock: socket.socket) -> None:
        self.conn = UnixChannel(sock, message_timeout=self.message_timeout)
        self.backend = Backend(self.device, UnixResources(), runner=self._run_queues,
                               track_inflight=False)
        log.info("%s: front-end connected", self.name)
        self.changed()

    def on_message(self) -> None:
        """The front-end's socket is ready: send what waits for it, serve the messages
        that have arrived. Never blocks on the front-end; whatever goes wrong ends this
        port's connection only."""
        conn, backend = self.conn, self.backend
        if conn is None or backend is None:
            return  # disconnected earlier in this round of events
        wanted_write = conn.wants_write
        messages: list[tuple[Header, bytes, list[int]]] = []
        try:
            conn.flush()
            messages = conn.poll()
            while messages:
                header, body, fds = messages.pop(0)
                reply = backend.receive(header, body, fds)
                if reply is not None:
                    conn.send_nowait(reply)
        except PeerClosed:
            log.info("%s: front-end disconnected", self.name)
            self.disconnect()
            return
        except (ProtocolError, OSError) as e:
            log.error("%s: dropping the front-end: %s", self.name, e)
            self.disconnect()
            return
        except Exception:  # a bug must not take down the switch and its other ports
            log.exception("%s: dropping the front-end after an internal error", self.name)
            self.disconnect()
            return
        finally:
            for _, _, fds in messages:  # not served: the connection went
                close_fds(fds)
        if conn.wants_write != wanted_write:
            self.changed()  # watch for writability, or stop watching

    def check_peer(self, now: float) -> None:
        """Drop a front-end that left a message half sent, or ours unread, too long."""
        if self.conn is None:
            return
        try:
            self.conn.check(now)
        except PeerStalled as e:
            log.error("%s: dropping the front-end: %s", self.name, e)
            self.disconnect()

    def on_vvu_event(self) -> None:
        """The device signalled (a message, or a session change): catch up with it."""
        link = self.link
        assert link is not None
        try:
            messages = link.take_messages()
            if self.backend is not None and not link.in_session():
                log.info("%s: consumer gone", self.name)
                self.disconnect()
                messages = []
            if self.backend is None and not link.status() & S_BACKEND_UP:
                link.begin_session()  # a consumer came and went before we looked
            # Messages mean a session has begun, even if the status last read (polled at
            # most every STATUS_POLL s) does not say so yet: read it again, never drop them.
            if self.backend is None and link.in_session(fresh=bool(messages)):
                log.info("%s: consumer connected through virtio-vhost-user", self.name)
                self.backend = Backend(self.device, VvuResources(link, self.poll),
                                       runner=self._run_queues, track_inflight=False,
                                       log_dirty=False)
                self.changed()
                messages += link.take_messages()
            backend = self.backend
            if backend is not None:
                for data in messages:
                    reply = backend.receive(*split_message(data))
                    if reply is not None:
                        link.send(encode(reply))
        except Exception as e:  # whatever it is, it ends this port's session only
            if isinstance(e, ProtocolError | OSError):  # TxqFull among them
                log.error("%s: dropping the consumer: %s", self.name, e)
            else:
                log.exception("%s: dropping the consumer after an internal error", self.name)
            self.disconnect()

    def disconnect(self) -> None:
        """End the front-end's connection (through a device: end the consumer's session
        and get ready for the next)."""
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self.link is not None:
            try:
                self.link.begin_session()
            except OSError as e:
                log.error("%s: the virtio-vhost-user device failed: %s", self.name, e)
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.changed()

    def close(self) -> None:
        link, self.link = self.link, None  # the port is going: no next session
        self.disconnect()
        if link is not None:
            link.close()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            if self.path is not None:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass

    def _run_queues(self, specs: list[QueueSpec], mem: GuestMemory, device: Device,
                    carried: Carried | None, hold: Sequence[int]) -> Running:
        """The engine's `Runner`, in this process (`hold` is for processes of its own)."""
        if carried is not None:
            carried.close()
        queues, broken = [], {}
        for s in specs:
            p = s.params
            try:
                ring = open_ring(mem, p.layout, p.base, p.packed, p.event_idx, p.indirect,
                                 s.log, p.log_used)
            except RingError as e:  # a ring outside guest memory: this queue stays stopped
                log.error("%s queue %d: cannot start: %s", self.name, p.index, e)
                s.err.notify()
                broken[p.index] = p.base
                continue
            iq = InlineQueue(self, DeviceQueue(ring, p.index, s.call), s.kick_fd, s.err)
            if not iq.is_tx:  # buffers posted to rx need no kick: we look when a frame comes
                iq.q.disable_kicks()
            self.queues[p.index] = iq
            queues.append(iq)
        self.forget_queues()
        self.changed()
        return InlineGroup(self, queues, broken)

    # -- data path -----------------------------------------------------------------------------

    def forget_queues(self) -> None:
        """The queues changed (started, stopped, broken): the lists are made again."""
        self._tx = self._rx = None

    def tx_queues(self) -> list[InlineQueue]:
        if self._tx is None:
            self._tx = [iq for iq in self.queues.values() if iq.is_tx and not iq.broken]
        return self._tx

    def rx_queues(self) -> list[InlineQueue]:
        """In queue order (flows are spread over them by position)."""
        if self._rx is None:
            self._rx = [iq for i, iq in sorted(self.queues.items())
                        if i % 2 == 0 and not iq.broken]
        return self._rx

    def take_tx(self, iq: InlineQueue) -> Frames:
        """Frames the guest transmitted on `iq` (at most a burst): take_frames, with its
        usual burst in one call (net_kernel.take_burst)."""
        q, dev = iq.q, self.device
        checks = iq.checks
        if checks is None or checks[0] != dev.negotiated:
            checks = iq.checks = (dev.negotiated, tx_check(q, dev, self.counters))
        frames = net_kernel.take_burst(q, dev, self.counters, MAX_BURST, checks[1])
        if frames is None:
            frames = take_rest(q, dev, self.counters)
            iq.check()
        return frames

    def deliver(self, frames: Frames) -> None:
        """Frames into the guest's receive queues (dropped where it has none running):
        put_frames, with its usual burst in one call (net_kernel.put_burst); flows spread
        over several queues, each in order."""
        rx = self.rx_queues()
        if len(rx) == 1:
            q, dev = rx[0].q, self.device
            done = net_kernel.put_burst(q, dev, self.counters, frames,
                                        bool(dev.negotiated & F_MRG_RXBUF))
            if done != len(frames):
                put_rest(q, dev, self.counters, frames, done)
                rx[0].check()
            return
        if not rx:
            self.counters.drops["port_down"] += len(frames)
            return
        which = flow_hash(frames) % len(rx)
        for i in np.unique(which).tolist():
            put_frames(rx[i].q, self.device, self.counters, frames.pick(which == i))
            rx[i].check()

    def status(self) -> dict[str, object]:
        st = super().status()
        st.update(socket=self.path or self.vvu, connected=self.backend is not None,
                  queues=sorted(i for i, iq in self.queues.items() if not iq.broken),
                  mtu=self.device.mtu, features=f"{self.device.negotiated:#x}")
        return st


_FLOW = np.r_[0:12, 26:38]  # the MAC addresses, and IPv4's addresses behind an untagged
_FLOW_WEIGHTS = np.array([pow(31, k, 1 << 61) for k in range(len(_FLOW))], np.uint64)


def flow_hash(frames: Frames) -> np.ndarray:
    """Per frame, a number that is the same for every frame of a flow (its addresses;
    the bytes a frame does not have count as 0)."""
    at = frames.offs[:, None] + _FLOW
    inside = frames.lens[:, None] > _FLOW
    b = np.where(inside, frames.data[np.where(inside, at, 0)], 0).astype(np.uint64)
    hashes: np.ndarray = (b * _FLOW_WEIGHTS).sum(axis=1)
    return hashes

