"""The virtio-vhost-user PCI device: its registers, BARs, queues and interrupts.

No I/O loop here: the vfio-user server (`server.py`) calls `region_read/write`,
`dma_map/unmap`, `set_irqs`, `reset`; the relay calls back through the `DriverSide`
methods (`rx_put`, `kick_arrived`, `frontend_changed`, `device_error`). Layout and
rules: docs/vvu-design.md.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import struct
import uuid as uuidlib

from ..memory import GuestMemory
from ..protocol.payloads import MemRegion
from ..protocol.virtio_pci import NO_VECTOR
from ..virtq.iov import iov_write
from ..virtq.ring import RingError, RingLayout
from ..virtq.split import SplitQueue
from .abi import (
    CFG_DOORBELL,
    CFG_NOTIFICATION,
    CFG_SHARED_MEMORY,
    FEATURES,
    FIRST_FILE_REGION,
    KICK_FD_VECTOR,
    KICK_FDS,
    KICKS,
    PCI_DEVICE,
    PCI_VENDOR,
    S_BACKEND_UP,
    S_FRONTEND_UP,
)
from .intx import IntxLine
from .msix import MsixTable
from .pci import Bar, PciAccessError, PciConfig, msix_cap, virtio_cap, virtio_cap64
from .relay import Relay, RxResult, WindowFile
from .virtio_pci import VirtioPciBar, VirtioPciState

log = logging.getLogger(__name__)


class DmaError(Exception):
    """A DMA region the client offered cannot be mapped."""


SUBSYS_ID = 0x0040
CLASS_OTHER = 0xFF0000

BAR_VIRTIO, BAR_MSIX, BAR_DOORBELL, BAR_WINDOW = 0, 1, 2, 4
MSIX_TABLE, MSIX_PBA, MSIX_BAR_SIZE = 0x0, 0x800, 0x1000
DOORBELL_MULT = 4
NOTIFICATION_OFFSET, DOORBELL_BAR_SIZE = 0x1000, 0x2000
SHMID_MEMORY = 0

RXQ, TXQ = 0, 1
QUEUE_SIZE = 256
CONFIG_SIZE = 24
_EVENT_IDX, _INDIRECT = 1 << 29, 1 << 28


def _pow2_at_least(n: int, floor: int = 0x1000) -> int:
    size = floor
    while size < n:
        size <<= 1
    return size


class VvuConfig:
    """The device-specific config space: status, max_vhost_queues, uuid."""

    def __init__(self, dev: VvuDevice) -> None:
        self.dev = dev

    def space(self) -> bytes:
        d = self.dev
        return struct.pack("<II16s", d.relay.status(), d.relay.max_queues, d.uuid.bytes)

    def read(self, offset: int, size: int) -> bytes:
        return self.space()[offset : offset + size].ljust(size, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        if offset != 0 or len(data) not in (1, 2, 4):
            self.dev.driver_error(f"config write of {len(data)} bytes at {offset}")
            return
        value = int.from_bytes(data, "little")
        if value & ~(S_BACKEND_UP | S_FRONTEND_UP) or (
                value & S_FRONTEND_UP and not self.dev.relay.connected):
            self.dev.driver_error(f"driver wrote status {value:#x}")
            return
        self.dev.relay.set_backend_up(bool(value & S_BACKEND_UP))


def open_window_file(path: str, size: int) -> WindowFile:
    """The device's own window file: the consumer's VMM keeps its guest RAM in it, and BAR 4
    maps it at window offset 0 from the start (docs/vvu-design.md). Created sparse with
    `size` bytes if missing; an existing one keeps its size, which must fit the window."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ValueError(f"window file {path}: {e.strerror}") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ValueError(f"window file {path}: not a regular file")
    if st.st_size == 0:
        os.ftruncate(fd, size)
    elif st.st_size > size:
        os.close(fd)
        raise ValueError(f"window file {path} has {st.st_size:#x} bytes, more than the "
                         f"window ({size:#x}, --window-size)")
    return WindowFile(fd, (st.st_dev, st.st_ino), 0, os.fstat(fd).st_size)


