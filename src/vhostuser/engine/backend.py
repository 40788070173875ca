"""The back-end engine: the vhost-user state machine for one front-end connection.

`Backend.handle` takes one decoded request and the resources that came with it and
returns the reply to send, if any. It does no socket I/O: resources (region fds, kick and
call eventfds) are opaque tokens that it hands back to the transport's `Resources` to map
or signal, so the same engine serves AF_UNIX and virtio-vhost-user.
"""

from __future__ import annotations

import logging
import mmap
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..memory import Buffer, GuestMemory, GuestMemoryError, MemoryTableError
from ..protocol import (
    FRONTEND_SPECS,
    Channel,
    Header,
    Message,
    ProtocolError,
    decode_request,
    expects_reply,
    has_own_reply,
    reply_to,
    request,
)
from ..protocol import payloads as p
from ..protocol.constants import (
    DEVICE_STATE_LOAD,
    DEVICE_STATE_NO_FD,
    DEVICE_STATE_PHASE_STOPPED,
    DEVICE_STATE_SAVE,
    LOG_ALL,
    VRING_F_LOG,
    BackendReq,
    FrontendReq,
    ProtocolFeature,
    VirtioFeature,
)
from ..virtq import dirtylog
from ..virtq.atomic import U16Array
from ..virtq.dirtylog import DirtyLog, log_bytes_for
from ..virtq.inflight import MAX_QUEUE_SIZE, area_bytes, queue_region_bytes
from ..virtq.packed import MAX_SIZE as MAX_PACKED_SIZE
from ..virtq.ring import RingLayout
from .device import STATE_BYTES, Carried, ConfigError, Device, StateError
from .notify import NoNotifier, Notifier
from .worker import (
    DEFAULT_SPIN_US,
    QueueParams,
    QueueSpec,
    Runner,
    Running,
    start_worker,
)

log = logging.getLogger(__name__)

STATE_BLOCK = 64  # bytes of device state after an in-flight area's queue regions

Resource = Any  # an fd for AF_UNIX; whatever the transport passes in place of one

# Plain ints: in Python 3.11, ~ on an IntFlag inverts only the defined bits.
TRANSPORT_FEATURES = int(VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC
                         | VirtioFeature.RING_EVENT_IDX | VirtioFeature.RING_PACKED
                         | VirtioFeature.PROTOCOL_FEATURES)
ENGINE_PROTOCOL_FEATURES = int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                               | ProtocolFeature.RESET_DEVICE
                               | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.STATUS)

# Requests valid only once a protocol feature is negotiated.
_GATES = {
    FrontendReq.GET_QUEUE_NUM: ProtocolFeature.MQ,
    FrontendReq.GET_CONFIG: ProtocolFeature.CONFIG,
    FrontendReq.SET_CONFIG: ProtocolFeature.CONFIG,
    FrontendReq.RESET_DEVICE: ProtocolFeature.RESET_DEVICE,
    FrontendReq.GET_MAX_MEM_SLOTS: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    FrontendReq.ADD_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    FrontendReq.REM_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    FrontendReq.SET_STATUS: ProtocolFeature.STATUS,
    FrontendReq.GET_STATUS: ProtocolFeature.STATUS,
    FrontendReq.NET_SET_MTU: ProtocolFeature.MTU,
    FrontendReq.SEND_RARP: ProtocolFeature.RARP,
    FrontendReq.SET_BACKEND_REQ_FD: ProtocolFeature.BACKEND_REQ,
    FrontendReq.SET_LOG_BASE: ProtocolFeature.LOG_SHMFD,
    FrontendReq.SET_LOG_FD: ProtocolFeature.LOG_SHMFD,
    FrontendReq.GET_INFLIGHT_FD: ProtocolFeature.INFLIGHT_SHMFD,
    FrontendReq.SET_INFLIGHT_FD: ProtocolFeature.INFLIGHT_SHMFD,
    FrontendReq.SET_DEVICE_STATE_FD: ProtocolFeature.DEVICE_STATE,
    FrontendReq.CHECK_DEVICE_STATE: ProtocolFeature.DEVICE_STATE,
}

MAX_STATE_BYTES = 64 << 20  # the largest device state taken up (the front-end's bytes)


class RequestError(Exception):
    """The back-end refuses a well-formed request (NACKed when the front-end asked)."""


class ResourceError(Exception):
    """The transport cannot make, map or use a resource besides memory regions: a shared
    area, an eventfd of the wrong kind, a device-state file, the back-end channel."""


