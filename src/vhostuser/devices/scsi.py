"""virtio-scsi (virtio 1.x §5.6): one target (0) with LUNs 0..N-1 over raw images
(devices/scsi_disk.py runs the SCSI commands).

Queues: control (0: task management, asynchronous-notification queries), event (1), then
the request queues. Control and event run together in one worker, each request queue in its
own. A request queue serves a few requests at a time, each at once and in order, and says
in a shared page while it has some in hand; a task management function is answered once no
request queue has any (a TMF must not complete before the commands it concerns): ABORT TASK
and friends then complete, LOGICAL UNIT RESET and I_T NEXUS RESET leave the unit attention
SAM asks for. The control worker looks at the images' sizes every second:
a grown (or shrunk) image raises CAPACITY DATA HAS CHANGED and a parameter-change event,
so the guest rescans. The event goes out whether or not VIRTIO_SCSI_F_CHANGE was acked to
us: QEMU offers F_CHANGE to its guest itself (its param_change property) and does not pass
the bit on to vhost-user-scsi back-ends, so a QEMU guest negotiates it and we never see it.
"""

from __future__ import annotations

import logging
import mmap
import socket
import struct
from typing import Any

from ..engine.device import ConfigError, Device, Events, InOrderService, QueueService, Timer
from ..engine.queue import DeviceQueue
from ..ratelog import Limited
from ..virtq.iov import iov_len, iov_read, iov_slice, iov_write
from ..virtq.ring import Chain
from .scsi_control import ControlSocket
from .scsi_disk import (
    CHECK_CONDITION,
    HARDWARE_ERROR,
    ILLEGAL_REQUEST,
    INTERNAL_TARGET_FAILURE,
    LUN_NOT_SUPPORTED,
    Lun,
    LunOptions,
    LunState,
    Overrun,
    Sense,
    check_image,
    report_luns,
)

log = logging.getLogger(__name__)

F_INOUT, F_HOTPLUG, F_CHANGE = 1 << 0, 1 << 1, 1 << 2
CDB_SIZE, SENSE_SIZE = 32, 96
REQ = struct.Struct("<8sQBBB32s")  # lun, id, task_attr, prio, crn, cdb
RESP = struct.Struct("<IIHBB")  # sense_len, residual, status_qualifier, status, response
RESP_SIZE = RESP.size + SENSE_SIZE
S_OK, S_OVERRUN, S_BAD_TARGET, S_FAILURE = 0, 1, 3, 9
S_FUNCTION_COMPLETE, S_FUNCTION_REJECTED, S_INCORRECT_LUN = 0, 11, 12
T_TMF, T_AN_QUERY, T_AN_SUBSCRIBE = 0, 1, 2
TMF = struct.Struct("<II8sQ")  # type, subtype, lun, id
AN = struct.Struct("<I8sI")  # type, lun, event_requested
(TMF_ABORT_TASK, TMF_ABORT_TASK_SET, TMF_CLEAR_ACA, TMF_CLEAR_TASK_SET, TMF_I_T_NEXUS_RESET,
 TMF_LOGICAL_UNIT_RESET, TMF_QUERY_TASK, TMF_QUERY_TASK_SET) = range(8)
EVENT = struct.Struct("<I8sI")  # event, lun, reason
T_TRANSPORT_RESET, T_PARAM_CHANGE = 1, 3
RESET_RESCAN, RESET_REMOVED = 1, 2  # transport-reset reasons
CONFIG = struct.Struct("<IIIIIIIHHI")
CONTROLQ, EVENTQ, FIRST_REQUESTQ = 0, 1, 2
MAX_LUNS = 256
RESIZE_LOOK = 1.0  # s between looks at the images' sizes
LUN_RESET_UA = (0x29, 0x03)  # BUS DEVICE RESET FUNCTION OCCURRED
POWER_ON_UA = (0x29, 0x00)  # POWER ON, RESET, OR BUS DEVICE RESET OCCURRED
LUNS_CHANGED_UA = (0x3F, 0x0E)  # REPORTED LUNS DATA HAS CHANGED
NEXUS_LOSS_UA = (0x29, 0x07)  # I_T NEXUS LOSS OCCURRED


def lun_address(lun: int) -> bytes:
    """virtio-scsi's 8-byte LUN field for target 0, as an event carries it: flat space
    addressing from LUN 256 up only (Linux reads bytes 2-3 as the LUN number as they are,
    so a flag on a small LUN makes it another LUN)."""
    return bytes([1, 0, (0x40 | lun >> 8) if lun >= 256 else 0, lun & 0xFF]) + bytes(4)


