"""What the checks drive a back-end with: our Python front-end on guest RAM that has guard
zones around the region the back-end is given, and a probe that tells whether the back-end
still serves.

The guard zones: the memory file is GUARD + size + GUARD bytes; the region starts at
`mmap_offset` GUARD. A back-end that maps the region as QEMU's libvhost-user and DPDK do
(offset 0, `mmap_offset + size` bytes) maps the leading guard too, so a write it makes below
the region lands there; the trailing one is past what it maps. Both are filled with a
pattern and checked after every attack."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager

from ..frontend.blk import BlkClient
from ..frontend.client import Frontend
from ..protocol import ProtocolFeature, VirtioFeature
from ..protocol.payloads import MemRegion
from ..virtq.guest_ram import GuestRam
from ..virtq.packed_driver import PackedDriverRing
from ..virtq.split_driver import DriverRing

GUARD = 1 << 20
PATTERN = bytes(range(256)) * (GUARD // 256)
RAM = 32 << 20
WANT = (VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC
        | VirtioFeature.RING_EVENT_IDX)
WANT_PROTOCOL = (ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG | ProtocolFeature.MQ
                 | ProtocolFeature.CONFIGURE_MEM_SLOTS)


class GuardedRam(GuestRam):
    """Guest RAM whose memory file has a guard zone on each side of the region."""

    def __init__(self, size: int = RAM) -> None:
        fd = os.memfd_create("vhost-user-check-ram", os.MFD_CLOEXEC)
        os.ftruncate(fd, GUARD + size + GUARD)
        whole = mmap.mmap(fd, GUARD + size + GUARD, mmap.MAP_SHARED)
        whole[:GUARD] = PATTERN
        whole[GUARD + size :] = PATTERN
        self.whole = whole
        self._adopt(whole, fd, 0)
        self.size = size
        self.view = memoryview(whole)[GUARD : GUARD + size]

    def region(self) -> MemRegion:
        return MemRegion(self.guest_addr, self.size, self.user_addr, GUARD)

    def guards_intact(self) -> bool:
        return (self.whole[:GUARD] == PATTERN
                and self.whole[GUARD + self.size :] == PATTERN)

    def close(self) -> None:
        self.view.release()
        super().close()


class Session:
    """One connection to the back-end, negotiated, its memory table sent."""

    def __init__(self, path: str, reply_timeout: float = 5.0) -> None:
        self.fe = Frontend(path, ram_size=4096, reply_timeout=reply_timeout)
        self.fe.ram.close()
        self.ram = self.fe.ram = GuardedRam()

    def setup(self, queue: bool = True, packed: bool = False,
              size: int = 64) -> BlkClient | None:
        """Negotiate (with RING_PACKED if `packed`), send the memory table, and set queue 0
        up with `size` entries."""
        self.fe.negotiate(WANT | (VirtioFeature.RING_PACKED if packed else 0), WANT_PROTOCOL)
        self.fe.set_mem_table()
        if not queue:
            return None
        self.fe.setup_queue(0, size)
        return BlkClient(self.fe, 0, arena=1 << 20)

    def ring(self) -> DriverRing:
        """Queue 0's ring, split."""
        ring = self.fe.queues[0].ring
        assert isinstance(ring, DriverRing)
        return ring

    def packed_ring(self) -> PackedDriverRing:
        ring = self.fe.queues[0].ring
        assert isinstance(ring, PackedDriverRing)
        return ring

    def close(self) -> None:
        try:
            self.fe.sock.close()
        finally:
            for q in self.fe.queues.values():
                q.ring.release()
                os.close(q.kick)
                os.close(q.call)
            self.fe.queues.clear()
            self.ram.close()


@contextmanager
def session(path: str, reply_timeout: float = 5.0) -> Iterator[Session]:
    s = Session(path, reply_timeout)
    try:
        yield s
    finally:
        s.close()


def serves(path: str) -> str | None:
    """None if a fresh front-end can read sector 0 through the back-end; else why not."""
    try:
        with session(path) as s:
            blk = s.setup()
            assert blk is not None
            status, _ = blk.read(0, 512)
            if status != 0:
                return f"a read of sector 0 on a fresh connection returned status {status}"
    except Exception as e:  # any failure of the probe is the finding
        return f"a fresh connection cannot do I/O: {type(e).__name__}: {e}"
    return None