class Resources(Protocol):
    """What the engine needs from a transport besides messages."""

    max_mem_slots: int
    shared_areas: bool  # whether new_area and map_area work (in-flight areas)
    shared_log: bool  # whether map_area works for SET_LOG_BASE's log (live migration)
    shared_state: bool  # whether state_file and read_state_file work (DEVICE_STATE)

    def map_region(self, desc: p.MemRegion, res: Resource) -> Buffer: ...

    def new_area(self, size: int) -> tuple[Resource, Buffer]:
        """A zeroed area of `size` bytes to share with the front-end: what to send it, and
        the mapping. ResourceError if it cannot be made."""
        ...

    def map_area(self, res: Resource, size: int, offset: int) -> Buffer:
        """The front-end's area `res`: `size` bytes from `offset`, mapped shared."""
        ...

    def state_file(self, data: bytes) -> Resource:
        """A file for SET_DEVICE_STATE_FD's reply: `data` for the front-end to read from
        its start to its end, or (empty) for it to write the state into. ResourceError if
        it cannot be made."""
        ...

    def read_state_file(self, res: Resource, limit: int) -> bytes:
        """What the front-end wrote into `state_file(b"")`; ResourceError past `limit`
        bytes."""
        ...

    def check_kick(self, res: Resource) -> None:
        """Raise ResourceError unless `res` can serve as a kick."""
        ...

    def kick_fd(self, res: Resource) -> int | None: ...

    def notifier(self, res: Resource) -> Notifier: ...

    def backend_channel(self, res: Resource) -> BackendChannel:
        """The front-end's channel for back-end requests (SET_BACKEND_REQ_FD)."""
        ...

    def close(self, res: Resource) -> None: ...


class BackendChannel(Protocol):
    def send(self, msg: Message) -> None: ...

    def close(self) -> None: ...


@dataclass
class Vring:
    index: int
    size: int = 0
    addr: p.VringAddr | None = None
    base: int = 0
    kick: Resource = None
    started: bool = False
    enabled: bool = False
    call: Notifier = field(default_factory=NoNotifier)
    err: Notifier = field(default_factory=NoNotifier)
    group: int = 0  # which of the device's queue groups (one worker each) it is in
    broken: bool = False

    def ready(self) -> bool:
        return (self.started and self.enabled and not self.broken and self.size > 0
                and self.addr is not None)


@dataclass
class StateTransfer:
    """A SET_DEVICE_STATE_FD under way: the file given to the front-end in the reply (the
    state to read, or where it writes the state), until CHECK_DEVICE_STATE."""

    load: bool
    res: Resource


@dataclass
class InflightArea:
    """The front-end's in-flight area (INFLIGHT_SHMFD): one region per queue, each sized
    for `queue_size` descriptors, laid out for split or packed rings as negotiated when the
    front-end asked for it (virtq/inflight.py, virtq/inflight_packed.py)."""

    mapping: Buffer
    num_queues: int
    queue_size: int
    res: Resource = None  # ours, made for GET_INFLIGHT_FD: kept until the area goes
    has_state: bool = True  # the state block is there (an area of ours, not an older one)
    packed: bool = False

    # After the queues' regions, the device's state (Device.state): magic, u16 length, pad,
    # the bytes. Ours: a front-end keeps the area whole without reading it.
    STATE_MAGIC = b"VUST"

    def _state_view(self) -> memoryview:
        at = area_bytes(self.num_queues, self.queue_size, self.packed)
        return memoryview(self.mapping)[at : at + STATE_BLOCK]

    def save_state(self, state: bytes) -> None:
        if not self.has_state or self.saved_state() == state:
            return  # nothing to keep it in, or nothing new: the block stays valid
        with self._state_view() as v:
            v[:4] = bytes(4)  # invalid while it changes: a death meanwhile keeps none
            v[4:6] = len(state).to_bytes(2, "little")
            v[8 : 8 + len(state)] = state
            v[:4] = self.STATE_MAGIC

    def saved_state(self) -> bytes | None:
        if not self.has_state:
            return None
        with self._state_view() as v:
            if bytes(v[:4]) != self.STATE_MAGIC:
                return None
            n = int.from_bytes(v[4:6], "little")
            return bytes(v[8 : 8 + n]) if n <= STATE_BYTES else None

    def region(self, v: Vring, packed: bool) -> tuple[Buffer, int] | None:
        if v.index >= self.num_queues or v.size > self.queue_size:
            log.error("queue %d (size %d) is outside the in-flight area (%d queues of %d): "
                      "not tracked", v.index, v.size, self.num_queues, self.queue_size)
            return None
        if packed != self.packed:
            log.error("queue %d: the in-flight area is laid out for %s rings, the ring is "
                      "%s: not tracked", v.index, "packed" if self.packed else "split",
                      "packed" if packed else "split")
            return None
        return self.mapping, v.index * queue_region_bytes(self.queue_size, packed)


