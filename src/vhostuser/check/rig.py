"""What the checks drive a back-end with: our Python front-end on guest RAM that has guard
zones around the region the back-end is given, and a probe that tells whether the back-end
still serves.

The device type under check (`KIND`, which `checks.run` sets) decides what setting a
queue up means and what the probe does: for blk, queue 0 and a read of sector 0; for net,
the receive and transmit queues and a frame transmitted (its buffer must come back); for
fs, the hiprio and request queues and FUSE_INIT then GETATTR of the root; for scsi, the
control, event and first request queues and an INQUIRY of LUN 0. Ring attacks go to
`attacked(...)`: blk's queue 0, net's transmit queue, which a back-end reads on its own
(a receive queue is read only when a frame comes), fs's and scsi's request queue.

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
from contextvars import ContextVar

from ..devices.net import F_MRG_RXBUF
from ..frontend.blk import BlkClient
from ..frontend.client import Frontend
from ..frontend.fs import FsClient
from ..frontend.net import NetClient
from ..frontend.scsi import ScsiClient
from ..fuse.abi import ROOT_ID
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
KINDS = ("blk", "net", "fs", "scsi")
KIND: ContextVar[str] = ContextVar("kind", default="blk")  # the device type under check
NET_TX = 1  # net's transmit queue (of pair 0)
FS_REQUESTS = 1  # fs's first request queue (0 is hiprio)
SCSI_REQUESTS = 2  # scsi's first request queue (0 is control, 1 events)
INQUIRY = bytes([0x12, 0, 0, 0, 96, 0])  # SPC-4 INQUIRY, standard data, 96 bytes
PROBE_FRAME = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + bytes(46)


def attacked() -> int:
    """The queue that ring attacks go to, for the device type under check."""
    return {"net": NET_TX, "fs": FS_REQUESTS, "scsi": SCSI_REQUESTS}.get(KIND.get(), 0)


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
        """Negotiate (with RING_PACKED if `packed`), send the memory table, and set the
        queues of the device type under check up with `size` entries; blk's client (net:
        None, `setup_net` gives its client)."""
        if KIND.get() == "net" and queue:
            self.setup_net(packed, size)
            return None
        if KIND.get() == "fs" and queue:
            self.setup_fs(packed, size)
            return None
        if KIND.get() == "scsi" and queue:
            self.setup_scsi(packed, size)
            return None
        self.fe.negotiate(WANT | (VirtioFeature.RING_PACKED if packed else 0), WANT_PROTOCOL)
        self.fe.set_mem_table()
        if not queue:
            return None
        self.fe.setup_queue(0, size)
        return BlkClient(self.fe, 0, arena=1 << 20)

    def setup_net(self, packed: bool = False, size: int = 64,
                  rx_buffers: int = 16, features: int = 0) -> NetClient:
        """As `setup`, for a net back-end: both queues of pair 0 (MRG_RXBUF and
        `features` asked for), `rx_buffers` receive buffers posted."""
        self.fe.negotiate(WANT | F_MRG_RXBUF | features
                          | (VirtioFeature.RING_PACKED if packed else 0), WANT_PROTOCOL)
        self.fe.set_mem_table()
        for q in (0, NET_TX):
            self.fe.setup_queue(q, size)
        return NetClient(self.fe, rx_buffers=min(rx_buffers, size))

    def setup_fs(self, packed: bool = False, size: int = 64) -> FsClient:
        """As `setup`, for a virtio-fs back-end: the hiprio and first request queues, no
        FUSE_INIT sent yet."""
        self.fe.negotiate(WANT | (VirtioFeature.RING_PACKED if packed else 0), WANT_PROTOCOL)
        self.fe.set_mem_table()
        for q in (0, FS_REQUESTS):
            self.fe.setup_queue(q, size)
        return FsClient(self.fe, FS_REQUESTS, arena=1 << 20)

    def setup_scsi(self, packed: bool = False, size: int = 64) -> ScsiClient:
        """As `setup`, for a virtio-scsi back-end: the control, event and first request
        queues."""
        self.fe.negotiate(WANT | (VirtioFeature.RING_PACKED if packed else 0), WANT_PROTOCOL)
        self.fe.set_mem_table()
        for q in range(SCSI_REQUESTS + 1):
            self.fe.setup_queue(q, size)
        return ScsiClient(self.fe, SCSI_REQUESTS, arena=1 << 20)

    def ring(self, index: int | None = None) -> DriverRing:
        """A queue's ring (the attacked one by default), split."""
        ring = self.fe.queues[attacked() if index is None else index].ring
        assert isinstance(ring, DriverRing)
        return ring

    def packed_ring(self) -> PackedDriverRing:
        ring = self.fe.queues[attacked()].ring
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
    """None if a fresh front-end can do I/O through the back-end (blk: read sector 0; net:
    transmit a frame and have its buffer back); else why not."""
    try:
        with session(path) as s:
            if KIND.get() == "net":
                net = s.setup_net()
                net.send([PROBE_FRAME])
                s.fe.wait_used(NET_TX, 1, timeout=5.0)
                return None
            if KIND.get() == "fs":
                fs = s.setup_fs()
                fs.init()
                fs.getattr(ROOT_ID)
                return None
            if KIND.get() == "scsi":
                r = s.setup_scsi().command(INQUIRY, data_in=96)
                if r.response != 0 or r.status != 0 or len(r.data) < 36:
                    return (f"an INQUIRY of LUN 0 on a fresh connection: response "
                            f"{r.response}, status {r.status}, {len(r.data)} bytes")
                return None
            blk = s.setup()
            assert blk is not None
            status, _ = blk.read(0, 512)
            if status != 0:
                return f"a read of sector 0 on a fresh connection returned status {status}"
    except Exception as e:  # any failure of the probe is the finding
        return f"a fresh connection cannot do I/O: {type(e).__name__}: {e}"
    return None
