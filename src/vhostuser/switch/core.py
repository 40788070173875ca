"""The switch: MAC learning with aging, flooding, and the one loop that runs everything
(vhost-user control messages, every port's queues, the TAP uplink, the control socket).

Forwarding rules: every unicast source MAC is learned at its ingress port; a unicast
destination that is known goes to its port (never back out of the ingress port); broadcast,
multicast and unknown unicast are flooded to every port except the ingress one.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time

import numpy as np

from ..devices import net_kernel
from ..devices.net_frames import Frames
from ..shutdown import StopSignal, Watch
from ..sockets import listen
from . import pair, route
from .mac_table import MAX_MACS, MacTable
from .port import Port
from .tap import TapPort
from .vhost_port import InlineQueue, VhostPort

log = logging.getLogger(__name__)

_MAC_WEIGHTS = np.array([[1 << (8 * (5 - k)), 0] for k in range(6)]
                        + [[0, 1 << (8 * (5 - k))] for k in range(6)], dtype=np.uint64)
VVU_LOOK = 0.001  # s between looks at an interrupt-less virtio-vhost-user device
CONTROL_TIMEOUT = 5.0  # s a control client has to read the status
# bytes of chains (header and frame) a port's compiled transmit burst stops at, where
# there is another port to forward to: a loop's frames then go in more than one burst, so
# the front-end forwards the first while the switch copies the next (bench/RESULTS.md,
# 2026-12-02, "A lead for PVP at 1500 B" and the net_dpdk entries after it); 86 frames
# of 1500 B, any burst of 64 B frames
FORWARD_BURST = 128 << 10
PEER_CHECK = 0.25  # s between looks for front-ends that stalled mid-message
BUSY_POLL = 50e-6  # s between looks at the loop's fds while frames keep coming (a look
# is a poll(2) call: once per burst it cost about 5 % of a small-frame burst)
COMPILED = "frames taken, switched and delivered by the compiled kernels"


class Switch:
    def __init__(self, ports: list[VhostPort], tap: TapPort | None = None,
                 control_path: str | None = None, aging: float = 300.0,
                 poll_us: int = 200) -> None:
        if not ports:
            raise ValueError("a switch needs at least one vhost-user port")
        self.vports = list(ports)
        self.tap = tap
        self.ports: list[Port] = [*ports, *([tap] if tap else [])]
        self.control_path = control_path
        self.aging = aging
        self.spin = poll_us / 1e6
        self.table = MacTable(MAX_MACS)  # learned stations: MAC -> index in self.ports
        self.started = time.monotonic()
        self._dirty = True
        for p in ports:
            p.changed = self._changed
            if len(self.ports) > 1:  # (a port alone: its frames go nowhere, a burst may
                p.device.tx_burst_bytes = FORWARD_BURST  # be as long as it likes)
        self._control: socket.socket | None = None
        self._readers: dict[socket.socket, tuple[memoryview, float]] = {}  # control clients
        self._current: Watch | None = None  # what the loop watches now
        self._kickless = False  # a queue polls all the time (made with the watch)
        # two vhost ports and no uplink, the kernels on: each port's bursts go to the
        # other in one compiled call where they can (pair.py)
        self._paired = len(self.ports) == 2 and tap is None and pair.available()

    def _changed(self) -> None:
        self._dirty = True
        if self._current is not None:  # the fds it watches may be closed now
            self._current.invalidate()

    # -- forwarding ----------------------------------------------------------------------------

    def forward(self, ingress: Port, frames: Frames, at: int | None = None) -> None:
        """Learn the burst's source MACs at `ingress` and send each frame where its
        destination says, as if frame by frame: learn its source, then look its
        destination up (a known unicast goes to its port, never back to the ingress;
        the rest floods). Compiled where the kernel is on (route.py), else with arrays.
        `at`: the index of `ingress` in `ports`, where the caller knows it."""
        if not len(frames):
            return
        now = time.monotonic()
        if at is None:
            at = self.ports.index(ingress)
        if route.available():
            dest, hairpins, common = route.route(frames, self.table, at, now, now + self.aging)
            if hairpins:
                ingress.counters.drops["to_ingress_port"] += hairpins
            if common == route.FLOOD:  # the usual cases: a whole burst to one place
                for j, p in enumerate(self.ports):
                    if j != at:
                        _deliver(p, frames)
            elif common >= 0:
                _deliver(self.ports[common], frames)
            elif common != route.HAIRPIN:  # MIXED, or SHORT (which goes nowhere)
                flood = dest == route.FLOOD
                for j, p in enumerate(self.ports):
                    if j != at:
                        chosen = flood | (dest == j)
                        if chosen.any():
                            _deliver(p, frames.pick(chosen))  # in burst order
            return
        self._forward_arrays(at, frames, now)

    def _forward_arrays(self, at: int, frames: Frames, now: float) -> None:
        """`forward` per distinct MAC: the burst's MACs are gathered into arrays and
        grouped (a burst rarely holds more than a few). Frame by frame, a destination
        learned from an earlier frame of the same burst is at the ingress port from then
        on: those later frames are hairpins; earlier ones go where the table said before
        the burst."""
        table = self.table
        ingress = self.ports[at]
        n = len(frames)
        head = frames.addresses()
        keys = head.astype(np.uint64) @ _MAC_WEIGHTS  # (dst, src) as 48-bit integers
        dsts, where, inverse = np.unique(keys[:, 0], return_index=True, return_inverse=True)
        others = [j for j in range(len(self.ports)) if j != at]
        plan: list[list[int] | None] = []  # per distinct destination, None: to ingress
        for i in where.tolist():  # the table as it was before this burst
            dst = head[i, :6].tobytes()
            entry = None if dst[0] & 1 else table.get(dst)
            if entry is None or entry[1] < now:
                plan.append(others)
            else:
                plan.append(None if entry[0] == at else [entry[0]])
        srcs, first = np.unique(keys[:, 1], return_index=True)
        expiry = now + self.aging
        learned_at: dict[int, int] = {}  # source key -> index of its first frame
        order = np.argsort(first)  # in the order they come (a full table learns the first)
        for key, i in zip(srcs[order].tolist(), first[order].tolist(), strict=True):
            src = head[i, 6:12].tobytes()
            if src[0] & 1:  # never a station (ports drop such frames; the TAP may not)
                continue
            if table.learn(src, at, expiry):
                learned_at[key] = i
        hairpin = None  # frames dropped as hairpins (None: none)
        for j, key in enumerate(dsts.tolist()):
            if plan[j] is None:
                cut = inverse == j
            elif key in learned_at:  # learned here, mid-burst: hairpins from then on
                cut = (inverse == j) & (np.arange(n) >= learned_at[key])
            else:
                continue
            hairpin = cut if hairpin is None else hairpin | cut
        drops = 0 if hairpin is None else int(np.count_nonzero(hairpin))
        if drops:
            ingress.counters.drops["to_ingress_port"] += drops
        sends: dict[int, list[int]] = {}
        for j, ports in enumerate(plan):
            for p in ports or ():
                sends.setdefault(p, []).append(j)
        for p, js in sends.items():
            if len(js) == len(dsts) and not drops:  # every frame (the usual case)
                _deliver(self.ports[p], frames)
                continue
            chosen = np.isin(inverse, js)
            if hairpin is not None:
                chosen &= ~hairpin
            if chosen.any():
                _deliver(self.ports[p], frames.pick(chosen))  # in burst order

    def _paired_burst(self, port: VhostPort, at: int, iq: InlineQueue) -> bool | None:
        """A burst of `port`'s queue `iq` to the other port in one call (pair.py), where
        that serves: whether it took any chains; None where it does not serve (the usual
        path then does)."""
        now = time.monotonic()
        other = self.vports[1 - at]
        moved = pair.move(port, iq, other, self.table, at, now, now + self.aging)
        if moved is None:
            return None
        taken, rest = moved
        if len(rest):
            _deliver(other, rest)
        return taken > 0

    def age(self) -> None:
        self.table.age(time.monotonic())

    def pump(self) -> bool:
        """Move one burst from every port that has frames; returns whether any chains
        were taken."""
        did = False
        for at, port in enumerate(self.vports):  # (the first of `ports`)
            try:
                for iq in port.tx_queues():
                    if self._paired:
                        moved = self._paired_burst(port, at, iq)
                        if moved is not None:
                            did = did or moved
                            continue
                    popped = iq.q.popped
                    frames = port.take_tx(iq)
                    if frames:
                        self.forward(port, frames, at)
                    did = did or iq.q.popped != popped  # (chains whose frames all
                    # dropped are work done too: more may wait behind them)
                if port.device.announce:
                    announce, port.device.announce = port.device.announce, []
                    self.forward(port, Frames.of(announce), at)
            except Exception:  # a bug on one port's data path ends that port's connection
                log.exception("%s: internal error on the data path; dropping the front-end",
                              port.name)
                port.disconnect()
        if self.tap is not None:
            try:
                frames = self.tap.take()
                if frames:
                    did = True
                    self.forward(self.tap, frames)
            except Exception:  # a bug on the uplink's path costs those frames only
                log.exception("tap: internal error on the data path; frames dropped")
        return did

    # -- status --------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        now = time.monotonic()
        return {
            "uptime_s": round(now - self.started, 3),
            "ports": [p.status() for p in self.ports],
            "macs": [{"mac": m.hex(":"), "port": self.ports[p].name,
                      "expires_in_s": round(t - now, 1)}
                     for m, p, t in self.table.items() if t >= now],
        }

    def _serve_control(self) -> None:
        """A control client connected: it gets the status as one JSON line, sent as its
        socket takes it (a client that does not read is dropped after CONTROL_TIMEOUT)."""
        assert self._control is not None
        try:
            conn, _ = self._control.accept()
        except OSError:  # nothing waiting, or out of fds
            return
        conn.setblocking(False)
        data = memoryview(json.dumps(self.status()).encode() + b"\n")
        self._readers[conn] = (data, time.monotonic() + CONTROL_TIMEOUT)
        self._write_status(conn)

    def _write_status(self, conn: socket.socket) -> None:
        data, deadline = self._readers[conn]
        try:
            n = conn.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            n = len(data)  # gone: nothing more to send
        if n == len(data) or time.monotonic() > deadline:
            del self._readers[conn]
            conn.close()
            self._changed()
        elif n:
            self._readers[conn] = (data[n:], deadline)
            self._changed()

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stop: StopSignal) -> None:
        if net_kernel.available() and route.available():  # VHOSTUSER_JIT=1: loaded now,
            log.info(COMPILED)  # not at the first frame
        try:  # (what a port made is removed if a later one fails)
            for p in self.vports:
                p.open()
            if self.control_path:
                self._control = listen(self.control_path)
                self._control.setblocking(False)
            self._loop(stop)
        finally:
            for p in self.vports:
                p.close()
            if self.tap is not None:
                self.tap.close()
            for conn in self._readers:
                conn.close()
            self._readers.clear()
            if self._control is not None:
                self._control.close()
                try:
                    os.unlink(self.control_path or "")
                except OSError:
                    pass

    def _watch(self, stop: StopSignal) -> Watch:
        # a transmit queue with no kick fd (SET_VRING_KICK's NOFD) is polled all the time
        self._kickless = any(iq.kick_fd is None for p in self.vports for iq in p.tx_queues())
        w = self._current = Watch(stop)
        if self._control is not None:
            w.add(self._control.fileno(), self._serve_control)
        for conn in self._readers:
            w.add(conn.fileno(), functools.partial(self._write_status, conn), write=True,
                  read=False)
        if self.tap is not None:
            w.add(self.tap.fileno(), lambda: None)
        for p in self.vports:
            if p.listener is not None and p.conn is None:  # a newcomer waits in the backlog
                w.add(p.listener.fileno(), p.accept)
            if p.conn is not None:
                w.add(p.conn.fileno(), p.on_message, p.conn.wants_write)
            if p.link is not None:
                for fd in p.link.event_fds():
                    w.add(fd, p.on_vvu_event)
            for iq in p.tx_queues():
                if iq.kick_fd is not None:
                    w.add(iq.kick_fd, functools.partial(_drain_eventfd, iq.kick_fd))
        return w

    def _loop(self, stop: StopSignal) -> None:
        watch = self._watch(stop)
        busy_until = 0.0
        next_age = next_connect = next_look = next_check = next_poll = time.monotonic()
        # ports on a virtio-vhost-user device with no interrupts (in an appliance VM): their
        # messages and session changes are looked for every VVU_LOOK seconds
        unwired = [p for p in self.vports if p.link is not None and not p.link.event_fds()]
        while True:
            if self._dirty:
                self._dirty = False
                watch = self._watch(stop)
            now = time.monotonic()
            if unwired and now >= next_look:
                for p in unwired:
                    p.on_vvu_event()
                next_look = now + VVU_LOOK
            polling = bool(unwired) or self._kickless
            if now < busy_until or polling:
                timeout = 0
            else:
                timeout = 1000
                self._kicks(True)
                if self.pump():  # frames came while kicks were off
                    busy_until = time.monotonic() + self.spin
                    self._kicks(False)
                    continue
            if timeout or now >= next_poll:  # (busy: every BUSY_POLL, not every burst)
                watch.dispatch(timeout)
                next_poll = now + BUSY_POLL
            if timeout:
                self._kicks(False)
            if self.pump():
                busy_until = time.monotonic() + self.spin
            now = time.monotonic()
            if now >= next_age:
                self.age()
                next_age = now + 1.0
            if now >= next_check:  # front-ends that hold back half a message, or ours
                for p in self.vports:
                    p.check_peer(now)
                for conn, (_, deadline) in list(self._readers.items()):
                    if now > deadline:
                        self._write_status(conn)
                next_check = now + PEER_CHECK
            if now >= next_connect:
                for p in self.vports:
                    if p.client and p.conn is None:
                        p.try_connect()
                next_connect = now + 0.5

    def _kicks(self, on: bool) -> None:
        for p in self.vports:
            for iq in p.tx_queues():
                if on:
                    iq.q.enable_kicks()
                else:
                    iq.q.disable_kicks()
                iq.check()


def _deliver(port: Port, frames: Frames) -> None:
    """Frames out of `port`; a bug on its path ends its connection, not the ingress's."""
    try:
        port.deliver(frames)
    except Exception:
        log.exception("%s: internal error delivering frames; dropping the front-end",
                      port.name)
        port.disconnect()


def _drain_eventfd(fd: int) -> None:
    try:
        os.read(fd, 8)
    except BlockingIOError:
        pass
