"""virtio-blk served from a raw image file (virtio 1.x §5.2).

Data moves with preadv/pwritev straight between the file and guest memory: the guest's
buffers are memoryviews of the mapped regions, so nothing is copied in Python. Requests are
served at once, in order, in the queue's worker; with `io_threads` a pool of threads per
queue serves them, several in flight, completed out of order (engine/pool.py).
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from dataclasses import dataclass

from ..engine.device import ConfigError, Device, Events, InOrderService, QueueService
from ..engine.pool import PooledService
from ..engine.queue import DeviceQueue
from ..fileio import punch, read_into, write_from, zero
from ..protocol.constants import ProtocolFeature
from ..ratelog import Limited
from ..virtq.iov import iov_len, iov_read, iov_slice, iov_write
from ..virtq.ring import Chain, DeviceRing
from .blk_abi import (
    F_BLK_SIZE,
    F_CONFIG_WCE,
    F_DISCARD,
    F_FLUSH,
    F_MQ,
    F_RO,
    F_SEG_MAX,
    F_SIZE_MAX,
    F_WRITE_ZEROES,
    ID_BYTES,
    REQ_HEADER,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SECTOR,
    SEG_F_UNMAP,
    SEGMENT,
    T_BARRIER,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
)
from .blk_kernel import BlkKernel
from .blk_kernel import available as compiled_available

log = logging.getLogger(__name__)
_HDR, _SEG = REQ_HEADER, SEGMENT

COMPILED = "reads, writes and flushes served by the compiled kernel"
# Requests the kernel serves before their completions are published: a driver keeping 32
# in flight (fio through libblkio, QD32) then reaps and submits one half while the other is
# served, rather than waiting for the whole batch while this worker waits for it to refill:
# about 1.4x the IOPS here with 16, against a ring's worth per publish (bench/RESULTS.md).
# Not for the Python path: at 3 us a request its batches are better whole (measured worse).
PUBLISH_EVERY = 16

_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")  # up to write_zeroes_may_unmap: 60 bytes
CONFIG_SIZE = 96  # with secure-erase and zoned fields, left zero (not offered)
WRITEBACK_OFFSET = 32

@dataclass(frozen=True)
class BlkOptions:
    path: str
    read_only: bool = False
    num_queues: int = 1
    serial: str | None = None
    blk_size: int = 512
    seg_max: int = 126  # queue size 128 minus header and status, as Linux sizes it
    size_max: int = 1 << 20
    max_discard_sectors: int = 1 << 22
    max_discard_seg: int = 32
    io_threads: int = 0  # per queue; 0: each request at once in the worker, in order
    direct: bool = False  # O_DIRECT: the host's page cache is bypassed


class BlkDevice(Device):
    name = "vhost-user-blk"
    protocol_features = int(ProtocolFeature.CONFIG | ProtocolFeature.BACKEND_REQ)

    def __init__(self, opts: BlkOptions) -> None:
        if opts.num_queues < 1 or opts.num_queues > 256:
            raise ValueError(f"--num-queues must be 1..256, not {opts.num_queues}")
        if not 0 <= opts.io_threads <= 256:
            raise ValueError(f"--io-threads must be 0..256, not {opts.io_threads}")
        if opts.blk_size < SECTOR or opts.blk_size & (opts.blk_size - 1):
            raise ValueError(f"block size {opts.blk_size} is not a power of 2 >= 512")
        self.opts = opts
        self.num_queues = opts.num_queues
        mode = os.O_RDONLY if opts.read_only else os.O_RDWR
        self.fd = os.open(opts.path, mode)
        # With O_DIRECT, `fd` bypasses the page cache and `buffered` does what it cannot
        # (transfers not aligned as the file system needs: fileio.py).
        self.buffered = self.fd
        if opts.direct:
            try:
                self.fd = os.open(opts.path, mode | os.O_DIRECT)
            except OSError as e:
                os.close(self.buffered)
                raise OSError(e.errno, f"{opts.path}: cannot open with O_DIRECT "
                                       f"({e.strerror})") from e
        self.serial = (opts.serial if opts.serial is not None
                       else os.path.basename(opts.path)).encode()[:ID_BYTES]
        # Written in the engine's process (SET_CONFIG, a resize), read by every queue
        # worker: [0] writeback, [1] capacity in 512-byte sectors whatever blk_size is.
        self._shared = mmap.mmap(-1, mmap.PAGESIZE, mmap.MAP_SHARED)
        self.shared = memoryview(self._shared).cast("Q")
        self.capacity = os.fstat(self.fd).st_size // SECTOR
        self.writeback = True
        self.negotiated = 0
        self.compiled = compiled_available()  # here, before workers fork

    # -- negotiation and config ------------------------------------------------------------

    def features(self) -> int:
        f = (F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_CONFIG_WCE | F_MQ
             | F_DISCARD | F_WRITE_ZEROES)
        if self.opts.read_only:
            f = (f | F_RO) & ~(F_DISCARD | F_WRITE_ZEROES)
        return f

    def set_features(self, features: int) -> None:
        self.negotiated = features
        if not features & F_CONFIG_WCE:  # without WCE the driver assumes writeback iff FLUSH
            self.writeback = bool(features & F_FLUSH)

    @property
    def writeback(self) -> bool:
        return bool(self.shared[0])

    @writeback.setter
    def writeback(self, on: bool) -> None:
        self.shared[0] = int(on)

    @property
    def capacity(self) -> int:
        return self.shared[1]

    @capacity.setter
    def capacity(self, sectors: int) -> None:
        self.shared[1] = sectors

    def config_changed(self) -> bool:
        """Look at the image's size: if the file was resized (e.g. `truncate -s`), take
        the new capacity (for every queue at once) and say so, for the engine to tell the
        front-end. Also called by GET_CONFIG, so the config never reports a stale size."""
        sectors = os.fstat(self.fd).st_size // SECTOR
        if sectors == self.capacity:
            return False
        log.info("image resized: %d -> %d sectors", self.capacity, sectors)
        self.capacity = sectors
        return True

    def get_config(self) -> bytes:
        self.config_changed()  # a resize is reported however the front-end asks
        o = self.opts
        align = o.blk_size // SECTOR
        cfg = _CONFIG.pack(
            self.capacity, o.size_max, o.seg_max,
            0, 0, 0,  # geometry: not offered
            o.blk_size,
            0, 0, 0, 0,  # topology: not offered
            int(self.writeback), 0, self.num_queues,
            o.max_discard_sectors, o.max_discard_seg, align,
            o.max_discard_sectors, o.max_discard_seg, 1,
        )
        return cfg + bytes(CONFIG_SIZE - len(cfg))

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        if flags != 0:
            raise ConfigError(f"SET_CONFIG flags {flags} (migration) not supported")
        if offset != WRITEBACK_OFFSET or len(data) != 1 or data[0] > 1:
            raise ConfigError(f"only the writeback byte is writable (got {len(data)} bytes "
                              f"at offset {offset})")
        self.writeback = bool(data[0])
        log.info("cache mode: %s", "writeback" if data[0] else "writethrough")

    def state(self) -> bytes:
        """The cache mode the driver chose (a back-end that restarts after a crash keeps
        write-through if the guest asked for it)."""
        return bytes([int(self.writeback)])

    def restore(self, state: bytes) -> None:
        if len(state) < 1 or state[0] > 1:
            log.error("state %r left by the last back-end: not a cache mode, ignored",
                      state[:8])
            return
        self.writeback = bool(state[0])
        log.info("cache mode: %s (as the last back-end had it)",
                 "writeback" if state[0] else "writethrough")

    def reset(self) -> None:
        self.writeback = True
        self.negotiated = 0

    def serve(self, queues: dict[int, DeviceQueue], events: Events) -> QueueService:
        if self.opts.io_threads:
            untracked = sorted(i for i, q in queues.items() if q.tracker is None)
            if not untracked:
                return BlkPool(self, queues, self.opts.io_threads)
            # Out of order, a request in flight when the back-end dies is lost for good
            # unless the in-flight area remembers it.
            log.warning("queues %s: no in-flight area from the front-end: served in order, "
                        "without --io-threads", untracked)
        return BlkQueue(self)

    def worker_fds(self, indices: list[int]) -> list[int]:
        return [self.fd, self.buffered]

    def close(self) -> None:
        if self.buffered != self.fd:
            os.close(self.buffered)
        os.close(self.fd)
        self.shared.release()
        self._shared.close()


class BlkQueue(InOrderService):
    """Serves requests of one queue (runs in that queue's worker process), each at once:
    in order, synchronously; reads, writes and flushes in a compiled kernel where it is on
    (blk_kernel.py), the rest here."""

    def __init__(self, dev: BlkDevice, compiled: bool = True) -> None:
        """`compiled`: serve with the kernel where it is on (not under a pool's threads)."""
        self.dev = dev
        self.fd = dev.fd
        self.buffered = dev.buffered if dev.buffered != dev.fd else None
        self.shared = dev.shared
        self.read_only = dev.opts.read_only
        # the guest can ask for failing or malformed requests at will: logged, not flooded
        self.failures, self.malformed = Limited(log), Limited(log)
        self.kernel = BlkKernel(dev.fd, self.failures) if dev.compiled and compiled else None
        if self.kernel is not None:
            log.info(COMPILED)

    @property
    def capacity(self) -> int:
        return self.shared[1]  # follows a resize

    def kicked(self, q: DeviceQueue) -> None:
        if self.kernel is None or not q.compiled():
            super().kicked(q)  # every available chain, the Python way
            return
        # The kernel serves what it can, this class the one request it stopped before, in
        # turns, up to PUBLISH_EVERY: `run_queue` publishes them (and notifies) before it
        # calls again, so the driver reaps and submits while the rest are served.
        budget = PUBLISH_EVERY
        while budget > 0:
            budget -= q.serve_compiled(self._compiled, budget)
            chains = q.pop_batch(1) if budget > 0 else []
            if not chains:
                return
            q.complete_batch(chains, self.handle(q.index, chains))
            budget -= 1

    def _compiled(self, ring: DeviceRing, n: int) -> int:
        assert self.kernel is not None
        return self.kernel.serve(ring, n, self.capacity, not self.read_only,
                                 self.dev.writeback)

    def handle(self, index: int, chains: list[Chain]) -> list[int]:
        return [self.serve(c) for c in chains]

    def serve(self, c: Chain) -> int:
        """Serve one request; the bytes written into the chain (data and status)."""
        r, w = c.readable, c.writable
        # The layout every driver uses: header alone, data, status byte alone.
        if r and w and len(r[0]) == _HDR.size and len(w[-1]) == 1:
            rtype, _, sector = _HDR.unpack(r[0])
            if rtype == T_IN and len(r) == 1:
                return self.read(sector, w)
            if rtype == T_OUT and len(w) == 1:
                return self.write(sector, r, w[0])
        return self.request(c)

    def read(self, sector: int, w: list[memoryview]) -> int:
        data = w[:-1]
        n = len(data[0]) if len(data) == 1 else sum(map(len, data))
        if n % SECTOR or sector + n // SECTOR > self.capacity:
            w[-1][0] = S_IOERR
            return 1
        try:
            got = read_into(self.fd, data, sector * SECTOR, n, self.buffered)
        except OSError as e:
            self.failures.log(logging.ERROR, "read at sector %d: %s", sector, e)
            w[-1][0] = S_IOERR
            return 1
        if got < n:  # the file shrank under us: never hand stale guest bytes back
            iov_write(data, bytes(n - got), got)
        w[-1][0] = S_OK
        return n + 1

    def write(self, sector: int, r: list[memoryview], status: memoryview) -> int:
        data = r[1:]
        n = sum(map(len, data))
        if self.read_only or n % SECTOR or sector + n // SECTOR > self.capacity:
            status[0] = S_IOERR
            return 1
        try:
            write_from(self.fd, data, sector * SECTOR, n, self.buffered)
            if not self.dev.writeback:
                os.fdatasync(self.fd)
        except OSError as e:
            self.failures.log(logging.ERROR, "write at sector %d: %s", sector, e)
            status[0] = S_IOERR
            return 1
        status[0] = S_OK
        return 1

    def request(self, chain: Chain) -> int:
        """Serve one request; returns the bytes written to the chain (data + status)."""
        w = chain.writable
        if not w or len(w[-1]) == 0 or iov_len(chain.readable) < _HDR.size:
            self.malformed.log(logging.ERROR, "request %d: no room for header or status; "
                               "returned unanswered", chain.head)
            return 0
        status_buf = w[-1][-1:]
        rtype, _, sector = _HDR.unpack(iov_read(chain.readable, _HDR.size))
        rtype &= ~T_BARRIER
        data_in = iov_slice(w, 0, iov_len(w) - 1)
        try:
            status, written = self._serve(rtype, sector, chain, data_in)
        except OSError as e:
            self.failures.log(logging.ERROR, "request type %d sector %d: %s", rtype, sector, e)
            status, written = S_IOERR, 0
        status_buf[0] = status
        return written + 1

    def _serve(self, rtype: int, sector: int, chain: Chain,
               data_in: list[memoryview]) -> tuple[int, int]:
        if rtype == T_IN:
            n = iov_len(data_in)
            if not self._in_range(sector, n):
                return S_IOERR, 0
            got = read_into(self.fd, data_in, sector * SECTOR, n, self.buffered)
            if got < n:  # the file shrank under us: never hand stale guest bytes back
                iov_write(data_in, bytes(n - got), got)
            return S_OK, n
        if rtype == T_OUT:
            data = iov_slice(chain.readable, _HDR.size)
            n = iov_len(data)
            if self.read_only or not self._in_range(sector, n):
                return S_IOERR, 0
            write_from(self.fd, data, sector * SECTOR, n, self.buffered)
            if not self.dev.writeback:
                os.fdatasync(self.fd)
            return S_OK, 0
        if rtype == T_FLUSH:
            if not self.read_only:
                os.fdatasync(self.fd)
            return S_OK, 0
        if rtype == T_GET_ID:
            ident = self.dev.serial.ljust(ID_BYTES, b"\0")
            return S_OK, iov_write(data_in, ident[: iov_len(data_in)])
        if rtype in (T_DISCARD, T_WRITE_ZEROES):
            return self._ranges(rtype, iov_read(chain.readable, 1 << 20, _HDR.size)), 0
        return S_UNSUPP, 0

    def _in_range(self, sector: int, nbytes: int) -> bool:
        return nbytes % SECTOR == 0 and sector + nbytes // SECTOR <= self.capacity

    def _ranges(self, rtype: int, data: bytes) -> int:
        if len(data) == 0 or len(data) % _SEG.size:
            return S_IOERR
        segs = [_SEG.unpack_from(data, off) for off in range(0, len(data), _SEG.size)]
        opts = self.dev.opts
        if len(segs) > opts.max_discard_seg:
            return S_IOERR
        for sector, num, flags in segs:
            if flags & ~SEG_F_UNMAP or (rtype == T_DISCARD and flags & SEG_F_UNMAP):
                return S_UNSUPP
            if self.read_only or num > opts.max_discard_sectors or not self._in_range(
                    sector, num * SECTOR):
                return S_IOERR
        for sector, num, flags in segs:
            off, length = sector * SECTOR, num * SECTOR
            if rtype == T_DISCARD:
                self._punch(off, length, required=False)
            elif flags & SEG_F_UNMAP:
                self._punch(off, length, required=True)
            else:
                self._zero(off, length)
        if not self.dev.writeback:
            os.fdatasync(self.fd)
        return S_OK

    def _punch(self, off: int, length: int, required: bool) -> None:
        punch(self.dev.buffered, off, length, required)

    def _zero(self, off: int, length: int) -> None:
        zero(self.dev.buffered, off, length)


class BlkPool(PooledService):
    """Serves one queue group's requests on `threads` threads: several in flight,
    completed out of order."""

    def __init__(self, dev: BlkDevice, queues: dict[int, DeviceQueue], threads: int) -> None:
        self.blk = BlkQueue(dev, compiled=False)
        super().__init__(queues, threads, "blk-io")

    def kicked(self, q: DeviceQueue) -> None:
        for chain in q.pop_batch():
            self.submit(q, chain)

    def serve_chain(self, chain: Chain) -> int:
        return self.blk.serve(chain)
