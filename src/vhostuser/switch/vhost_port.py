"""A switch port that is a vhost-user net device.

The engine (`Backend`) handles the port's vhost-user messages as for any device; its queues
are run in the switch's own loop by `InlineQueue` instead of worker processes, because
frames move between the guest memories of different ports and all of them are mapped here.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import numpy as np

from ..devices.net import (
    F_MRG_RXBUF,
    GSO_NONE,
    HDR_F_NEEDS_CSUM,
    NetPort,
    rx_header,
    tx_header_ok,
)
from ..engine.backend import Backend
from ..engine.device import Device
from ..engine.notify import Notifier
from ..engine.worker import QueueParams, Running, parent_only_fds
from ..framer import close_fds
from ..memory import GuestMemory, MemoryTableError
from ..protocol import Header, ProtocolError, encode
from ..transport.unix import (
    PeerClosed,
    PeerStalled,
    UnixChannel,
    UnixResources,
    connect,
    listen,
)
from ..transport.vvu import VvuLink, VvuResources, split_message
from ..virtq.burst import DirectBurst, pop_direct, push_heads, scatter_frames
from ..virtq.iov import iov_write
from ..virtq.split import DESC_F_WRITE, Chain, RingError, SplitQueue
from ..vvu.abi import S_BACKEND_UP
from .port import Port

log = logging.getLogger(__name__)

MAX_BURST = 256


class InlineQueue:
    """A queue served in this process (the engine's `Running` for the switch)."""

    def __init__(self, port: VhostPort, q: SplitQueue, index: int, kick_fd: int | None,
                 call: Notifier, err: Notifier) -> None:
        self.port, self.q, self.index = port, q, index
        self.kick_fd, self.call, self.err = kick_fd, call, err
        self.broken = False

    @property
    def is_tx(self) -> bool:
        return self.index % 2 == 1

    def fail(self, e: Exception) -> None:
        log.error("%s queue %d: stopped: %s", self.port.name, self.index, e)
        self.broken = True
        self.err.notify()

    def stop(self) -> tuple[int | None, bool]:
        self.port.queues.pop(self.index, None)
        self.port.changed()
        last = self.q.last_avail
        self.q.release()
        return last, self.broken


class BrokenQueue:
    """A queue that could not start (its ring lies outside guest memory): nothing runs;
    GET_VRING_BASE gets its index back, and the front-end must set it up again."""

    def __init__(self, last_avail: int) -> None:
        self.last_avail = last_avail

    def stop(self) -> tuple[int | None, bool]:
        return self.last_avail, True


class VhostPort(Port):
    def __init__(self, name: str, path: str | None, mac: bytes, *, client: bool = False,
                 fd: int | None = None, vvu: str | None = None, poll: bool = False,
                 queue_pairs: int = 1, mtu: int = 1500,
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
        self.device = NetPort(mac, queue_pairs, mtu)
        self.queues: dict[int, InlineQueue] = {}
        self.listener: socket.socket | None = None
        self.conn: UnixChannel | None = None
        self.backend: Backend | None = None
        self.changed = changed  # tell the loop to rebuild what it watches
        self.message_timeout = message_timeout
        self._rr = 0

    # -- connection ----------------------------------------------------------------------------

    def open(self) -> None:
        if self.vvu is not None:
            self.link = VvuLink(self.vvu)
            self.link.begin_session()
            return
        if self.fd is not None:  # inherited: a listening socket, or one connection
            sock = socket.socket(fileno=self.fd)
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                self._attach(sock)
                return
            self.listener = sock
        elif not self.client:
            assert self.path is not None
            self.listener = listen(self.path)
        if self.listener is not None:
            self.listener.setblocking(False)
            parent_only_fds.add(self.listener.fileno())

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
        parent_only_fds.add(sock.fileno())
        self.conn = UnixChannel(sock, message_timeout=self.message_timeout)
        self.backend = Backend(self.device, UnixResources(), runner=self._run_queue)
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
                                       runner=self._run_queue)
                self.changed()
                messages += link.take_messages()
            backend = self.backend
            if backend is not None:
                for data in messages:
                    reply = backend.receive(*split_message(data))
                    if reply is not None:
                        link.send(encode(reply))
        except Exception as e:  # whatever it is, it ends this port's session only
            if isinstance(e, ProtocolError | OSError | MemoryTableError):
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
            parent_only_fds.discard(self.conn.fileno())
            self.conn.close()
            self.conn = None
        self.changed()

    def close(self) -> None:
        link, self.link = self.link, None  # the port is going: no next session
        self.disconnect()
        if link is not None:
            link.close()
        if self.listener is not None:
            parent_only_fds.discard(self.listener.fileno())
            self.listener.close()
            self.listener = None
            if self.path is not None:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass

    def _run_queue(self, params: QueueParams, mem: GuestMemory, device: Device,
                   kick_fd: int | None, call: Notifier, err: Notifier) -> Running:
        try:
            q = SplitQueue(mem, params.layout, params.last_avail, params.event_idx,
                           params.indirect)
        except RingError as e:  # a ring outside guest memory: this queue stays stopped
            log.error("%s queue %d: cannot start: %s", self.name, params.index, e)
            err.notify()
            return BrokenQueue(params.last_avail)
        iq = InlineQueue(self, q, params.index, kick_fd, call, err)
        if not iq.is_tx:
            q.disable_kicks()  # buffers posted to rx need no kick: we look when a frame comes
        self.queues[params.index] = iq
        self.changed()
        return iq

    # -- data path -----------------------------------------------------------------------------

    def tx_queues(self) -> list[InlineQueue]:
        return [iq for iq in self.queues.values() if iq.is_tx and not iq.broken]

    def take_tx(self, iq: InlineQueue) -> list[bytes]:
        """Frames the guest transmitted on `iq` (at most a burst); the buffers go back to
        the guest at once. Invalid frames are dropped and counted."""
        q, dev = iq.q, self.device
        try:
            n = q.available()
        except RingError as e:
            iq.fail(e)
            return []
        if not n:
            return []
        burst = pop_direct(q, min(n, MAX_BURST))
        if burst is not None:
            return self._take_direct(iq, burst)
        chains, error = q.pop_batch(min(n, MAX_BURST))
        c = self.counters
        hl, max_frame = dev.hdr_len, dev.max_frame()
        frames = []
        for chain in chains:
            r = chain.readable
            buf = r[0] if len(r) == 1 else b"".join(r)
            size = len(buf) - hl
            if size < 0 or not tx_header_ok(buf[:hl]):
                c.drops["bad_header"] += 1
            elif size < 14:
                c.drops["runt"] += 1
            elif size > max_frame:
                c.drops["oversize"] += 1
            elif buf[hl + 6] & 1:
                c.drops["bad_source_mac"] += 1
            else:
                frames.append(bytes(buf[hl:]))
                c.rx_bytes += size
        c.rx_packets += len(frames)
        if chains:
            q.push_batch(chains, [0] * len(chains))
            if q.publish():
                iq.call.notify()
        if error is not None:
            iq.fail(error)
        return frames

    def _take_direct(self, iq: InlineQueue, b: DirectBurst) -> list[bytes]:
        """`take_tx` for a burst of one-descriptor chains: the same checks, as array
        operations over the whole burst; then one copy per valid frame."""
        dev, c, u8 = self.device, self.counters, b.u8
        hl, max_frame = dev.hdr_len, dev.max_frame()
        size = b.lengths - hl
        has_hdr = size >= 0
        at = np.where(has_hdr, b.offsets, 0)  # in bounds whatever the buffer's length
        bad = ~has_hdr | (u8[at] & HDR_F_NEEDS_CSUM != 0) | (u8[at + 1] != GSO_NONE)
        runt = ~bad & (size < 14)
        over = ~bad & ~runt & (size > max_frame)
        ok = ~(bad | runt | over)
        src_mc = ok & (u8[np.where(ok, b.offsets + hl + 6, 0)] & 1 != 0)
        ok &= ~src_mc
        for reason, mask in (("bad_header", bad), ("runt", runt), ("oversize", over),
                             ("bad_source_mac", src_mc)):
            k = int(np.count_nonzero(mask))
            if k:
                c.drops[reason] += k
        view = b.view
        starts = b.offsets[ok] + hl
        frames = [bytes(view[s:e]) for s, e in zip(starts.tolist(),
                                                   (b.offsets + b.lengths)[ok].tolist(),
                                                   strict=True)]
        c.rx_packets += len(frames)
        c.rx_bytes += int(size[ok].sum())
        push_heads(iq.q, b.heads)
        if iq.q.publish():
            iq.call.notify()
        return frames

    def deliver(self, frames: list[bytes]) -> None:
        rx = [iq for i, iq in sorted(self.queues.items()) if i % 2 == 0 and not iq.broken]
        if not rx:
            self.counters.drops["port_down"] += len(frames)
            return
        if len(rx) == 1:
            self._fill(rx[0], frames)
            return
        groups: dict[int, list[bytes]] = {}
        for f in frames:  # spread flows over the rx queues, keeping each flow in order
            groups.setdefault(hash(f[:12] + f[26:38]) % len(rx), []).append(f)
        for i, fl in groups.items():
            self._fill(rx[i], fl)

    def _fill(self, iq: InlineQueue, frames: list[bytes]) -> None:
        q, c = iq.q, self.counters
        dev = self.device
        hl = dev.hdr_len
        mrg = bool(dev.negotiated & F_MRG_RXBUF)
        max_frame = dev.max_frame()
        try:
            avail = q.available()
        except RingError as e:
            iq.fail(e)
            return
        hdr1 = rx_header(hl, 1)
        while avail and frames:  # the burst path, as far as it goes; the rest below
            done = self._fill_direct(iq, frames, hdr1, avail, max_frame)
            if not done:
                break
            frames, avail = frames[done:], avail - done
        if not frames:
            return
        used, lens = [], []
        try:
            for frame in frames:
                need = hl + len(frame)
                if len(frame) > max_frame:
                    c.drops["oversize"] += 1
                    continue
                if not avail:
                    c.drops["no_rx_buffer"] += 1
                    continue
                chain = q.pop()
                avail -= 1
                w = chain.writable
                w0 = w[0] if w else None
                if w0 is not None and len(w0) >= need:  # the usual case: one buffer
                    w0[:hl] = hdr1
                    w0[hl:need] = frame
                    used.append(chain)
                    lens.append(need)
                elif sum(map(len, w)) >= need:
                    iov_write(w, hdr1 + frame)
                    used.append(chain)
                    lens.append(need)
                elif mrg:
                    avail = self._spread(q, chain, frame, hl, avail, used, lens)
                    if avail < 0:
                        avail = 0
                        c.drops["no_rx_buffer"] += 1
                        continue
                else:  # dropped; the buffer stays for a frame that fits (as DPDK does)
                    q.unpop()
                    avail += 1
                    c.drops["rx_buffer_too_small"] += 1
                    continue
                c.tx_packets += 1
                c.tx_bytes += len(frame)
        except RingError as e:
            iq.fail(e)
        if used:
            q.push_batch(used, lens)
            if q.publish():
                iq.call.notify()

    def _fill_direct(self, iq: InlineQueue, frames: list[bytes], hdr: bytes, avail: int,
                     max_frame: int) -> int:
        """`_fill` for the leading frames that each get a one-descriptor buffer they fit:
        buffers taken, headers written and buffers returned with array operations
        (burst.py), one copy per frame. Returns how many frames it delivered (0: none,
        nothing done; the chain walk in `_fill` takes the rest, with its drop counting)."""
        q, c = iq.q, self.counters
        n = min(len(frames), avail)
        if not n or max(map(len, frames[:n])) > max_frame:
            return 0
        burst = pop_direct(q, n, DESC_F_WRITE)
        if burst is None:
            return 0
        k = len(burst.heads)
        written = scatter_frames(burst, hdr, frames[:k])
        if written is None:
            q.last_avail = (q.last_avail - k) & 0xFFFF  # give the buffers back
            return 0
        push_heads(q, burst.heads, written)
        c.tx_packets += k
        c.tx_bytes += int(written.sum()) - k * len(hdr)
        if q.publish():
            iq.call.notify()
        return k

    @staticmethod
    def _spread(q: SplitQueue, first: Chain, frame: bytes, hl: int, avail: int,
                used: list[Chain], lens: list[int]) -> int:
        """MRG_RXBUF: lay one frame over as many chains as it takes; the header of the
        first says how many. Returns the chains still available, -1 if they ran out."""
        data = bytearray(rx_header(hl, 1) + frame)
        chains = [first]
        room = sum(len(v) for v in first.writable)
        while room < len(data):
            if not avail:
                used.append(first)  # return what we took, empty
                lens.append(0)
                for extra in chains[1:]:
                    used.append(extra)
                    lens.append(0)
                return -1
            chain = q.pop()
            avail -= 1
            chains.append(chain)
            room += sum(len(v) for v in chain.writable)
        data[hl - 2 : hl] = len(chains).to_bytes(2, "little")  # num_buffers
        off = 0
        for chain in chains:
            n = iov_write(chain.writable, memoryview(data)[off:])
            used.append(chain)
            lens.append(n)
            off += n
        return avail

    def status(self) -> dict[str, object]:
        st = super().status()
        st.update(socket=self.path or self.vvu, connected=self.backend is not None,
                  queues=sorted(i for i, iq in self.queues.items() if not iq.broken),
                  mtu=self.device.mtu)
        return st
