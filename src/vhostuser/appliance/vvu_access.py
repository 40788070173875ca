"""How the virtio-vhost-user link reaches its device beyond the registers (which
appliance/virtio_pci.py drives through `PciFunction`): the memory window, the doorbells,
eventfds to hand over, interrupts. Two ways, one protocol (`DeviceAccess`):

- `VfioUserAccess`: the device process's vfio-user socket (a process appliance). The
  window is the consumer's memory files, offered as vfio-user regions with their fds;
  doorbells and kicks are ioeventfds that another process can be given; MSI-X vectors
  are eventfds.
- `SysfsAccess`: the device on this machine's PCI bus (inside the appliance VM). The
  window is BAR 4 itself, a doorbell an MMIO write; INTx through uio_pci_generic, or
  none (polling); no eventfd to hand over, and a log placed in the window later would be
  reached only through trapped accesses (no atomic OR: no dirty log).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Protocol

from ..engine.notify import EventfdNotifier, Notifier
from ..memory import MemoryTableError, seal_against_shrinking
from ..protocol.payloads import MemRegion
from ..vfio_user.client import Region, VfioUserClient
from ..virtq.guest_ram import GuestRam
from ..vvu.abi import FIRST_FILE_REGION, WINDOW_BASE_CAP
from .sysfs_pci import HugePageRam, MmioNotifier, SysfsPciError, SysfsPciFunction
from .uio import UioInterrupts
from .virtio_pci import Cap, PciFunction

log = logging.getLogger(__name__)

PCI_PREFIX = "pci:"
RAM_SIZE = 2 << 20  # the driver's rings and buffers (over vfio-user)


class DeviceAccess(Protocol):
    function: PciFunction  # the registers, for VirtioPciDriver
    ram: GuestRam  # where the driver's rings and buffers live
    msix: bool  # MSI-X vectors on eventfds (else INTx, or polling)
    hands_over_fds: bool  # doorbell and kick ioeventfds another process may be given
    shared_log: bool  # a dirty log placed in the window is reachable with atomic ORs

    def started(self) -> None:
        """The driver has initialised the device."""
        ...

    def intx(self, count: int, acknowledge: Callable[[], Iterable[int]]
             ) -> UioInterrupts | None:
        """INTx on `count` eventfds (one per vector the driver would have had with
        MSI-X), or None where there is none to take (then: polling)."""
        ...

    def window_view(self, cap: Cap, desc: MemRegion) -> memoryview:
        """Region `desc` (its mmap_offset: its offset in the window), mapped."""
        ...

    def window_fd(self, cap: Cap, desc: MemRegion) -> tuple[int, int]:
        """An fd another process can mmap for region `desc` and the region's offset in it
        (the caller closes the fd)."""
        ...

    def doorbell(self, cap: Cap, offset: int) -> Notifier | None:
        """What rings the doorbell at `offset` (None: the device has no eventfd there)."""
        ...

    def io_fd(self, bar: int, offset: int) -> int | None:
        """A dup of the ioeventfd behind register `offset` of `bar`, if there is one."""
        ...

    def fds(self) -> list[int]:
        """The device's, as a worker holds them (as it holds a vhost-user connection: the
        device sees the back-end gone only once its workers are)."""
        ...

    def close(self) -> None: ...


def open_access(device: str) -> DeviceAccess:
    """`device`: the device's vfio-user socket, or ``pci:`` and its PCI address on this
    machine's bus."""
    if device.startswith(PCI_PREFIX):
        return SysfsAccess(device[len(PCI_PREFIX):])
    return VfioUserAccess(device)


