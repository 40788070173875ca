"""A vhost-user front-end that plays the VMM: connects to any back-end, negotiates,
shares a memfd as guest RAM, sets up split rings and kicks them. No VM needed.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from ..protocol import (
    Channel,
    FrontendReq,
    Message,
    ProtocolFeature,
    VirtioFeature,
    decode_reply,
    expects_reply,
    has_own_reply,
    request,
)
from ..protocol import payloads as p
from ..protocol.constants import DEVICE_STATE_LOAD, DEVICE_STATE_SAVE
from ..shutdown import readable
from ..sockets import connect
from ..unix_channel import UnixChannel
from ..virtq.guest_ram import GuestRam
from ..virtq.packed_driver import FRESH_BASE, PackedDriverRing
from ..virtq.split_driver import DriverRing

F = FrontendReq


class BackendError(Exception):
    """The back-end NACKed a request or answered nonsense."""


@dataclass
class QueueState:
    ring: DriverRing | PackedDriverRing
    kick: int  # eventfd we write to kick
    call: int  # eventfd the back-end signals


@dataclass
class Frontend:
    path: str
    ram_size: int = 64 << 20
    connect_timeout: float = 10.0
    reply_timeout: float = 30.0
    sock: UnixChannel = field(init=False)
    ram: GuestRam = field(init=False)
    features: int = 0
    protocol_features: int = 0
    queues: dict[int, QueueState] = field(default_factory=dict)

    conn: socket.socket | None = None  # a connection made elsewhere (a listening front-end)

    def __post_init__(self) -> None:
        sock = self.conn or connect(self.path, retry_for=self.connect_timeout)
        # a back-end that never answers fails, not hangs
        self.sock = UnixChannel(sock, timeout=self.reply_timeout)
        self.ram = GuestRam(self.ram_size)

    # -- messages ----------------------------------------------------------------------------

    def call(self, code: int, payload: p.Payload | None = None, fds: tuple[int, ...] = (),
             ack: bool | None = None) -> Message | None:
        """Send a request; return its reply (or None). With REPLY_ACK negotiated every
        request asks for an ack, and a NACK raises BackendError."""
        reply, rfds = self.call_with_fds(code, payload, fds, ack)
        for fd in rfds:
            os.close(fd)
        return reply

    def call_with_fds(self, code: int, payload: p.Payload | None = None,
                      fds: tuple[int, ...] = (), ack: bool | None = None
                      ) -> tuple[Message | None, list[int]]:
        """`call`, and the fds that came with the reply (the caller's to close)."""
        if ack is None:
            ack = bool(self.protocol_features & ProtocolFeature.REPLY_ACK)
        msg = request(code, payload, need_reply=ack)
        self.sock.send(msg, fds)
        if not expects_reply(Channel.FRONTEND, msg, self.protocol_features):
            return None, []
        header, body, rfds = self.sock.recv_raw()
        try:
            reply = decode_reply(Channel.FRONTEND, code, header, body, len(rfds))
            is_ack = not has_own_reply(Channel.FRONTEND, msg, self.protocol_features)
            if is_ack and isinstance(reply.payload, p.U64) and reply.payload.value != 0:
                raise BackendError(f"{F(code).name} NACKed ({reply.payload.value})")
        except BaseException:
            for fd in rfds:
                os.close(fd)
            raise
        return reply, rfds

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[p.Inflight, int | None]:
        """GET_INFLIGHT_FD: the area's description and its fd (None if the back-end
        declined: mmap_size 0)."""
        reply, fds = self.call_with_fds(F.GET_INFLIGHT_FD,
                                        p.Inflight(0, 0, num_queues, queue_size), ack=False)
        assert reply is not None and isinstance(reply.payload, p.Inflight)
        return reply.payload, (fds[0] if fds else None)

    def save_device_state(self) -> bytes:
        """DEVICE_STATE, saving: the back-end's state, read from our pipe or from the
        channel the back-end gave instead, then CHECK_DEVICE_STATE (BackendError on a
        failure either reports)."""
        r, w = os.pipe()
        try:
            r = self._state_channel(DEVICE_STATE_SAVE, w, r)
            chunks = []
            while chunk := os.read(r, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(r)
        self._check_device_state()
        return b"".join(chunks)

    def load_device_state(self, data: bytes) -> None:
        """DEVICE_STATE, loading: `data` written into our pipe or the back-end's channel,
        closed, then CHECK_DEVICE_STATE."""
        r, w = os.pipe()
        try:
            w = self._state_channel(DEVICE_STATE_LOAD, r, w)
            view = memoryview(data)
            while view:
                view = view[os.write(w, view):]
        finally:
            os.close(w)
        self._check_device_state()

    def _state_channel(self, direction: int, theirs: int, ours: int) -> int:
        """SET_DEVICE_STATE_FD with `theirs` (closed here): our end of the channel (`ours`,
        or the back-end's fd in its place, `ours` then closed; on a failure `ours` stays
        the caller's)."""
        try:
            reply, fds = self.call_with_fds(F.SET_DEVICE_STATE_FD,
                                            p.DeviceStateParams(direction, 0), fds=(theirs,),
                                            ack=False)
        finally:
            os.close(theirs)
        assert reply is not None and isinstance(reply.payload, p.U64)
        if reply.payload.value & 0xFF:
            for fd in fds:
                os.close(fd)
            raise BackendError(f"SET_DEVICE_STATE_FD failed ({reply.payload.value:#x})")
        for fd in fds[1:]:
            os.close(fd)
        if fds:
            os.close(ours)
            return fds[0]
        return ours

    def _check_device_state(self) -> None:
        if (value := self.get_u64(F.CHECK_DEVICE_STATE)) != 0:
            raise BackendError(f"CHECK_DEVICE_STATE failed ({value})")

    def get_u64(self, code: int) -> int:
        reply = self.call(code, ack=False)
        assert reply is not None and isinstance(reply.payload, p.U64)
        return reply.payload.value

    # -- set-up ------------------------------------------------------------------------------

    def negotiate(self, want: int, want_protocol: int | None = None) -> None:
        """SET_OWNER, features and protocol features, as QEMU does at device init."""
        self.call(F.SET_OWNER, ack=False)
        offered = self.get_u64(F.GET_FEATURES)
        self.features = offered & (want | VirtioFeature.PROTOCOL_FEATURES)
        if offered & VirtioFeature.PROTOCOL_FEATURES:
            pf = self.get_u64(F.GET_PROTOCOL_FEATURES)
            if want_protocol is not None:
                pf &= want_protocol
            self.call(F.SET_PROTOCOL_FEATURES, p.U64(pf), ack=False)
            self.protocol_features = pf
        self.call(F.SET_FEATURES, p.U64(self.features))

    def set_mem_table(self) -> None:
        self.call(F.SET_MEM_TABLE, p.MemTable((self.ram.region(),)), fds=(self.ram.fd,))

    def setup_queue(self, index: int, size: int = 128, enable: bool = True,
                    base: int | None = None) -> QueueState:
        """A new ring (packed if RING_PACKED was negotiated) at `base` (None: a fresh
        ring's)."""
        event_idx = bool(self.features & VirtioFeature.RING_EVENT_IDX)
        ring: DriverRing | PackedDriverRing
        if self.features & VirtioFeature.RING_PACKED:
            ring = PackedDriverRing(self.ram, size, event_idx)
            base = FRESH_BASE if base is None else base
        else:
            ring = DriverRing(self.ram, size, event_idx)
            base = base or 0
        ring.start_at(base)
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        lay = ring.layout()
        self.call(F.SET_VRING_NUM, p.VringState(index, size))
        self.call(F.SET_VRING_BASE, p.VringState(index, base))
        self.call(F.SET_VRING_ADDR, p.VringAddr(index, 0, lay.desc, lay.used, lay.avail, 0))
        self.call(F.SET_VRING_KICK, p.VringFile.make(index), fds=(kick,))
        self.call(F.SET_VRING_CALL, p.VringFile.make(index), fds=(call,))
        if enable and self.features & VirtioFeature.PROTOCOL_FEATURES:
            self.call(F.SET_VRING_ENABLE, p.VringState(index, 1))
        q = QueueState(ring, kick, call)
        self.queues[index] = q
        return q

    def get_vring_base(self, index: int) -> int:
        if self.features & VirtioFeature.PROTOCOL_FEATURES:
            self.call(F.SET_VRING_ENABLE, p.VringState(index, 0))
        reply = self.call(F.GET_VRING_BASE, p.VringState(index, 0), ack=False)
        assert reply is not None and isinstance(reply.payload, p.VringState)
        return reply.payload.num

    def restart_queue(self, index: int) -> int:
        """Stop queue `index` (GET_VRING_BASE) and start it again where it stopped, on the
        same ring and eventfds, as QEMU does around a VM pause; returns the base."""
        base = self.get_vring_base(index)
        self.start_queue(index, base)
        return base

    def start_queue(self, index: int, base: int) -> None:
        """Start queue `index` again from `base` on its ring and eventfds (after
        GET_VRING_BASE stopped it)."""
        q = self.queues[index]
        lay = q.ring.layout()
        self.call(F.SET_VRING_NUM, p.VringState(index, q.ring.size))
        self.call(F.SET_VRING_BASE, p.VringState(index, base))
        self.call(F.SET_VRING_ADDR, p.VringAddr(index, 0, lay.desc, lay.used, lay.avail, 0))
        self.call(F.SET_VRING_KICK, p.VringFile.make(index), fds=(q.kick,))
        self.call(F.SET_VRING_CALL, p.VringFile.make(index), fds=(q.call,))
        if self.features & VirtioFeature.PROTOCOL_FEATURES:
            self.call(F.SET_VRING_ENABLE, p.VringState(index, 1))

    def get_config(self, size: int, offset: int = 0) -> bytes:
        reply = self.call(F.GET_CONFIG, p.Config(offset, size, 0, bytes(size)), ack=False)
        assert reply is not None and isinstance(reply.payload, p.Config)
        if reply.payload.size != size:
            raise BackendError(f"GET_CONFIG answered {reply.payload.size} bytes, not {size}")
        return reply.payload.data

    # -- data path ---------------------------------------------------------------------------

    def kick(self, index: int) -> None:
        q = self.queues[index]
        if q.ring.needs_kick():
            os.eventfd_write(q.kick, 1)

    def wait_used(self, index: int, count: int = 1, timeout: float = 10.0) -> list[tuple[int, int]]:
        """Wait until `count` chains of queue `index` are used; returns (head, len) pairs."""
        q = self.queues[index]
        out = q.ring.take_used()
        while len(out) < count:
            if not readable([q.call], timeout):
                raise TimeoutError(f"queue {index}: {len(out)} of {count} requests completed")
            try:
                os.eventfd_read(q.call)
            except BlockingIOError:
                pass
            out += q.ring.take_used()
        return out

    def drop_queues(self) -> None:
        """Forget the rings (after RESET_DEVICE, say) and close their eventfds."""
        for q in self.queues.values():
            q.ring.release()
            os.close(q.kick)
            os.close(q.call)
        self.queues.clear()

    def close(self) -> None:
        self.sock.close()
        self.drop_queues()
        self.ram.close()

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def raw_socket(path: str) -> socket.socket:
    """A bare connection, for tests that send malformed bytes."""
    return connect(path, retry_for=10.0)