class Backend:
    def __init__(self, device: Device, resources: Resources,
                 poll_us: int = DEFAULT_SPIN_US, runner: Runner = start_worker,
                 track_inflight: bool = True, log_dirty: bool = True,
                 hold: Sequence[int] = ()) -> None:
        """`track_inflight`: offer INFLIGHT_SHMFD, `log_dirty`: LOG_SHMFD and
        VHOST_F_LOG_ALL (live migration), where the transport shares areas; a runner that
        does not take `QueueSpec.inflight` or `.log` up must say False. `hold`: the
        session's fds its workers keep open (Channel.fds)."""
        self.device = device
        self.res = resources
        self.poll_us = poll_us
        self.runner = runner  # how a started queue is served: a worker process by default
        self.hold = tuple(hold)
        self.track_inflight = track_inflight and resources.shared_areas
        self.inflight: InflightArea | None = None
        self.log_dirty = log_dirty and resources.shared_log and dirtylog.available()
        self.dirty_log: DirtyLog | None = None  # SET_LOG_BASE's
        self.log_signal: Notifier | None = None  # SET_LOG_FD's
        self.mem = GuestMemory(resources.max_mem_slots)
        self._region_refs: Counter[tuple[int, int, int]] = Counter()  # ADD_MEM_REG repeats
        self.owner = False
        self.features = 0
        self.protocol_features = 0
        self.status = 0
        self.groups = _groups(device)
        self.vrings = self._new_vrings()
        # group -> its worker and the queues it serves
        self.running: dict[int, tuple[Running, frozenset[int]]] = {}
        self.carried: dict[int, Carried] = {}  # group -> what its last worker handed over
        self.backend_req: BackendChannel | None = None
        self.transfer: StateTransfer | None = None  # SET_DEVICE_STATE_FD's
        H = FrontendReq
        self._handlers: dict[int, Callable[[Any, list[Resource]], Any]] = {
            H.GET_FEATURES: self._get_features,
            H.SET_FEATURES: self._set_features,
            H.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            H.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            H.SET_OWNER: self._set_owner,
            H.RESET_OWNER: self._reset_device,
            H.RESET_DEVICE: self._reset_device,
            H.GET_QUEUE_NUM: lambda _p, _f: p.U64(self.device.queue_num()),
            H.GET_MAX_MEM_SLOTS: lambda _p, _f: p.U64(self.mem.max_slots),
            H.SET_MEM_TABLE: self._set_mem_table,
            H.ADD_MEM_REG: self._add_mem_reg,
            H.REM_MEM_REG: self._rem_mem_reg,
            H.SET_VRING_NUM: self._set_vring_num,
            H.SET_VRING_ADDR: self._set_vring_addr,
            H.SET_VRING_BASE: self._set_vring_base,
            H.GET_VRING_BASE: self._get_vring_base,
            H.SET_VRING_KICK: self._set_vring_kick,
            H.SET_VRING_CALL: self._set_vring_call,
            H.SET_VRING_ERR: self._set_vring_err,
            H.SET_VRING_ENABLE: self._set_vring_enable,
            H.GET_CONFIG: self._get_config,
            H.SET_CONFIG: self._set_config,
            H.SET_STATUS: self._set_status,
            H.GET_STATUS: lambda _p, _f: p.U64(self.status),
            H.NET_SET_MTU: self._net_set_mtu,
            H.SEND_RARP: self._send_rarp,
            H.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            H.SET_LOG_BASE: self._set_log_base,
            H.SET_LOG_FD: self._set_log_fd,
            H.GET_INFLIGHT_FD: self._get_inflight_fd,
            H.SET_INFLIGHT_FD: self._set_inflight_fd,
            H.SET_DEVICE_STATE_FD: self._set_device_state_fd,
            H.CHECK_DEVICE_STATE: self._check_device_state,
        }

    # -- dispatch --------------------------------------------------------------------------

    def offered_features(self) -> int:
        logging = LOG_ALL if self.log_dirty else 0
        return int(self.device.features()) | TRANSPORT_FEATURES | logging

    def offered_protocol_features(self) -> int:
        tracking = (ProtocolFeature.INFLIGHT_SHMFD | ProtocolFeature.GET_VRING_BASE_INFLIGHT
                    if self.track_inflight else 0)
        logging = ProtocolFeature.LOG_SHMFD if self.log_dirty else 0
        device = int(self.device.protocol_features)
        if not self.res.shared_state:
            device &= ~int(ProtocolFeature.DEVICE_STATE)
        return ENGINE_PROTOCOL_FEATURES | device | tracking | logging

    def receive(self, header: Header, body: bytes, fds: list[Resource]) -> Message | None:
        """Decode and serve one request whose framing (header) was valid. Raises
        ProtocolError when the connection must be dropped."""
        try:
            msg = decode_request(Channel.FRONTEND, header, body, len(fds))
        except ProtocolError as e:
            for res in fds:
                self.res.close(res)
            fds.clear()
            # The stream is still in sync (the header was good): a NACK answers the request
            # if the front-end asked for an ack and awaits nothing else. Otherwise drop.
            bare = Message(header.request, p.Empty(), header.flags)
            asked_ack = header.need_reply and self.protocol_features & ProtocolFeature.REPLY_ACK
            own = (header.request in FRONTEND_SPECS
                   and has_own_reply(Channel.FRONTEND, bare, self.protocol_features))
            if own or not asked_ack:
                raise
            log.error("refused: %s", e)
            return reply_to(bare, p.U64(1))
        return self.handle(msg, fds)

    def handle(self, msg: Message, fds: list[Resource]) -> Message | None:
        """Serve one request. Raises ProtocolError when the connection must be dropped."""
        name = Channel.FRONTEND.name_of(msg.request)
        own = has_own_reply(Channel.FRONTEND, msg, self.protocol_features)
        try:
            result = self._dispatch(msg, fds)
        except (RequestError, ResourceError, MemoryTableError, GuestMemoryError) as e:
            if own:
                raise ProtocolError(f"{name} failed: {e}") from e
            log.error("%s refused: %s", name, e)
            result, failed = None, True
        else:
            failed = False
        finally:
            for res in fds:  # whatever the handler did not take
                self.res.close(res)
            fds.clear()
        if own:
            if isinstance(result, Message):  # a reply with fds
                return reply_to(msg, result.payload, result.fds)
            return reply_to(msg, result)
        if expects_reply(Channel.FRONTEND, msg, self.protocol_features):
            return reply_to(msg, p.U64(1 if failed else 0))
        return None

    def _dispatch(self, msg: Message, fds: list[Resource]) -> Any:
        handler = self._handlers.get(msg.request)
        if handler is None:
            raise RequestError("not supported by this back-end")
        gate = _GATES.get(FrontendReq(msg.request))
        if gate is not None and not self.protocol_features & gate:
            raise RequestError(f"needs protocol feature {gate.name}, not negotiated")
        return handler(msg.payload, fds)

    # -- features and ownership ------------------------------------------------------------

    def tick(self) -> None:
        """Called about once a second while the front-end is quiet: a device whose config
        changed (a resized disk) tells the front-end with CONFIG_CHANGE_MSG, which has it
        read the config again (no ack asked: the front-end answers with GET_CONFIG on this
        connection, which must stay free to serve it)."""
        if self.device.tick():
            log.info("the device changes what its workers inherit: restarting them")
            groups = sorted(self.running, reverse=True)
            for g in groups:
                self._stop_group(g)
            self.device.commit()  # with no worker running
            for g in sorted(groups):
                self._maybe_start(self.vrings[self.groups[g][0]])
        if self.backend_req is None or not self.device.config_changed():
            return  # without a channel the change waits for the front-end's GET_CONFIG
        log.info("config changed: CONFIG_CHANGE_MSG to the front-end")
        try:
            self.backend_req.send(request(BackendReq.CONFIG_CHANGE_MSG))
        except OSError as e:  # the socket's, or a full txq (vvu)
            log.error("cannot send a back-end request: %s", e)

    def _set_backend_req_fd(self, _pl: p.Empty, fds: list[Resource]) -> None:
        if self.backend_req is not None:
            self.backend_req.close()
        self.backend_req = self.res.backend_channel(fds.pop())

    def _get_features(self, _pl: p.Empty, _fds: list[Resource]) -> p.U64:
        return p.U64(self.offered_features())

    def _set_features(self, pl: p.U64, _fds: list[Resource]) -> None:
        extra = pl.value & ~self.offered_features()
        if extra:
            raise RequestError(f"features {extra:#x} were not offered")
        if pl.value == self.features:
            return  # repeated once per queue pair by QEMU
        if (pl.value ^ self.features) & LOG_ALL:
            log.info("dirty logging %s", "on" if pl.value & LOG_ALL else "off")
        if (pl.value ^ self.features) & ~LOG_ALL:
            log.info("features %#x", pl.value)
        self.features = pl.value
        self.device.set_features(pl.value)
        if not pl.value & VirtioFeature.PROTOCOL_FEATURES:
            for v in self.vrings:
                v.enabled = True
        self._restart_all()

    def _get_protocol_features(self, _pl: p.Empty, _fds: list[Resource]) -> p.U64:
        return p.U64(self.offered_protocol_features())

    def _set_protocol_features(self, pl: p.U64, _fds: list[Resource]) -> None:
        extra = pl.value & ~self.offered_protocol_features()
        if extra:
            raise RequestError(f"protocol features {extra:#x} were not offered")
        if (pl.value & ProtocolFeature.GET_VRING_BASE_INFLIGHT
                and not pl.value & ProtocolFeature.INFLIGHT_SHMFD):
            raise RequestError("GET_VRING_BASE_INFLIGHT needs INFLIGHT_SHMFD")
        if pl.value != self.protocol_features:
            log.info("protocol features %#x", pl.value)
        self.protocol_features = pl.value

    def _set_owner(self, _pl: p.Empty, _fds: list[Resource]) -> None:
        self.owner = True

    def _reset_device(self, _pl: p.Empty, _fds: list[Resource]) -> None:
        self._reset_rings()
        self.device.reset()
        self._save_state()  # the area may come back: it must not bring old settings
        self._drop_inflight()
        self._drop_log()  # QEMU starts rings again before it sends a log
        self._drop_carried()
        self._drop_transfer()
        self.features = 0
        self.status = 0

    def _hold(self, g: int, carried: Carried) -> None:
        """Keep what group `g`'s worker handed over until the group starts again; no other
        worker may inherit it (a host socket would never see EOF)."""
        old = self.carried.pop(g, None)
        if old is not None:
            old.close()
        self.carried[g] = carried

    def _drop_carried(self) -> None:
        """What workers handed over belongs to the session that ends."""
        for c in self.carried.values():
            c.close()
        self.carried.clear()

    # -- device state (DEVICE_STATE: live migration of a device with state) -----------------

    def _set_device_state_fd(self, pl: p.DeviceStateParams, _fds: list[Resource]
                             ) -> Message | p.U64:
        """The state travels through a file of ours, given in the reply (the spec lets
        either side make the channel): saving, it holds the whole state before the reply
        goes, so the front-end reads it at its own pace and nothing here waits on a pipe
        it may never drain; loading, the front-end writes into it and CHECK_DEVICE_STATE
        reads it once the front-end is done. The front-end's pipe end is closed."""
        self._drop_transfer()
        try:
            if pl.direction not in (DEVICE_STATE_SAVE, DEVICE_STATE_LOAD):
                raise StateError(f"unknown transfer direction {pl.direction}")
            if pl.phase != DEVICE_STATE_PHASE_STOPPED:
                raise StateError(f"unknown migration phase {pl.phase}")
            if self.running:
                raise StateError("the device is not suspended: queues "
                                 f"{sorted(i for _, q in self.running.values() for i in q)} "
                                 "run")
            load = pl.direction == DEVICE_STATE_LOAD
            data = b"" if load else self._saved_state()
            res = self.res.state_file(data)
        except (StateError, ResourceError) as e:
            log.error("device state transfer refused: %s", e)
            return p.U64(1 | DEVICE_STATE_NO_FD)
        self.transfer = StateTransfer(load, res)
        if not load:
            log.info("device state saved (%d bytes)", len(data))
        return Message(0, p.U64(0), fds=(res,))

    def _saved_state(self) -> bytes:
        try:
            data = self.device.save_state(dict(self.carried))
        except StateError:
            raise
        except Exception as e:  # a device's bug fails the migration, not the connection
            log.exception("saving the device state failed")
            raise StateError(f"internal error: {e}") from e
        if len(data) > MAX_STATE_BYTES:
            raise StateError(f"a state of {len(data)} bytes: more than a destination takes "
                             f"({MAX_STATE_BYTES})")
        return data

    def _check_device_state(self, _pl: p.Empty, _fds: list[Resource]) -> p.U64:
        t, self.transfer = self.transfer, None
        if t is None:
            log.error("CHECK_DEVICE_STATE without a transfer (SET_DEVICE_STATE_FD)")
            return p.U64(1)
        try:
            if not t.load:
                return p.U64(0)  # the whole state was in the file before it went
            if self.running:
                raise StateError("queues started before the state was taken up")
            data = self.res.read_state_file(t.res, MAX_STATE_BYTES)
            carried = self.device.load_state(data)
        except (StateError, ResourceError) as e:
            log.error("device state not taken up: %s", e)
            return p.U64(1)
        except Exception:  # a device's bug fails the migration, not the connection
            log.exception("device state not taken up: internal error")
            return p.U64(1)
        finally:
            self.res.close(t.res)
        self._drop_carried()  # nothing of an earlier session is left
        for g, c in carried.items():
            self._hold(g, c)
        log.info("device state loaded (%d bytes)", len(data))
        return p.U64(0)

    def _drop_transfer(self) -> None:
        t, self.transfer = self.transfer, None
        if t is not None:
            self.res.close(t.res)

    def _set_status(self, pl: p.U64, _fds: list[Resource]) -> None:
        self.status = pl.value & 0xFF

    # -- dirty logging (live migration) ---------------------------------------------------------

    def _set_log_base(self, pl: p.LogBase, fds: list[Resource]) -> p.U64:
        if pl.mmap_size == 0:
            raise RequestError("a log of 0 bytes")
        self._check_log_size(pl.mmap_size)
        mapping = self.res.map_area(fds[0], pl.mmap_size, pl.mmap_offset)  # fd: handle()'s
        dirty = DirtyLog(mapping, pl.mmap_size)
        dirty.signal = self.log_signal
        self._stop_all()  # the workers take the new log up as they start again
        self._drop_log()
        self.dirty_log = dirty
        self._start_all()
        log.info("dirty log of %d bytes (live migration)", pl.mmap_size)
        return p.U64(0)

    def _check_log_size(self, size: int) -> None:
        end = max((r.desc.guest_addr + r.desc.size for r in self.mem.regions), default=0)
        if size < log_bytes_for(end):
            raise RequestError(f"a log of {size} bytes covers guest memory below "
                               f"{size * 8 << 12:#x}; the memory table reaches {end:#x} "
                               f"({log_bytes_for(end)} bytes needed)")

    def _set_log_fd(self, _pl: p.Empty, fds: list[Resource]) -> None:
        signal = self.res.notifier(fds.pop())
        running = bool(self.running)
        self._stop_all()  # the workers have the old one
        if self.log_signal is not None:
            self.log_signal.close()
        self.log_signal = signal
        if self.dirty_log is not None:
            self.dirty_log.signal = signal
        if running:
            self._start_all()

    def _logging(self) -> DirtyLog | None:
        """The log writes go to, while the front-end has logging on."""
        return self.dirty_log if self.features & LOG_ALL else None

    def _drop_log(self) -> None:
        dirty, self.dirty_log = self.dirty_log, None
        if dirty is not None:
            dirty.release()
            _unmap(dirty.mapping)

    # -- in-flight tracking ------------------------------------------------------------------

    def _inflight_shape(self, pl: p.Inflight) -> int:
        """Check the queues and queue size the front-end asks an area for; its size."""
        if not 1 <= pl.num_queues <= self.device.num_queues:
            raise RequestError(f"in-flight area for {pl.num_queues} queues: the device has "
                               f"{self.device.num_queues}")
        qs = pl.queue_size
        limit = min(self.device.max_queue_size, MAX_QUEUE_SIZE)
        if self._packed():
            if not 1 <= qs <= limit:
                raise RequestError(f"in-flight area for packed queues of {qs}: not in "
                                   f"1..{limit}")
        elif qs == 0 or qs > limit or qs & (qs - 1):
            raise RequestError(f"in-flight area for queues of {qs}: not a power of 2 up to "
                               f"{limit}")
        return area_bytes(pl.num_queues, qs, self._packed())

    def _get_inflight_fd(self, pl: p.Inflight, _fds: list[Resource]) -> Message | p.Inflight:
        try:
            self._no_rings_running()
            size = self._inflight_shape(pl) + STATE_BLOCK
            res, mapping = self.res.new_area(size)
        except (RequestError, ResourceError) as e:
            # mmap_size 0 and no fd: QEMU then goes on without in-flight tracking
            log.error("GET_INFLIGHT_FD refused: %s", e)
            return p.Inflight(0, 0, pl.num_queues, pl.queue_size)
        self._drop_inflight()
        self.inflight = InflightArea(mapping, pl.num_queues, pl.queue_size, res,
                                     packed=self._packed())
        self._save_state()
        return Message(0, p.Inflight(size, 0, pl.num_queues, pl.queue_size), fds=(res,))

    def _set_inflight_fd(self, pl: p.Inflight, fds: list[Resource]) -> None:
        self._no_rings_running()
        need = self._inflight_shape(pl)
        if pl.mmap_size < need:
            raise RequestError(f"in-flight area of {pl.mmap_size} bytes: {pl.num_queues} "
                               f"queues of {pl.queue_size} need {need}")
        # an area of another back-end (or of our own older versions) has no state block
        has_state = pl.mmap_size >= need + STATE_BLOCK
        mapping = self.res.map_area(fds[0], need + STATE_BLOCK if has_state else need,
                                    pl.mmap_offset)  # fds[0]: closed by handle()
        self._drop_inflight()
        self.inflight = area = InflightArea(mapping, pl.num_queues, pl.queue_size,
                                            has_state=has_state, packed=self._packed())
        state = area.saved_state()
        if state is not None and state != self.device.state():  # the last back-end's
            try:
                self.device.restore(state)
            except Exception:
                log.exception("the device state in the in-flight area could not be restored")
        self._save_state()

    def _save_state(self) -> None:
        if self.inflight is None:
            return
        state = self.device.state()
        if len(state) > STATE_BYTES:
            log.error("%s: %d bytes of state, at most %d kept", self.device.name, len(state),
                      STATE_BYTES)
            return
        self.inflight.save_state(state)

    def _no_rings_running(self) -> None:
        """The area may change only while no ring runs (QEMU sets it before it starts
        them): a running worker records into the area it started with."""
        if self.running:
            raise RequestError("in-flight area changed while rings run: stop them first")

    def _drop_inflight(self) -> None:
        area, self.inflight = self.inflight, None
        if area is None:
            return
        if area.res is not None:
            self.res.close(area.res)
        _unmap(area.mapping)

    # -- memory ----------------------------------------------------------------------------

    def _set_mem_table(self, pl: p.MemTable, fds: list[Resource]) -> None:
        current = tuple(r.desc for r in sorted(self.mem.regions, key=lambda r: r.desc.user_addr))
        if current and current == tuple(sorted(pl.regions, key=lambda d: d.user_addr)):
            return  # unchanged: the fds are closed by handle()
        self._stop_all()
        self.mem.clear()
        self._region_refs.clear()
        try:
            for desc, res in zip(pl.regions, list(fds), strict=True):
                self.mem.add(desc, self.res.map_region(desc, res))
                self._region_refs[_region_key(desc)] = 1
        except MemoryTableError:
            self.mem.clear()
            raise
        finally:
            self._start_all()

    def _add_mem_reg(self, pl: p.SingleMemRegion, fds: list[Resource]) -> None:
        key = _region_key(pl.region)
        if self._region_refs[key]:  # QEMU 7.2 adds the same region once per queue pair
            self._region_refs[key] += 1
            return
        mapping = self.res.map_region(pl.region, fds[0])
        self._stop_all()
        try:
            self.mem.add(pl.region, mapping)
        except MemoryTableError:
            close = getattr(mapping, "close", None)
            if close:
                close()
            raise
        finally:
            self._start_all()
        self._region_refs[key] = 1

    def _rem_mem_reg(self, pl: p.SingleMemRegion, _fds: list[Resource]) -> None:
        key = _region_key(pl.region)
        if self._region_refs[key] > 1:
            self._region_refs[key] -= 1
            return
        self._stop_all()
        try:
            self.mem.remove(pl.region)
            self._region_refs.pop(key, None)
        finally:
            self._start_all()

    # -- rings -----------------------------------------------------------------------------

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise RequestError(f"vring index {index} out of range (device has "
                               f"{len(self.vrings)} queues)")
        return self.vrings[index]

    def _set_vring_num(self, pl: p.VringState, _fds: list[Resource]) -> None:
        v = self._vring(pl.index)
        n, top = pl.num, self.device.max_queue_size
        if self._packed():
            if not 1 <= n <= min(top, MAX_PACKED_SIZE):
                raise RequestError(f"packed queue size {n} is not in 1..{top}")
        elif n == 0 or n > top or n & (n - 1):
            raise RequestError(f"queue size {n} is not a power of 2 up to {top}")
        self._change(v, size=n)

    def _packed(self) -> bool:
        return bool(self.features & VirtioFeature.RING_PACKED)

    def _set_vring_addr(self, pl: p.VringAddr, _fds: list[Resource]) -> None:
        v = self._vring(pl.index)
        if pl.flags & ~VRING_F_LOG:
            raise RequestError(f"vring address flags {pl.flags:#x}: only LOG is known")
        if pl.flags & VRING_F_LOG and not self.log_dirty:
            raise RequestError("dirty logging (VHOST_VRING_F_LOG) was not offered")
        self._change(v, addr=pl)

    def _set_vring_base(self, pl: p.VringState, _fds: list[Resource]) -> None:
        v = self._vring(pl.index)
        if not self._packed() and pl.num > 0xFFFF:
            raise RequestError(f"split ring base {pl.num:#x} exceeds 16 bits")
        self._change(v, base=pl.num)

    def _get_vring_base(self, pl: p.VringState, _fds: list[Resource]) -> p.VringState:
        v = self._vring(pl.index)
        self._stop(v, self._may_suspend())
        v.started = False
        v.broken = False
        self._drop_notifiers(v)
        self._maybe_start(v)  # the rest of its group goes on
        return p.VringState(v.index, v.base)

    def _set_vring_kick(self, pl: p.VringFile, fds: list[Resource]) -> None:
        v = self._vring(pl.index)
        if not pl.nofd:
            self.res.check_kick(fds[0])  # still in fds: closed by handle() if refused
        self._stop(v)
        if v.kick is not None:
            self.res.close(v.kick)
        v.kick = None if pl.nofd else fds.pop()
        v.started = True  # LVU and rust-vmm start the ring on SET_VRING_KICK
        v.broken = False
        self._maybe_start(v)

    def _set_vring_call(self, pl: p.VringFile, fds: list[Resource]) -> None:
        v = self._vring(pl.index)
        notifier = NoNotifier() if pl.nofd else self.res.notifier(fds.pop())
        self._stop(v)
        v.call.close()
        v.call = notifier
        # A completion signalled on the old fd may be lost with it: QEMU swaps a masked
        # notifier for the guest's irqfd right after starting, without asking for an ack,
        # so a request the worker answered in between would never wake the guest. A
        # spurious notification costs the driver one look at the used ring.
        notifier.notify()
        self._maybe_start(v)

    def _set_vring_err(self, pl: p.VringFile, fds: list[Resource]) -> None:
        v = self._vring(pl.index)
        notifier = NoNotifier() if pl.nofd else self.res.notifier(fds.pop())
        self._stop(v)
        v.err.close()
        v.err = notifier
        self._maybe_start(v)

    def _set_vring_enable(self, pl: p.VringState, _fds: list[Resource]) -> None:
        v = self._vring(pl.index)
        if pl.num > 1:
            raise RequestError(f"SET_VRING_ENABLE with num {pl.num}")
        # QEMU 7.2 enables rings before SET_FEATURES: offered is what counts here.
        if not self.offered_features() & VirtioFeature.PROTOCOL_FEATURES:
            raise RequestError("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
        if v.enabled and not pl.num:  # QEMU disables a ring before GET_VRING_BASE
            self._stop(v, self._may_suspend())
        if v.enabled != bool(pl.num):
            self._change(v, enabled=bool(pl.num))

    # -- config ----------------------------------------------------------------------------

    def _get_config(self, pl: p.Config, _fds: list[Resource]) -> p.Config:
        space = self.device.get_config()
        if pl.offset + pl.size > len(space):
            log.error("GET_CONFIG %d+%d beyond the %d-byte config space",
                      pl.offset, pl.size, len(space))
            return p.Config(pl.offset, 0, pl.flags)  # size 0 tells the front-end it failed
        return p.Config(pl.offset, pl.size, pl.flags, space[pl.offset : pl.offset + pl.size])

    def _set_config(self, pl: p.Config, _fds: list[Resource]) -> None:
        try:
            self.device.set_config(pl.offset, pl.data, pl.flags)
        except ConfigError as e:
            raise RequestError(str(e)) from e
        self._save_state()

    def _net_set_mtu(self, pl: p.U64, _fds: list[Resource]) -> None:
        try:
            self.device.set_mtu(pl.value)
        except ConfigError as e:
            raise RequestError(str(e)) from e

    def _send_rarp(self, pl: p.U64, _fds: list[Resource]) -> None:
        mac = pl.value.to_bytes(8, "little")[:6]
        log.info("SEND_RARP: announcing %s", mac.hex(":"))
        try:
            self.device.send_rarp(mac)
        except ConfigError as e:
            raise RequestError(str(e)) from e

    # -- workers ---------------------------------------------------------------------------

    def _change(self, v: Vring, **changes: Any) -> None:
        """Apply ring changes; a running group is restarted to pick them up."""
        self._stop(v)
        for k, val in changes.items():
            setattr(v, k, val)
        self._maybe_start(v)

    def _maybe_start(self, v: Vring) -> None:
        """Run v's group with every ready queue of it: start it, or restart it if v is
        ready and not yet served."""
        g = v.group
        if g in self.running:
            if not v.ready() or v.index in self.running[g][1]:
                return
            self._stop_group(g)
        if len(self.mem) == 0:
            return
        ready = [self.vrings[i] for i in self.groups[g] if self.vrings[i].ready()]
        if not ready:
            return
        event_idx = bool(self.features & VirtioFeature.RING_EVENT_IDX)
        indirect = bool(self.features & VirtioFeature.RING_INDIRECT_DESC)
        packed = self._packed()
        dirty = self._logging()
        specs = []
        for r in ready:
            assert r.addr is not None
            layout = RingLayout(r.size, r.addr.desc, r.addr.avail, r.addr.used)
            log_used = r.addr.log if dirty is not None and r.addr.flags & VRING_F_LOG else None
            params = QueueParams(r.index, layout, r.base, event_idx, indirect, self.poll_us,
                                 log_used, packed)
            area = self.inflight.region(r, packed) if self.inflight is not None else None
            specs.append(QueueSpec(params, self.res.kick_fd(r.kick), r.call, r.err, area,
                                   dirty))
        carried = self.carried.pop(g, None)
        try:
            running = self.runner(specs, self.mem, self.device, carried, self.hold)
        except BaseException:
            if carried is not None:  # kept for the next try
                self._hold(g, carried)
            raise
        self.running[g] = (running, frozenset(r.index for r in ready))

    def _may_suspend(self) -> bool:
        """GET_VRING_BASE_INFLIGHT: a ring stopped by GET_VRING_BASE (or disabled, which
        QEMU does first) may leave requests not started in the in-flight area (QEMU
        migrates the area with inflight-migration=on) instead of draining them."""
        return (bool(self.protocol_features & ProtocolFeature.GET_VRING_BASE_INFLIGHT)
                and self.inflight is not None)

    def _stop(self, v: Vring, suspend: bool = False) -> None:
        """Stop v's group if it serves v (the whole group: its other queues restart with
        the next `_maybe_start`)."""
        if v.group in self.running and v.index in self.running[v.group][1]:
            self._stop_group(v.group, suspend)

    def _stop_group(self, g: int, suspend: bool = False) -> None:
        running, _ = self.running.pop(g)
        stopped = running.stop(suspend)
        if running.carried is not None:
            self._hold(g, running.carried)
        for index, (last, broken) in stopped.items():
            r = self.vrings[index]
            r.broken = broken
            if last is not None:
                r.base = last
            elif (self._packed() and self.inflight is not None
                  and self.inflight.region(r, True) is not None):
                log.warning("queue %d: its worker died; the in-flight area says where the "
                            "packed ring stood", index)  # its recovery decides
            elif self._packed():
                # a packed ring keeps no used index the device could resume from: the
                # driver's state is unknown, and the queue stops
                log.error("queue %d: its worker died; a packed ring cannot be resumed "
                          "without knowing where it stood: the queue stops", index)
                r.broken = True
                r.err.notify()
            else:
                r.base = self._used_idx(r)
        self.device.stopped(sorted(stopped))

    def _used_idx(self, v: Vring) -> int:
        """A worker that died: resume a split ring from used->idx (exact for devices that
        complete in order; the in-flight area covers those that do not)."""
        assert v.addr is not None
        try:
            cells = U16Array(self.mem.uva(v.addr.used, 4))
        except GuestMemoryError:
            return v.base
        try:
            return cells.load(1)
        finally:
            cells.release()

    def _stop_all(self) -> None:
        # the last groups first: a device's first group may wait on the others (scsi's
        # control queue answers a TMF only once no request queue has requests in hand)
        for g in sorted(self.running, reverse=True):
            self._stop_group(g)

    def _start_all(self) -> None:
        dirty = self._logging()
        if dirty is not None:
            try:
                self._check_log_size(len(dirty.bits))
            except RequestError as e:
                log.error("the memory table outgrew the dirty log: %s; pages beyond it "
                          "are not logged", e)
        for members in self.groups:
            self._maybe_start(self.vrings[members[0]])

    def _restart_all(self) -> None:
        self._stop_all()
        self._start_all()

    def _drop_notifiers(self, v: Vring) -> None:
        if v.kick is not None:
            self.res.close(v.kick)
            v.kick = None
        v.call.close()
        v.err.close()
        v.call, v.err = NoNotifier(), NoNotifier()

    def _reset_rings(self) -> None:
        self._stop_all()
        for v in self.vrings:
            self._drop_notifiers(v)
        self.vrings = self._new_vrings()

    def _new_vrings(self) -> list[Vring]:
        vrings = [Vring(i) for i in range(self.device.num_queues)]
        for g, members in enumerate(self.groups):
            for i in members:
                vrings[i].group = g
        return vrings

    def close(self) -> None:
        """The front-end went away: stop workers, release every resource."""
        self._reset_rings()
        self.mem.clear()
        self._region_refs.clear()
        if self.backend_req is not None:
            self.backend_req.close()
            self.backend_req = None
        self._drop_carried()
        self._drop_transfer()
        self._drop_inflight()
        self._drop_log()
        if self.log_signal is not None:
            self.log_signal.close()
            self.log_signal = None
        self.features = self.protocol_features = self.status = 0
        self.owner = False
        self.device.reset()


def _groups(device: Device) -> list[list[int]]:
    groups = device.queue_groups()
    members = sorted(i for g in groups for i in g)
    if members != list(range(device.num_queues)) or not all(groups):
        raise ValueError(f"{device.name}: queue groups {groups} do not cover queues "
                         f"0..{device.num_queues - 1} once each")
    return groups


def _unmap(mapping: Buffer) -> None:
    """Let go of an area's mapping: a view of the transport's (AF_UNIX `map_area`) or a
    mapping of our own (`new_area`)."""
    if isinstance(mapping, memoryview):
        mapping.release()
    elif isinstance(mapping, mmap.mmap):
        mapping.close()


def _region_key(r: p.MemRegion) -> tuple[int, int, int]:
    return r.guest_addr, r.user_addr, r.size