def parse_lun(field: bytes) -> tuple[int, int] | None:
    """(target, lun) of a LUN field, or None if it is not one of virtio-scsi's."""
    if field[0] != 1 or field[2] >> 6 not in (0, 1) or any(field[4:]):
        return None
    return field[1], (field[2] << 8 | field[3]) & 0x3FFF


class ScsiDevice(Device):
    name = "vhost-user-scsi"
    max_queue_size = 1024

    def __init__(self, disks: list[LunOptions], num_queues: int = 1) -> None:
        if not 1 <= len(disks) <= MAX_LUNS:
            raise ValueError(f"1 to {MAX_LUNS} disks, not {len(disks)}")
        if not 1 <= num_queues <= 64:
            raise ValueError(f"request queues must be 1..64, not {num_queues}")
        self.request_queues = num_queues
        self.num_queues = FIRST_REQUESTQ + num_queues
        n = LunState.SLOTS
        slots = MAX_LUNS * n + num_queues + MAX_LUNS
        size = (slots * 8 + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        self._shared = mmap.mmap(-1, size * mmap.PAGESIZE, mmap.MAP_SHARED)
        self.cells = cells = memoryview(self._shared).cast("q")
        # per request queue: whether its worker has requests in hand (written by it alone)
        self.busy = cells[n * MAX_LUNS : n * MAX_LUNS + num_queues]
        # per LUN: a transport-reset event owed to the guest (its reason + 1), for LUNs
        # added or removed at run time (kept here, so a restarted worker still owes it)
        self.reset_owed = cells[n * MAX_LUNS + num_queues : n * MAX_LUNS + num_queues + MAX_LUNS]
        self.luns: dict[int, Lun] = {}  # LUN number -> its unit (target 0)
        try:
            for opts in disks:
                self.add_lun(opts, announce=False)
        except Exception:
            self.close()
            raise
        self.negotiated = 0

    def add_lun(self, opts: LunOptions, announce: bool = True) -> int:
        """A new LUN over `opts` (the lowest number neither in use nor awaiting its REMOVED
        event); the guest is told to rescan if `announce` (with no worker running).
        Raises OSError or ValueError."""
        free = next((i for i in range(MAX_LUNS)
                     if i not in self.luns and not self.reset_owed[i]), None)
        if free is None:
            raise ValueError(f"target 0 has no LUN number free (of {MAX_LUNS})")
        n = LunState.SLOTS
        state = LunState(self.cells[n * free : n * (free + 1)])
        state.take_ua()
        state.event_owed = False
        self.luns[free] = Lun(free, opts, state)
        self._renumbered(announce)
        if announce:
            state.raise_ua(POWER_ON_UA)  # a new unit, as SAM has it
            self.reset_owed[free] = RESET_RESCAN + 1
        return free

    def remove_lun(self, number: int) -> None:
        lun = self.luns.pop(number, None)
        if lun is None:
            raise ValueError(f"no LUN {number}")
        lun.close()
        self._renumbered(True)
        self.reset_owed[number] = RESET_REMOVED + 1

    def _renumbered(self, at_run_time: bool) -> None:
        numbers = sorted(self.luns)
        for lun in self.luns.values():
            lun.lun_numbers = numbers
            if at_run_time:
                lun.state.raise_ua(LUNS_CHANGED_UA)

    control: ControlSocket | None = None

    def serve_control(self, path: str) -> None:
        """Take LUN commands on the UNIX socket `path` (devices/scsi_control.py)."""
        self.control = ControlSocket(path)
        self.pending: list[tuple[socket.socket, dict[str, Any]]] = []

    def tick(self) -> bool:
        """Requests from the control socket: `list` is answered now; an add or a remove
        that looks right waits for `commit` (the engine stops the workers first)."""
        if self.control is None:
            return False
        for conn, req in self.control.poll():
            if isinstance(req, str):
                self.control.reply(conn, {"error": req})
                continue
            try:
                reply = self._check_request(req)
            except (OSError, ValueError) as e:
                reply = {"error": e.strerror if isinstance(e, OSError) and e.strerror
                         else str(e)}
            if reply is None:
                self.pending.append((conn, req))
            else:
                self.control.reply(conn, reply)
        return bool(self.pending)

    def _check_request(self, req: dict[str, Any]) -> dict[str, Any] | None:
        """The answer to `req` if it needs no change (or is wrong); None if it is a change
        to make at `commit`."""
        cmd = req.get("cmd")
        if cmd == "list":
            return {"luns": [{"lun": n, "path": lun.opts.path, "read_only": lun.read_only,
                              "blocks": lun.state.capacity}
                             for n, lun in sorted(self.luns.items())]}
        if cmd == "add":
            disk = req.get("disk")
            if not isinstance(disk, str):
                raise ValueError('"add" needs "disk": "FILE[,read-only][,serial=S][,wwn=HEX]"')
            check_image(LunOptions.parse(disk).path)
            return None
        if cmd == "remove":
            which = req.get("lun")
            if not isinstance(which, int) or isinstance(which, bool):
                raise ValueError('"remove" needs "lun": a LUN number')
            if which not in self.luns:
                raise ValueError(f"no LUN {which}")
            return None
        raise ValueError(f"unknown command {cmd!r} (list, add, remove)")

    def commit(self) -> None:
        """Make the waiting changes, in order, and answer each (no worker runs)."""
        pending, self.pending = self.pending, []
        for conn, req in pending:
            try:
                if req["cmd"] == "add":
                    number = self.add_lun(LunOptions.parse(req["disk"]))
                    log.info("LUN %d added: %s", number, req["disk"])
                    reply: dict[str, Any] = {"lun": number}
                else:
                    self.remove_lun(req["lun"])
                    log.info("LUN %d removed", req["lun"])
                    reply = {"removed": req["lun"]}
            except (OSError, ValueError) as e:
                reply = {"error": e.strerror if isinstance(e, OSError) and e.strerror
                         else str(e)}
            if self.control is not None:
                self.control.reply(conn, reply)

    def features(self) -> int:
        # HOTPLUG too: Linux posts event buffers only with it (and QEMU passes it on)
        return F_HOTPLUG | F_CHANGE

    def set_features(self, features: int) -> None:
        self.negotiated = features

    def queue_groups(self) -> list[list[int]]:
        return [[CONTROLQ, EVENTQ], *([i] for i in range(FIRST_REQUESTQ, self.num_queues))]

    def get_config(self) -> bytes:
        return CONFIG.pack(self.request_queues, 126, 0xFFFF, 128, EVENT.size, SENSE_SIZE,
                           CDB_SIZE, 0, 0, MAX_LUNS - 1)

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        # sense_size (20) and cdb_size (24) are writable: only the sizes we use are taken
        cfg = bytearray(self.get_config())
        if offset + len(data) > len(cfg):
            raise ConfigError(f"{len(data)} bytes at offset {offset}: beyond the config")
        cfg[offset : offset + len(data)] = data
        if bytes(cfg) != self.get_config():
            raise ConfigError("only sense_size 96 and cdb_size 32 are supported")

    def reset(self) -> None:
        for lun in self.luns.values():
            lun.reset()
        for i in range(MAX_LUNS):  # a new session scans the LUNs there are
            self.reset_owed[i] = 0
        for i in range(len(self.busy)):
            self.busy[i] = 0

    def stopped(self, indices: list[int]) -> None:
        """A request queue's worker is gone, however: it holds nothing any more (a worker
        stopped with chains in its ring, or killed, would leave its flag up for good)."""
        for i in indices:
            if i >= FIRST_REQUESTQ:
                self.busy[i - FIRST_REQUESTQ] = 0

    def serve(self, queues: dict[int, DeviceQueue], events: Events) -> QueueService:
        if CONTROLQ in queues or EVENTQ in queues:
            return ControlService(self, queues, events)
        return RequestService(self, min(queues))

    def worker_fds(self, indices: list[int]) -> list[int]:
        return [lun.fd for lun in self.luns.values()]  # not the control socket

    def close(self) -> None:
        for lun in self.luns.values():
            lun.close()
        self.luns = {}
        if self.control is not None:
            self.control.close()


class RequestService(InOrderService):
    """A request queue (in its worker): each command served at once, a few at a time (so
    a ring full of slow commands still lets the worker look at STOP)."""

    BATCH = 8

    def __init__(self, dev: ScsiDevice, index: int) -> None:
        self.luns = dev.luns
        self.busy = dev.busy
        self.slot = index - FIRST_REQUESTQ
        self.malformed = Limited(log)

    def kicked(self, q: DeviceQueue) -> None:
        self.busy[self.slot] = 1
        try:
            chains = q.pop_batch(self.BATCH)
            if chains:
                q.complete_batch(chains, self.handle(q.index, chains))
                q.notify()  # completions out before the queue says it holds none
        finally:
            if not q.waiting():  # busy until the ring runs dry (no gap between batches)
                self.busy[self.slot] = 0

    def handle(self, index: int, chains: list[Chain]) -> list[int]:
        return [self.request(c) for c in chains]

    def request(self, chain: Chain) -> int:
        r, w = chain.readable, chain.writable
        head: bytes | memoryview
        if r and w and len(r[0]) == REQ.size and len(w[0]) == RESP_SIZE:
            # the layout drivers use: header and response alone, then the data
            head, data_out, data_in = r[0], r[1:], w[1:]
        else:
            head = iov_read(r, REQ.size)
            if len(head) < REQ.size or iov_len(w) < RESP_SIZE:
                self.malformed.log(logging.ERROR, "request %d: no room for the request or "
                                   "the response header; returned unanswered", chain.head)
                return 0
            data_out, data_in = iov_slice(r, REQ.size), iov_slice(w, RESP_SIZE)
        lun_field, _tag, _attr, _prio, _crn, cdb = REQ.unpack(head)
        cdb = bytes(cdb)
        where = parse_lun(lun_field)
        status, sense, n, response = 0, b"", 0, S_OK
        if where is None or where[0] != 0:
            response = S_BAD_TARGET
        elif (lun := self.luns.get(where[1])) is not None:
            try:
                status, sense, n = lun.execute(cdb, data_out, data_in)
            except Overrun:
                response = S_OVERRUN
            except Exception:  # a bug answers HARDWARE ERROR; the queue goes on
                log.exception("LUN %d: command %#04x failed", where[1], cdb[0])
                status, n = CHECK_CONDITION, 0
                sense = Sense(HARDWARE_ERROR, INTERNAL_TARGET_FAILURE).data()
        else:
            status, sense, n = _absent_lun(cdb, data_in, sorted(self.luns))
        resid = iov_len(data_in) - n if data_in else 0
        iov_write(w, RESP.pack(len(sense), resid, 0, status, response) + sense.ljust(SENSE_SIZE))
        return RESP_SIZE + n


def _absent_lun(cdb: bytes, din: list[memoryview], numbers: list[int]
                ) -> tuple[int, bytes, int]:
    """A LUN target 0 does not have: INQUIRY says so (peripheral qualifier 3), REPORT
    LUNS works as on any LUN, everything else is LOGICAL UNIT NOT SUPPORTED."""
    if cdb[0] == 0x12 and not cdb[1] & 0x01:
        # peripheral qualifier 3, SPC-4, response format 2, 36 bytes
        data = bytes([0x7F, 0, 0x06, 0x02, 31, 0, 0, 0x02]) + bytes(28)
        return 0, b"", iov_write(din, data[: int.from_bytes(cdb[3:5], "big")])
    if cdb[0] == 0xA0:
        try:
            return 0, b"", report_luns(cdb, din, numbers)
        except Sense as e:
            return CHECK_CONDITION, e.data(), 0
    sense = Sense(ILLEGAL_REQUEST, LUN_NOT_SUPPORTED).data()
    if cdb[0] == 0x03:  # REQUEST SENSE: GOOD, the sense data says why
        return 0, b"", iov_write(din, sense[: cdb[4]])
    return CHECK_CONDITION, sense, 0


class ControlService(QueueService):
    """The control and event queues (in their worker), and the look at image sizes."""

    def __init__(self, dev: ScsiDevice, queues: dict[int, DeviceQueue], events: Events) -> None:
        self.luns, self.events, self.busy = dev.luns, events, dev.busy
        self.reset_owed = dev.reset_owed
        self.hotplug = bool(dev.negotiated & F_HOTPLUG)  # else no transport-reset event
        self.controlq, self.eventq = queues.get(CONTROLQ), queues.get(EVENTQ)
        self.held: list[tuple[Chain, int, bytes]] = []  # TMFs waiting for requests in hand
        self.malformed = Limited(log)
        self.retry: Timer | None = None
        self.timer = events.call_later(RESIZE_LOOK, self.look)

    def look(self) -> None:
        for lun in self.luns.values():
            lun.check_resize()
        self.deliver()
        self.timer = self.events.call_later(RESIZE_LOOK, self.look)

    def deliver(self) -> None:
        """Parameter-change events owed (kept in the shared page, so a restarted worker
        still owes them), as far as the guest has event buffers."""
        q = self.eventq
        for number in range(MAX_LUNS):  # LUNs added or removed: rescan, or remove
            reason = self.reset_owed[number] - 1
            if q is None or reason < 0 or not self.hotplug:
                continue
            chain = q.pop()
            if chain is None:
                log.info("events wait for the guest's event buffers")
                return
            ev = EVENT.pack(T_TRANSPORT_RESET, lun_address(number), reason)
            q.complete(chain, iov_write(chain.writable, ev))
            self.reset_owed[number] = 0
            log.info("LUN %d %s: transport-reset event to the guest", number,
                     "added" if reason == RESET_RESCAN else "removed")
        for lun in self.luns.values():
            if q is None or not lun.state.event_owed:
                continue
            chain = q.pop()
            if chain is None:
                log.info("events wait for the guest's event buffers")
                return
            ev = EVENT.pack(T_PARAM_CHANGE, lun_address(lun.index), 0x2A | 0x09 << 8)
            q.complete(chain, iov_write(chain.writable, ev))  # asc, ascq: capacity changed
            lun.state.event_owed = False
            log.info("parameter-change event for LUN %d to the guest", lun.index)

    def kicked(self, q: DeviceQueue) -> None:
        if q.index == EVENTQ:
            self.deliver()
            return
        for chain in q.pop_batch():
            data = iov_read(chain.readable, TMF.size)
            kind = int.from_bytes(data[:4], "little") if len(data) >= 4 else -1
            if kind == T_TMF and len(data) == TMF.size and iov_len(chain.writable) >= 1:
                _, subtype, lun_field, _tag = TMF.unpack(data)
                self.held.append((chain, subtype, lun_field))
            else:
                q.complete(chain, self.control(chain, kind, data))
        self.answer_tmfs()

    def answer_tmfs(self) -> None:
        """Answer the TMFs held, once no request queue has requests in hand."""
        if not self.held or self.controlq is None:
            return
        if any(self.busy):
            if self.retry is None:
                self.retry = self.events.call_later(0.001, self.retried)
            return
        for chain, subtype, lun_field in self.held:
            self.controlq.complete(chain, iov_write(chain.writable,
                                                    bytes([self.tmf(subtype, lun_field)])))
        self.held = []

    def retried(self) -> None:
        self.retry = None
        self.answer_tmfs()

    def control(self, chain: Chain, kind: int, data: bytes) -> int:
        if kind in (T_AN_QUERY, T_AN_SUBSCRIBE) and len(data) >= AN.size \
                and iov_len(chain.writable) >= 5:
            # no asynchronous notifications: none supported, none to report
            return iov_write(chain.writable, (0).to_bytes(4, "little") + bytes([S_OK]))
        self.malformed.log(logging.ERROR, "control request %d of type %d: malformed; "
                           "returned unanswered", chain.head, kind)
        return 0

    def tmf(self, subtype: int, lun_field: bytes) -> int:
        where = parse_lun(lun_field)
        if where is None or where[0] != 0:
            return S_BAD_TARGET
        if where[1] not in self.luns and subtype != TMF_I_T_NEXUS_RESET:
            return S_INCORRECT_LUN
        if subtype in (TMF_ABORT_TASK, TMF_ABORT_TASK_SET, TMF_CLEAR_TASK_SET, TMF_CLEAR_ACA,
                       TMF_QUERY_TASK, TMF_QUERY_TASK_SET):
            return S_FUNCTION_COMPLETE  # nothing in hand any more: the task has completed
        if subtype == TMF_LOGICAL_UNIT_RESET:
            self.luns[where[1]].state.raise_ua(LUN_RESET_UA)
            return S_FUNCTION_COMPLETE
        if subtype == TMF_I_T_NEXUS_RESET:
            for lun in self.luns.values():
                lun.state.raise_ua(NEXUS_LOSS_UA)
            return S_FUNCTION_COMPLETE
        return S_FUNCTION_REJECTED

    def quiesce(self) -> None:
        """The queues stop: held TMFs are answered (the request queues stop too)."""
        if self.held and self.controlq is not None:
            for chain, subtype, lun_field in self.held:
                self.controlq.complete(chain, iov_write(chain.writable,
                                                        bytes([self.tmf(subtype, lun_field)])))
            self.held = []

    def close(self) -> None:
        self.timer.cancel()
        if self.retry is not None:
            self.retry.cancel()