class VvuDevice:
    def __init__(self, max_queues: int = 64, uuid: uuidlib.UUID | None = None,
                 window_size: int = 1 << 30, window_file: str | None = None) -> None:
        if not 1 <= max_queues <= 1024:
            raise ValueError(f"max queues must be 1..1024, not {max_queues}")
        self.uuid = uuid or uuidlib.uuid4()
        self.nvec = 3 + max_queues  # config, rxq, txq, one per vring notification
        self.window_bar = _pow2_at_least(window_size)
        pinned = open_window_file(window_file, window_size) if window_file else None
        self.relay = Relay(self, max_queues, self.window_bar, pinned)
        self.trapped = 0  # window accesses served by message (the client did not map them)
        self.config = VvuConfig(self)
        self.virtio = VirtioPciState(FEATURES, 2, QUEUE_SIZE, self.config, nvec=self.nvec,
                                     on_reset=self._on_reset, on_notify=self._on_notify)
        self.bar0 = VirtioPciBar(self.virtio, BAR_VIRTIO, CONFIG_SIZE)
        self.msix = MsixTable(self.nvec)
        doorbells = DOORBELL_MULT * (2 * max_queues + 1)
        caps = [*self.bar0.capabilities(),
                virtio_cap(CFG_DOORBELL, BAR_DOORBELL, 0, doorbells,
                           extra=struct.pack("<I", DOORBELL_MULT)),
                virtio_cap(CFG_NOTIFICATION, BAR_DOORBELL, NOTIFICATION_OFFSET, 4),
                virtio_cap64(CFG_SHARED_MEMORY, BAR_WINDOW, 0, self.window_bar, id=SHMID_MEMORY),
                msix_cap(self.nvec, BAR_MSIX, MSIX_TABLE, BAR_MSIX, MSIX_PBA)]
        if doorbells > NOTIFICATION_OFFSET:
            raise ValueError("too many queues for the doorbell area")
        self.bars = {BAR_VIRTIO: VirtioPciBar.SIZE, BAR_MSIX: MSIX_BAR_SIZE,
                     BAR_DOORBELL: DOORBELL_BAR_SIZE, BAR_WINDOW: self.window_bar}
        self.pci = PciConfig(PCI_VENDOR, PCI_DEVICE, subsys_vendor=PCI_VENDOR,
                             subsys_id=SUBSYS_ID, class_code=CLASS_OTHER, revision=1,
                             bars=[Bar(BAR_VIRTIO, VirtioPciBar.SIZE, mem64=False),
                                   Bar(BAR_MSIX, MSIX_BAR_SIZE, mem64=False),
                                   Bar(BAR_DOORBELL, DOORBELL_BAR_SIZE, mem64=False),
                                   Bar(BAR_WINDOW, self.window_bar, mem64=True,
                                       prefetch=True)],
                             caps=caps, msix=self.msix, interrupt_pin=1)
        self.intx = IntxLine(self.pci)
        self.intx_event = False  # a queue or config event not yet read from ISR status
        self.kicks = 0  # vrings kicked since the driver last read KICKS (INTx), a bit each
        self.mem = GuestMemory()  # the appliance's memory, as DMA-mapped by the client
        self.irq_fds: dict[int, int] = {}
        self.notify_select = 0
        self.notify_vectors = [NO_VECTOR] * max_queues
        self.queues: dict[int, SplitQueue] = {}
        self.positions: dict[int, int] = {}  # next avail index of a queue to rebuild

    # -- interrupts ----------------------------------------------------------------------------

    def set_irqs(self, start: int, fds: list[int | None]) -> None:
        """SET_IRQS for MSI-X vectors start..start+len(fds)-1 (None: no eventfd)."""
        if start + len(fds) > self.nvec:
            raise ValueError(f"vectors {start}..{start + len(fds) - 1} beyond {self.nvec}")
        for i, fd in enumerate(fds, start):
            old = self.irq_fds.pop(i, None)
            if old is not None:
                os.close(old)
            if fd is not None:
                self.irq_fds[i] = fd

    def fire(self, vector: int | None) -> None:
        fd = self.irq_fds.get(vector) if vector is not None else None
        if fd is not None:
            try:
                os.eventfd_write(fd, 1)
            except OSError:  # saturated (a wake-up is pending), or the client's to fix
                pass

    def interrupt(self, vector: int | None, vring: int | None = None) -> None:
        """Notify the driver of an event whose vector register holds `vector` (a kick of
        `vring`, or a queue or config event): its MSI-X eventfd if it has one; else,
        unless MSI-X is enabled and unmasked, INTx — for events the driver enabled by
        giving them any vector (NO_VECTOR: none), recorded in ISR status or KICKS for it
        to find. (MSI-X enabled with the function masked: recorded too, and raised once
        MSI-X is off again: the appliance's driver passes through that state to have QEMU
        map the BARs again, appliance/uio.py, and must not lose a kick meanwhile.)"""
        if vector is None or vector >= self.nvec:  # NO_VECTOR, KICK_FD_VECTOR
            return
        if vector in self.irq_fds:
            self.fire(vector)
            return
        if self.pci.msix_enabled and not self.pci.msix_masked:
            return
        if vring is None:
            self.intx_event = True
        else:
            self.kicks |= 1 << vring
        self.intx.set_level(True)

    def _intx_level(self) -> None:
        self.intx.set_level(self.intx_event or bool(self.kicks))

    # -- DriverSide (called by the relay) ------------------------------------------------------

    def rx_put(self, message: bytes) -> RxResult:
        q = self._queue(RXQ)
        if q is None:
            return RxResult.NO_BUFFER
        try:
            if not q.available() and not q.enable_kicks():  # re-armed: a repost kicks us
                return RxResult.NO_BUFFER
            chain = q.pop()
        except RingError as e:
            self.driver_error(f"rxq: {e}")
            return RxResult.NO_BUFFER
        if chain.writable_len() < len(message):
            q.push(chain.head, 0)
            self._publish(RXQ, q)
            return RxResult.TOO_SMALL
        q.push(chain.head, iov_write(chain.writable, message))
        self._publish(RXQ, q)
        return RxResult.OK

    def kick_arrived(self, vring: int) -> None:
        self.interrupt(self.notify_vectors[vring], vring)

    def frontend_changed(self) -> None:
        self.interrupt(self.virtio.config_changed())

    def session_ended(self) -> None:
        if self.trapped:
            log.info("%d window access(es) trapped during the session", self.trapped)
            self.trapped = 0
        if self.intx.signals:
            log.info("INTx raised %d time(s) during the session", self.intx.signals)
            self.intx.signals = 0
        # a kick eventfd the driver read itself was this consumer's: the next one's kicks
        # are the device's again until the driver asks
        self.notify_vectors = [NO_VECTOR if v == KICK_FD_VECTOR else v
                               for v in self.notify_vectors]
        self.kicks = 0  # that consumer's
        self._intx_level()

    def device_error(self) -> None:
        self.interrupt(self.virtio.set_needs_reset())

    def driver_error(self, why: str) -> None:
        log.error("driver error: %s; the device needs a reset", why)
        self.relay.end_session(why)
        self.device_error()

    # -- queues --------------------------------------------------------------------------------

    def _queue(self, index: int) -> SplitQueue | None:
        q = self.queues.get(index)
        if q is not None:
            return q
        st = self.virtio.queues[index]
        if not (st.enabled and self.virtio.driver_ok):
            return None
        try:
            q = SplitQueue(self.mem, RingLayout(st.size, st.desc, st.driver, st.device),
                           self.positions.pop(index, 0),
                           bool(self.virtio.driver_features & _EVENT_IDX),
                           bool(self.virtio.driver_features & _INDIRECT))
        except RingError as e:
            self.driver_error(f"queue {index}: {e}")
            return None
        self.queues[index] = q
        return q

    def _publish(self, index: int, q: SplitQueue) -> None:
        if q.publish():
            self.interrupt(self.virtio.queue_interrupt(index))

    def _on_notify(self, index: int) -> None:
        if index == RXQ:
            self.relay.retry_rx()
        elif index == TXQ:
            self._drain_txq()

    def _drain_txq(self) -> None:
        q = self._queue(TXQ)
        if q is None:
            return
        try:
            while q.available() or q.enable_kicks():  # drained: re-arm kicks, then re-check
                chain = q.pop()
                data = b"".join(bytes(v) for v in chain.readable)
                q.push(chain.head, 0)
                self.relay.from_driver(data)
        except RingError as e:
            self.driver_error(f"txq: {e}")
        self._publish(TXQ, q)

    def discard_txq(self) -> None:
        q = self._queue(TXQ)
        if q is None:
            return
        try:
            n = 0
            while q.available():
                q.push(q.pop().head, 0)
                n += 1
        except RingError as e:
            self.driver_error(f"txq: {e}")
            return
        if n:
            log.info("dropped %d txq message(s) of an ended session", n)
            self._publish(TXQ, q)

    def _drop_queues(self) -> None:
        """Let go of the queues' views of memory; they are rebuilt where they were when
        next used (the DMA table changed under them: QEMU maps and unmaps BARs too)."""
        for index, q in self.queues.items():
            self.positions[index] = q.last_avail
            q.release()
        self.queues.clear()

    def _on_reset(self) -> None:
        self._drop_queues()
        self.positions.clear()
        self.relay.set_backend_up(False)
        self.notify_vectors = [NO_VECTOR] * self.relay.max_queues
        self.notify_select = 0
        self.intx_event, self.kicks = False, 0
        self._intx_level()

    def reset(self) -> None:
        """VFIO_USER_DEVICE_RESET."""
        self.virtio.reset()
        self.pci.reset()
        self.intx.reset()

    # -- DMA (the appliance's memory) ----------------------------------------------------------

    def dma_map(self, iova: int, size: int, fd: int | None, offset: int, writable: bool) -> None:
        if fd is None:  # memory the client can only reach by messages: rings cannot live there
            log.info("DMA region %#x+%#x has no fd; not usable for queues", iova, size)
            return
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, prot, offset=offset)
        except (OSError, ValueError) as e:
            raise DmaError(f"cannot map DMA region {iova:#x}+{size:#x}: {e}") from e
        finally:
            os.close(fd)
        self._drop_queues()  # they are rebuilt against the new table
        self.mem.add(MemRegion(iova, size, iova, 0), m)

    def dma_unmap(self, iova: int, size: int, everything: bool = False) -> None:
        if everything:
            self._drop_queues()
            self.mem.clear()
            return
        for r in list(self.mem.regions):
            if r.desc.guest_addr == iova and r.desc.size == size:
                self._drop_queues()
                self.mem.remove(r.desc)
                return

    # -- regions -------------------------------------------------------------------------------

    def region_size(self, index: int) -> int:
        if index >= FIRST_FILE_REGION:
            f = self.window_file(index)
            return f.size if f is not None else 0
        return 256 if index == 7 else self.bars.get(index, 0)

    def window_file(self, index: int) -> WindowFile | None:
        """The consumer memory file behind vfio-user region `index` (BAR 4: the first;
        9 + k: the k-th, for clients that map each file where it sits in the window)."""
        files = self.relay.files
        k = 0 if index == BAR_WINDOW else index - FIRST_FILE_REGION
        return files[k] if 0 <= k < len(files) else None

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        self._check(index, offset, count)
        if index == 7:
            return b"".join(self.pci.read(offset + i, min(4, count - i))
                            for i in range(0, count, 4))
        if index == BAR_VIRTIO:
            data = self.bar0.read(offset, count)
            if offset == VirtioPciBar.ISR:
                self.intx_event = False  # read-to-clear, as ISR status itself
                self._intx_level()
            return data
        if index == BAR_MSIX:
            return (self.msix.read(offset, count) if offset < MSIX_PBA
                    else self.msix.read_pba(offset - MSIX_PBA, count))
        if index == BAR_DOORBELL:
            if offset >= NOTIFICATION_OFFSET + KICKS:
                return self._kicks_read(offset - NOTIFICATION_OFFSET - KICKS, count)
            if offset >= NOTIFICATION_OFFSET:
                regs = struct.pack("<HH", self.notify_select, self._notify_vector())
                return regs[offset - NOTIFICATION_OFFSET:][:count].ljust(count, b"\0")
            return bytes(count)
        return self._window_read(self._window_offset(index, offset), count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self._check(index, offset, len(data))
        if index == 7:
            for i in range(0, len(data), 4):
                self.pci.write(offset + i, data[i : i + 4])
            self.intx.update()  # Interrupt Disable or MSI-X Enable may have changed
        elif index == BAR_VIRTIO:
            self.bar0.write(offset, data)
        elif index == BAR_MSIX:
            if offset < MSIX_PBA:
                self.msix.write(offset, data)
        elif index == BAR_DOORBELL:
            if offset < NOTIFICATION_OFFSET:
                self.relay.doorbell(offset, DOORBELL_MULT)
            else:
                self._notification_write(offset - NOTIFICATION_OFFSET, data)
        else:
            self._window_write(self._window_offset(index, offset), data)

    def _check(self, index: int, offset: int, count: int) -> None:
        size = self.region_size(index)
        if not size or count <= 0 or offset < 0 or offset + count > size:
            raise PciAccessError(f"access {offset:#x}+{count} outside region {index} "
                                 f"({size:#x} bytes)")

    def doorbell_fds(self) -> list[tuple[int, int]]:
        """(BAR 2 offset, eventfd) of every doorbell that has a target now, and of every
        kick eventfd the driver reads itself (KICK_FD_VECTOR)."""
        r, n = self.relay, self.relay.max_queues
        return ([(DOORBELL_MULT * i, fd) for i, fd in sorted(r.calls.items())]
                + [(DOORBELL_MULT * (n + i), fd) for i, fd in sorted(r.errs.items())]
                + ([(DOORBELL_MULT * 2 * n, r.log_fd)] if r.log_fd is not None else [])
                + [(NOTIFICATION_OFFSET + KICK_FDS + 4 * i, fd)
                   for i, fd in sorted(r.kicks.items())
                   if self.notify_vectors[i] == KICK_FD_VECTOR])

    def watched_kicks(self) -> dict[int, int]:
        """The consumer's kick eventfds the device reads (all but those the driver reads
        itself), by vring."""
        return {i: fd for i, fd in self.relay.kicks.items()
                if i >= len(self.notify_vectors) or self.notify_vectors[i] != KICK_FD_VECTOR}

    def _kicks_read(self, offset: int, count: int) -> bytes:
        """KICKS: a bit per vring, le32 words, read-to-clear (a word's bits are cleared
        by the read that returns them); aligned 4- or 8-byte reads."""
        words = (self.relay.max_queues + 31) // 32
        if count not in (4, 8) or offset % count or offset >= 4 * words:
            return bytes(count)
        mask = ((1 << 8 * count) - 1) << 8 * offset
        value = (self.kicks & mask) >> 8 * offset
        self.kicks &= ~mask
        self._intx_level()
        return value.to_bytes(count, "little")

    def _notify_vector(self) -> int:
        if self.notify_select < len(self.notify_vectors):
            return self.notify_vectors[self.notify_select]
        return NO_VECTOR

    def _notification_write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data[:2], "little")
        if offset == 0 and len(data) >= 2:
            self.notify_select = value
            if len(data) == 4:  # select and vector in one write
                self._notification_write(2, data[2:])
        elif offset == 2 and len(data) >= 2 and self.notify_select < len(self.notify_vectors):
            ok = value < self.nvec or value in (NO_VECTOR, KICK_FD_VECTOR)
            self.notify_vectors[self.notify_select] = value if ok else NO_VECTOR

    def _window_offset(self, index: int, offset: int) -> int:
        f = self.window_file(index) if index >= FIRST_FILE_REGION else None
        return offset + (f.base if f is not None else 0)

    def _trapped(self, offset: int) -> None:
        if not self.trapped:
            log.warning("window access trapped at %#x: the client has not mapped that part "
                        "of the window (every access is a message)", offset)
        self.trapped += 1

    def _window_read(self, offset: int, count: int) -> bytes:
        """The trapped path (a client that could not mmap the window): from the file."""
        self._trapped(offset)
        f = self.relay.file_at(offset)
        if f is None:
            return bytes(count)
        n = min(count, f.base + f.size - offset)
        return os.pread(f.fd, n, offset - f.base).ljust(count, b"\0")

    def _window_write(self, offset: int, data: bytes) -> None:
        self._trapped(offset)
        f = self.relay.file_at(offset)
        if f is not None:
            os.pwrite(f.fd, data[: f.base + f.size - offset], offset - f.base)

    def close(self) -> None:
        self._drop_queues()
        self.relay.close()
        self.mem.clear()
        self.set_irqs(0, [None] * self.nvec)
        self.intx.close()

