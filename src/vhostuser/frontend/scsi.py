"""A virtio-scsi driver over the Python front-end: commands with their data, task
management, asynchronous-notification queries, events."""

from __future__ import annotations

from dataclasses import dataclass

from ..devices.scsi import AN, REQ, RESP, RESP_SIZE, T_AN_QUERY, T_TMF, TMF  # the ABI
from .client import Frontend


def lun_field(lun: int, target: int = 0) -> bytes:
    """The 8-byte LUN field as Linux's driver fills it (flat space addressing)."""
    return bytes([1, target, 0x40 | lun >> 8, lun & 0xFF]) + bytes(4)


@dataclass
class Result:
    response: int  # virtio-scsi response (0: the command ran)
    status: int  # SCSI status (0 GOOD, 2 CHECK CONDITION)
    sense: bytes
    data: bytes  # data-in, as long as the used length says
    residual: int

    @property
    def key_code(self) -> tuple[int, int, int]:
        """(sense key, asc, ascq) of fixed-format sense data."""
        return self.sense[2] & 0x0F, self.sense[12], self.sense[13]


class ScsiClient:
    """Queues of a vhost-user-scsi back-end set up by `fe`: control 0, event 1, request
    `queue` (2 by default)."""

    def __init__(self, fe: Frontend, queue: int = 2, arena: int = 16 << 20) -> None:
        self.fe, self.queue = fe, queue
        self.arena = fe.ram.alloc(arena, 4096)
        self.arena_size = arena

    def _buf(self, n: int, at: int) -> int:
        if at + n > self.arena_size:
            raise MemoryError("request arena exhausted")
        return self.arena + at

    def command(self, cdb: bytes, lun: int = 0, data_out: bytes = b"", data_in: int = 0,
                target: int = 0, field: bytes | None = None) -> Result:
        resp, din = self.submit(cdb, lun, data_out, data_in, target, field)
        [(_, written)] = self.fe.wait_used(self.queue)
        return self.result(resp, din, written)

    def submit(self, cdb: bytes, lun: int = 0, data_out: bytes = b"", data_in: int = 0,
               target: int = 0, field: bytes | None = None) -> tuple[int, int]:
        """Make a command available and kick, not waiting: where its response and data-in
        go (0: none)."""
        ram = self.fe.ram
        req = REQ.pack(field if field is not None else lun_field(lun, target), 0, 0, 0, 0,
                        cdb.ljust(32, b"\0"))
        pos = 0
        bufs = []
        for data, writable in ((req, False), (data_out, False)):
            if data:
                gpa = self._buf(len(data), pos)
                ram.at(gpa, len(data))[:] = data
                bufs.append((gpa, len(data), writable))
                pos += (len(data) + 63) // 64 * 64
        resp = self._buf(RESP_SIZE, pos)
        ram.at(resp, RESP_SIZE)[:] = b"\xee" * RESP_SIZE
        bufs.append((resp, RESP_SIZE, True))
        pos += 128
        din = self._buf(data_in, pos) if data_in else 0
        if data_in:
            ram.at(din, data_in)[:] = b"\xee" * data_in
            bufs.append((din, data_in, True))
        self.fe.queues[self.queue].ring.add(bufs)
        self.fe.kick(self.queue)
        return resp, din

    def result(self, resp: int, din: int, written: int) -> Result:
        """A completed command's result, from its response (and data-in) buffers."""
        ram = self.fe.ram
        if written < RESP_SIZE:
            raise ValueError(f"response of {written} bytes")
        sense_len, resid, _qual, status, response = RESP.unpack(bytes(ram.at(resp, RESP.size)))
        sense = bytes(ram.at(resp + RESP.size, min(sense_len, 96)))
        data = bytes(ram.at(din, written - RESP_SIZE)) if din else b""
        return Result(response, status, sense, data, resid)

    def control(self, request: bytes, reply_len: int) -> bytes:
        ram = self.fe.ram
        gpa = self._buf(len(request) + reply_len, 0)
        ram.at(gpa, len(request))[:] = request
        ram.at(gpa + len(request), reply_len)[:] = b"\xee" * reply_len
        self.fe.queues[0].ring.add([(gpa, len(request), False),
                                    (gpa + len(request), reply_len, True)])
        self.fe.kick(0)
        [(_, written)] = self.fe.wait_used(0)
        return bytes(ram.at(gpa + len(request), written))

    def tmf(self, subtype: int, lun: int = 0, target: int = 0) -> int:
        reply = self.control(TMF.pack(T_TMF, subtype, lun_field(lun, target), 0), 1)
        return reply[0]

    def an_query(self, events: int, lun: int = 0) -> tuple[int, int]:
        reply = self.control(AN.pack(T_AN_QUERY, lun_field(lun), events), 5)
        return int.from_bytes(reply[:4], "little"), reply[4]