class VfioUserAccess:
    msix = True
    hands_over_fds = True
    shared_log = True  # the device places the log's file in the window

    def __init__(self, path: str) -> None:
        self.client = VfioUserClient(path)
        self.function: PciFunction = self.client
        try:
            self.ram = GuestRam(RAM_SIZE, guest_addr=0x1_0000_0000)
        except BaseException:
            self.client.close()
            raise

    def started(self) -> None:
        pass

    def intx(self, count: int, acknowledge: Callable[[], Iterable[int]]
             ) -> UioInterrupts | None:
        return None  # MSI-X instead

    def window_view(self, cap: Cap, desc: MemRegion) -> memoryview:
        """vfio-user regions 9, 10, ... are the window's files, each with its window base
        (the device re-reads them per table)."""
        region, offset = self._window_file(desc)
        try:
            return memoryview(self.client.map_region(region))[offset : offset + desc.size]
        finally:
            if region.fd is not None:
                os.close(region.fd)

    def window_fd(self, cap: Cap, desc: MemRegion) -> tuple[int, int]:
        """The consumer's memory file that the device offers as a vfio-user region."""
        region, offset = self._window_file(desc)
        assert region.fd is not None
        return region.fd, region.offset + region.mmap_areas[0][0] + offset

    def _window_file(self, desc: MemRegion) -> tuple[Region, int]:
        """The vfio-user region (with its fd, the caller's to close) of the window file
        that holds `desc`, and where `desc` starts in its mappable area."""
        start, end = desc.mmap_offset, desc.mmap_offset + desc.size
        for index in range(FIRST_FILE_REGION, FIRST_FILE_REGION + 64):
            region = self.client.region(index)
            if not region.size:
                break
            base = next((int.from_bytes(getattr(c, "data", b"")[:8], "little")
                         for c in region.caps
                         if getattr(c, "id", None) == WINDOW_BASE_CAP), None)
            if (base is not None and base <= start and end <= base + region.size
                    and region.fd is not None and region.mmap_areas):
                seal_against_shrinking(region.fd)  # the consumer's file: no SIGBUS for us
                return region, start - base
            if region.fd is not None:
                os.close(region.fd)
        raise MemoryTableError(f"region {desc} is in none of the window's memory files")

    def doorbell(self, cap: Cap, offset: int) -> Notifier | None:
        fd = self.io_fd(cap.bar, offset)
        return None if fd is None else EventfdNotifier(fd)

    def io_fd(self, bar: int, offset: int) -> int | None:
        pairs = self.client.io_fds(bar)
        found = None
        for off, fd in pairs:
            if off == offset and found is None:
                found = os.dup(fd)
        for fd in {fd for _, fd in pairs}:
            os.close(fd)
        return found

    def fds(self) -> list[int]:
        return [self.client.chan.fileno()]

    def close(self) -> None:
        self.client.close()
        self.ram.close()


class SysfsAccess:
    msix = False
    hands_over_fds = False  # a doorbell is an MMIO write, with no eventfd
    # The window is BAR 4, mapped once at attach: a log placed in it later is reached only
    # through trapped accesses, where an atomic OR is a read and a write apart (a bit
    # another worker set meanwhile is lost).
    shared_log = False

    def __init__(self, address: str) -> None:
        self.fn = SysfsPciFunction(address)
        self.function: PciFunction = self.fn
        try:
            self.ram: GuestRam = HugePageRam()  # no huge page free: SysfsPciError
        except BaseException:
            self.fn.close()
            raise

    def started(self) -> None:
        # an INTx of an earlier back-end's (or of the device with nobody to take it) left
        # QEMU's BAR mappings off: have it map them again, poll mode too
        self.fn.remap_bars()

    def intx(self, count: int, acknowledge: Callable[[], Iterable[int]]
             ) -> UioInterrupts | None:
        try:
            self.fn.bind_uio()
            acknowledge()  # creates its register views before the thread shares them
            uio = UioInterrupts(self.fn, count, acknowledge)
        except (SysfsPciError, OSError) as e:
            log.warning("no interrupts (%s): polling", e)
            return None
        log.info("interrupts: INTx through uio_pci_generic (/dev/%s)", self.fn.uio_name())
        return uio

    def window_view(self, cap: Cap, desc: MemRegion) -> memoryview:
        start, end = desc.mmap_offset, desc.mmap_offset + desc.size
        bar = self.fn.map_bar(cap.bar)
        if end > min(cap.length, len(bar) - cap.offset):
            raise MemoryTableError(f"region {desc} lies outside the window")
        return memoryview(bar)[cap.offset + start : cap.offset + end]

    def window_fd(self, cap: Cap, desc: MemRegion) -> tuple[int, int]:
        """The BAR's sysfs file."""
        start, end = desc.mmap_offset, desc.mmap_offset + desc.size
        fd = self.fn.open_bar(cap.bar)
        if end > min(cap.length, os.fstat(fd).st_size - cap.offset):
            os.close(fd)
            raise MemoryTableError(f"region {desc} lies outside the window")
        return fd, cap.offset + start

    def doorbell(self, cap: Cap, offset: int) -> Notifier | None:
        return MmioNotifier(self.fn.map_bar(cap.bar), cap.offset + offset)

    def io_fd(self, bar: int, offset: int) -> int | None:
        return None

    def fds(self) -> list[int]:
        return self.fn.fds()

    def close(self) -> None:
        self.fn.close()
        self.ram.close()
