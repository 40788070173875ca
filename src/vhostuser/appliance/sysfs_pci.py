"""A PCI function on this machine's own bus, driven from user space through sysfs: the
appliance VM's view of the virtio-vhost-user device (`--vvu pci:0000:00:04.0`).

It offers what `VirtioPciDriver` and `VvuLink` use of a vfio-user client — config space
and BAR accesses, BAR mappings, DMA memory — with these differences:

- BARs are the ``resourceN`` files, mmap-ed; every register access is one aligned load or
  store of its size (a guest MMIO access that QEMU forwards to the device as is);
- DMA memory is one huge page (physically contiguous and never swapped; the kernel moves
  a huge page only on memory offlining or an explicit move_pages, which an appliance VM
  does not do), and its bus address is read once from /proc/self/pagemap (no IOMMU in the
  appliance VM: bus address = guest-physical address);
- interrupts are INTx through uio_pci_generic (`bind_uio`, then `uio.UioInterrupts`;
  MSI-X would take VFIO, which needs an IOMMU), or none: the driver polls, the exitless
  mode. Doorbells are plain MMIO writes.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import re
import struct
import time
from pathlib import Path
from typing import Any

from ..vfio_user.constants import PciRegion
from ..virtq.guest_ram import GuestRam

log = logging.getLogger(__name__)

SYSFS = Path("/sys/bus/pci/devices")
BDF = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
MAP_HUGETLB = 0x40000  # not exported by Python's mmap module
HUGE_PAGE = 2 << 20
_FMT = {1: "B", 2: "H", 4: "I"}
PCI_COMMAND, CMD_MEMORY, CMD_BUS_MASTER, CMD_INTX_DISABLE = 0x04, 0x2, 0x4, 0x400
CAP_POINTER, CAP_MSIX, MSIX_ENABLE, MSIX_MASKALL = 0x34, 0x11, 0x8000, 0x4000
UIO_DRIVER = "uio_pci_generic"
LOCK_WAIT = 10.0  # s to wait for the processes of a back-end that ended to be gone


class SysfsPciError(OSError):
    pass


class SysfsPciFunction:
    """One PCI function, by its address (``0000:00:04.0``)."""

    def __init__(self, bdf: str, root: Path = SYSFS, lock_wait: float = LOCK_WAIT) -> None:
        if not BDF.match(bdf):
            raise SysfsPciError(f"{bdf!r} is not a PCI address (domain:bus:device.function)")
        self.bdf = bdf
        self.path = root / bdf
        if not self.path.is_dir():
            raise SysfsPciError(f"no PCI device {bdf} ({self.path} does not exist)")
        self._lock = self._take_lock(lock_wait)
        try:
            self._unbind()
            (self.path / "enable").write_text("1")  # memory decoding on
            with open(self.path / "config", "r+b", buffering=0) as f:  # and bus mastering
                f.seek(PCI_COMMAND)
                command = int.from_bytes(f.read(2), "little")
                if not command & CMD_BUS_MASTER:
                    f.seek(PCI_COMMAND)
                    f.write((command | CMD_MEMORY | CMD_BUS_MASTER).to_bytes(2, "little"))
            # Config space and the BARs stay open from here on: a back-end may confine
            # itself (a sandbox without /sys) once the device is set up.
            self._config = os.open(self.path / "config", os.O_RDWR | os.O_CLOEXEC)
        except BaseException:
            os.close(self._lock)  # the next try must not wait for ourselves
            raise
        self.bars: dict[int, mmap.mmap] = {}
        self.views: dict[int, memoryview] = {}  # BAR -> bytes
        self.typed: dict[tuple[int, int], memoryview] = {}  # (BAR, size) -> words of size
        try:
            self._msix_at = self._find_msix_cap()
            for index in range(6):
                path = self.path / f"resource{index}"
                if path.exists() and "_wc" not in path.name:
                    try:
                        self.map_bar(index)
                    except SysfsPciError as e:  # an I/O BAR: not one a virtio device uses
                        log.debug("%s: BAR %d not mapped: %s", bdf, index, e)
        except BaseException:
            self.close()
            raise

    def _take_lock(self, wait: float) -> int:
        """An exclusive flock on the function's config file, taken before touching the
        device and held, through the inherited open file, by every process of this
        back-end (its forked queue workers too): the lock is free again only once the last
        of them is gone. A back-end restarted after a crash waits here until no process of
        the old one can touch the consumer's rings (resetting the device ends the
        consumer's session, whose resume point must be final by then)."""
        fd = os.open(self.path / "config", os.O_RDONLY | os.O_CLOEXEC)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise SysfsPciError(f"{self.bdf} is in use by another back-end (still "
                                        f"locked after {wait:g} s)") from None
                time.sleep(0.01)

    def bind_uio(self) -> None:
        """Give the function to uio_pci_generic (its interrupts, on /dev/uioN): by
        driver_override, so that nothing else takes it on a rescan either."""
        bus = self.path.parent.parent
        if not (bus / "drivers" / UIO_DRIVER).is_dir():
            raise SysfsPciError(f"no {UIO_DRIVER} driver in this kernel (modprobe {UIO_DRIVER})")
        try:
            (self.path / "driver_override").write_text(UIO_DRIVER)
            if not (self.path / "driver").exists():
                (bus / "drivers_probe").write_text(self.bdf)
            if not self.uio_name():
                raise SysfsPciError(f"{self.bdf}: {UIO_DRIVER} did not take it (no INTx, "
                                    "or INTx that cannot be masked)")
        except OSError as e:
            try:
                (self.path / "driver_override").write_text("\n")  # as it was
            except OSError:
                pass
            if isinstance(e, SysfsPciError):
                raise
            raise SysfsPciError(f"{self.bdf}: cannot bind {UIO_DRIVER}: {e}") from e

    def uio_name(self) -> str | None:
        uio = self.path / "uio"
        names = sorted(p.name for p in uio.iterdir()) if uio.is_dir() else []
        return names[0] if names else None

    def open_uio(self) -> int:
        """/dev/uioN of the function (after `bind_uio`): a 4-byte read blocks until the
        next interrupt and returns the count so far."""
        name = self.uio_name()
        if name is None:
            raise SysfsPciError(f"{self.bdf} is not bound to {UIO_DRIVER}")
        try:
            return os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SysfsPciError(f"{self.bdf}: /dev/{name}: {e.strerror}") from e

    def set_intx_disabled(self, disabled: bool) -> None:
        """The command register's Interrupt Disable bit (uio_pci_generic's handler sets it
        to mask INTx; the driver clears it once it has handled the interrupt)."""
        command = int.from_bytes(os.pread(self._config, 2, PCI_COMMAND), "little")
        new = command | CMD_INTX_DISABLE if disabled else command & ~CMD_INTX_DISABLE
        os.pwrite(self._config, new.to_bytes(2, "little"), PCI_COMMAND)

    def remap_bars(self) -> None:
        """Set and clear MSI-X Enable, with the function masked (nothing is sent): makes
        QEMU's vfio-user-pci stop and restart INTx, and with that map the BARs again,
        which it stopped mapping at the interrupt (appliance/uio.py). No MSI-X: nothing."""
        at = self._msix_at
        if at is None:
            return
        control = int.from_bytes(os.pread(self._config, 2, at + 2), "little")
        os.pwrite(self._config, (control | MSIX_ENABLE | MSIX_MASKALL).to_bytes(2, "little"),
                  at + 2)
        os.pwrite(self._config, control.to_bytes(2, "little"), at + 2)

    def _find_msix_cap(self) -> int | None:
        """Found once: on a PCI bus each config dword read is a trapped access."""
        config = os.pread(self._config, 256, 0)
        if len(config) <= CAP_POINTER:
            return None
        at, seen = config[CAP_POINTER] & ~3, set()
        while at and at not in seen and at + 4 <= len(config):
            seen.add(at)
            if config[at] == CAP_MSIX:
                return at
            at = config[at + 1] & ~3
        return None

    def _unbind(self) -> None:
        driver = self.path / "driver"
        if driver.exists():
            name = driver.resolve().name
            log.info("%s: unbinding the kernel driver %s", self.bdf, name)
            (driver / "unbind").write_text(self.bdf)

    # -- the vfio-user client's API, as VirtioPciDriver uses it ----------------------------

    def dma_map(self, iova: int, size: int, fd: int) -> None:
        """Nothing to do: the device reaches this VM's memory by its physical address."""

    def open_bar(self, index: int) -> int:
        """An fd of BAR `index`'s sysfs file (the caller's to close): mmap it to reach the
        BAR, in this process or another."""
        try:
            return os.open(self.path / f"resource{index}", os.O_RDWR | os.O_SYNC | os.O_CLOEXEC)
        except OSError as e:
            raise SysfsPciError(f"{self.bdf}: BAR {index} cannot be opened: {e}") from e

    def map_bar(self, index: int) -> mmap.mmap:
        m = self.bars.get(index)
        if m is None:
            fd = self.open_bar(index)
            try:
                m = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED)
            except (OSError, ValueError) as e:
                raise SysfsPciError(f"{self.bdf}: BAR {index} cannot be mapped: {e}") from e
            finally:
                os.close(fd)
            self.bars[index] = m
        return m

    def read(self, region: int, offset: int, count: int) -> bytes:
        if region == PciRegion.CONFIG:
            return os.pread(self._config, count, offset).ljust(count, b"\xff")
        if count in _FMT and offset % count == 0:
            return self.read_u(region, offset, count).to_bytes(count, "little")
        return bytes(self._bar(region)[offset : offset + count])

    def write(self, region: int, offset: int, data: bytes) -> None:
        if region == PciRegion.CONFIG:
            os.pwrite(self._config, data, offset)
        elif len(data) in _FMT and offset % len(data) == 0:
            self.write_u(region, offset, len(data), int.from_bytes(data, "little"))
        else:
            self._bar(region)[offset : offset + len(data)] = data

    def read_u(self, region: int, offset: int, size: int) -> int:
        if offset % size:
            raise ValueError(f"unaligned {size}-byte register access at {offset:#x}")
        if size == 8:
            return self.read_u(region, offset, 4) | self.read_u(region, offset + 4, 4) << 32
        return self._typed(region, size)[offset // size]

    def write_u(self, region: int, offset: int, size: int, value: int) -> None:
        if offset % size:
            raise ValueError(f"unaligned {size}-byte register access at {offset:#x}")
        if size == 8:
            self.write_u(region, offset, 4, value & 0xFFFFFFFF)
            self.write_u(region, offset + 4, 4, value >> 32)
            return
        self._typed(region, size)[offset // size] = value  # one store of `size` bytes

    def _bar(self, region: int) -> memoryview:
        v = self.views.get(region)
        if v is None:
            v = self.views[region] = memoryview(self.map_bar(region))
        return v

    def _typed(self, region: int, size: int) -> memoryview:
        v = self.typed.get((region, size))
        if v is None:
            fmt: Any = _FMT[size]  # "B", "H" or "I"
            v = self.typed[region, size] = self._bar(region).cast(fmt)
        return v

    def irq_count(self, index: int) -> int:
        """None that an eventfd can take: MSI-X needs vfio; through sysfs a process has
        INTx alone, by uio_pci_generic (appliance/uio.py)."""
        return 0

    def set_irq_eventfds(self, index: int, start: int, fds: list[int]) -> None:
        raise SysfsPciError("interrupts through sysfs are INTx by uio_pci_generic alone")

    def fds(self) -> list[int]:
        """Its config space and its lock (the BARs are mappings)."""
        return [fd for fd in (self._config, self._lock) if fd >= 0]

    def close(self) -> None:
        for v in (*self.typed.values(), *self.views.values()):
            v.release()
        self.typed.clear()
        self.views.clear()
        for m in self.bars.values():
            m.close()
        self.bars.clear()
        if self._config >= 0:
            os.close(self._config)
            self._config = -1
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


class MmioNotifier:
    """A doorbell: a 16-bit write to a mapped BAR (the device turns it into the consumer's
    call). Works in forked workers: the mapping is shared."""

    __slots__ = ("index", "view")

    def __init__(self, bar: mmap.mmap, offset: int) -> None:
        self.view = memoryview(bar).cast("H")
        self.index = offset // 2

    def notify(self) -> None:
        self.view[self.index] = 1

    def fds(self) -> tuple[int, ...]:
        return ()  # the mapping is enough

    def close(self) -> None:
        self.view.release()


def physical_address(mapping: mmap.mmap) -> int:
    """The physical address of the first byte of `mapping` (root only)."""
    obj = ctypes.c_char.from_buffer(mapping)
    vaddr = ctypes.addressof(obj)
    del obj
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        f.seek(vaddr // page * 8)
        entry: int = struct.unpack("<Q", f.read(8))[0]
    pfn = entry & ((1 << 55) - 1)
    if not entry >> 63 or not pfn:
        raise SysfsPciError("no physical address for DMA memory (not root, or not present)")
    return pfn * page + vaddr % page


class HugePageRam(GuestRam):
    """`GuestRam` over one 2 MiB huge page (all that is sure to be physically
    contiguous): the driver's rings and buffers, at their physical address. Needs a free
    huge page (``echo 1 > /proc/sys/vm/nr_hugepages``)."""

    def __init__(self) -> None:
        try:
            m = mmap.mmap(-1, HUGE_PAGE, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | MAP_HUGETLB
                          | mmap.MAP_POPULATE)
        except OSError as e:
            raise SysfsPciError(f"no huge page for DMA memory ({e}): "
                                "echo 1 > /proc/sys/vm/nr_hugepages") from e
        self._adopt(m, -1, physical_address(m))
