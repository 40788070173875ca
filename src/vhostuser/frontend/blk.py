"""A virtio-blk driver over the Python front-end: submit requests, check statuses."""

from __future__ import annotations

from ..devices.blk_abi import (  # the virtio-blk ABI, defined once
    REQ_HEADER,
    SEGMENT,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
)
from .client import Frontend

__all__ = ["T_DISCARD", "T_FLUSH", "T_GET_ID", "T_IN", "T_OUT", "T_WRITE_ZEROES", "BlkClient"]


class BlkClient:
    """Requests on one queue of a vhost-user-blk back-end set up by `fe`."""

    def __init__(self, fe: Frontend, queue: int = 0, arena: int = 8 << 20,
                 align: int = 64) -> None:
        """`align`: where each buffer starts (64: any; 4096: what O_DIRECT takes)."""
        self.fe = fe
        self.queue = queue
        self.ring = fe.queues[queue].ring
        ram = fe.ram
        self.arena = ram.alloc(arena, 4096)
        self.arena_size = arena
        self._used = 0
        self.inflight: dict[int, tuple[int, int, int]] = {}  # head -> (status gpa, data gpa, len)
        self.align = align

    def _alloc(self, n: int) -> int:
        n = -(-n // self.align) * self.align
        if self._used + n > self.arena_size:
            raise MemoryError("request arena exhausted: wait for completions first")
        gpa = self.arena + self._used
        self._used += n
        return gpa

    def submit(self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0,
               indirect: bool = False, kick: bool = True) -> int:
        ram = self.fe.ram
        hdr = self._alloc(16)
        ram.at(hdr, 16)[:] = REQ_HEADER.pack(rtype, 0, sector)
        bufs: list[tuple[int, int, bool]] = [(hdr, 16, False)]
        if out:
            gpa = self._alloc(len(out))
            ram.at(gpa, len(out))[:] = out
            bufs.append((gpa, len(out), False))
        data = self._alloc(in_len) if in_len else 0
        if in_len:
            bufs.append((data, in_len, True))
        status = self._alloc(1)
        ram.at(status, 1)[0] = 0xFF
        bufs.append((status, 1, True))
        head = self.ring.add(bufs, indirect=indirect)
        self.inflight[head] = (status, data, in_len)
        if kick:
            self.fe.kick(self.queue)
        return head

    def complete(self, count: int = 1, timeout: float = 10.0) -> dict[int, tuple[int, bytes, int]]:
        """Wait for `count` completions: head -> (status, data read, used len)."""
        out = {}
        for head, written in self.fe.wait_used(self.queue, count, timeout):
            status, data, n = self.inflight.pop(head)
            ram = self.fe.ram
            out[head] = (ram.at(status, 1)[0], bytes(ram.at(data, n)) if n else b"", written)
        if not self.inflight:
            self._used = 0
        return out

    def request(self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0,
                indirect: bool = False) -> tuple[int, bytes]:
        head = self.submit(rtype, sector, out, in_len, indirect)
        status, data, _ = self.complete()[head]
        return status, data

    def read(self, sector: int, nbytes: int) -> tuple[int, bytes]:
        return self.request(T_IN, sector, in_len=nbytes)

    def write(self, sector: int, data: bytes) -> int:
        return self.request(T_OUT, sector, out=data)[0]

    def flush(self) -> int:
        return self.request(T_FLUSH)[0]

    def get_id(self) -> tuple[int, bytes]:
        return self.request(T_GET_ID, in_len=20)

    def discard(self, segments: list[tuple[int, int, int]]) -> int:
        return self.request(T_DISCARD, out=b"".join(SEGMENT.pack(*s) for s in segments))[0]

    def write_zeroes(self, segments: list[tuple[int, int, int]]) -> int:
        return self.request(T_WRITE_ZEROES, out=b"".join(SEGMENT.pack(*s) for s in segments))[0]
