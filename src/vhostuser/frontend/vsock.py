"""A virtio-vsock driver over the Python front-end (the guest's side): send packets on the
tx queue, take packets from rx buffers, keep each stream's credit honest."""

from __future__ import annotations

from dataclasses import dataclass

from ..devices.vsock import HDR, HOST_CID, OP_CREDIT_UPDATE, OP_RW, TYPE_STREAM
from .client import Frontend

RX_BUF = 4096
TX_BUF = HDR.size + (64 << 10)


@dataclass
class Packet:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0
    data: bytes = b""
    ptype: int = TYPE_STREAM


class VsockClient:
    """The rx (0) and tx (1) queues of a vhost-user-vsock back-end set up by `fe`; the
    guest's CID is `cid`. `buf_alloc` is the credit this guest gives each stream."""

    def __init__(self, fe: Frontend, cid: int, rx_buffers: int = 32,
                 buf_alloc: int = 64 << 10) -> None:
        self.fe, self.cid, self.buf_alloc = fe, cid, buf_alloc
        self.rx: dict[int, int] = {}  # rx head -> its buffer
        self.received: dict[tuple[int, int], int] = {}  # (our port, host port) -> RW bytes
        self.consumed: dict[tuple[int, int], int] = {}  # what we told the device (fwd_cnt)
        self.tx = fe.ram.alloc(TX_BUF)  # one packet at a time: send waits for the device
        self.free: list[int] = []  # rx buffers to post again
        self.post(rx_buffers)

    def post(self, n: int) -> None:
        ring = self.fe.queues[0].ring
        for _ in range(n):
            gpa = self.free.pop() if self.free else self.fe.ram.alloc(HDR.size + RX_BUF)
            self.rx[ring.add([(gpa, HDR.size, True), (gpa + HDR.size, RX_BUF, True)])] = gpa
        self.fe.kick(0)

    def send(self, port: int, host_port: int, op: int, data: bytes = b"", flags: int = 0,
             raw: bytes | None = None) -> None:
        """One packet from our `port` to the host's `host_port` (or `raw` bytes as they
        are), waited for until the device has taken it."""
        if raw is None:
            fwd = self.consumed.get((port, host_port), 0)
            raw = HDR.pack(self.cid, HOST_CID, port, host_port, len(data), TYPE_STREAM, op,
                           flags, self.buf_alloc, fwd & 0xFFFFFFFF) + data
        if len(raw) > TX_BUF:
            raise ValueError(f"a packet of {len(raw)} bytes: at most {TX_BUF}")
        gpa = self.tx
        self.fe.ram.at(gpa, len(raw))[:] = raw
        self.fe.queues[1].ring.add([(gpa, len(raw), False)])
        self.fe.kick(1)
        self.fe.wait_used(1)

    def recv(self, count: int = 1, timeout: float = 10.0) -> list[Packet]:
        """The next `count` packets from the device (their buffers are posted again). An
        RW beyond the credit we gave is an AssertionError: the device broke the rules."""
        out = []
        for head, written in self.fe.wait_used(0, count, timeout):
            gpa = self.rx.pop(head)
            self.free.append(gpa)
            raw = bytes(self.fe.ram.at(gpa, written))
            f = HDR.unpack(raw[: HDR.size])
            pkt = Packet(f[0], f[1], f[2], f[3], f[6], f[7], f[8], f[9], raw[HDR.size :], f[5])
            assert f[4] == len(pkt.data), f"header says {f[4]} bytes, {len(pkt.data)} came"
            if pkt.op == OP_RW:
                key = (pkt.dst_port, pkt.src_port)
                got = self.received[key] = self.received.get(key, 0) + len(pkt.data)
                assert got <= self.consumed.get(key, 0) + self.buf_alloc, "credit overrun"
            out.append(pkt)
        self.post(len(out))
        return out

    def consume(self, port: int, host_port: int, n: int, update: bool = True) -> None:
        """The guest application read `n` bytes: tell the device (CREDIT_UPDATE)."""
        key = (port, host_port)
        self.consumed[key] = self.consumed.get(key, 0) + n
        if update:
            self.send(port, host_port, OP_CREDIT_UPDATE)
