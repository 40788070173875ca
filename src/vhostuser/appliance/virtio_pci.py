"""A virtio 1.x modern PCI driver over a vfio-user client: find the capabilities, negotiate
features, set up split rings in the driver's memory, notify, receive MSI-X interrupts on
eventfds. Enough to drive any modern virtio device from a process with no VM."""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from typing import Protocol

from ..protocol.constants import DeviceStatus, VirtioFeature
from ..protocol.virtio_pci import NO_VECTOR, CapId, Common, VirtioCfgType
from ..shutdown import readable
from ..vfio_user.constants import PciRegion
from ..vfio_user.protocol import PciIrq
from ..virtq.guest_ram import GuestRam
from ..virtq.split_driver import DriverRing

_FOUND = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
_NEGOTIATED = _FOUND | DeviceStatus.FEATURES_OK
RESET_TIMEOUT = 5.0  # s a device may take to complete a reset


class DriverError(Exception):
    pass


@dataclass(frozen=True)
class Cap:
    cfg_type: int
    bar: int
    offset: int
    length: int
    raw: bytes  # the whole capability, for type-specific fields


def find_caps(config: bytes) -> dict[int, Cap]:
    """The virtio vendor capabilities of a config space, by cfg_type (first of each)."""
    caps: dict[int, Cap] = {}
    ptr, seen = config[0x34] & ~3, set()
    while ptr and ptr not in seen and ptr + 16 <= len(config):
        seen.add(ptr)
        if config[ptr] == CapId.VENDOR:
            cap_len, cfg_type, bar = config[ptr + 2], config[ptr + 3], config[ptr + 4]
            offset, length = struct.unpack_from("<II", config, ptr + 8)
            if cfg_type == 8 and cap_len >= 24:  # virtio_pci_cap64
                hi_off, hi_len = struct.unpack_from("<II", config, ptr + 16)
                offset, length = offset | hi_off << 32, length | hi_len << 32
            caps.setdefault(cfg_type, Cap(cfg_type, bar, offset, length,
                                          config[ptr : ptr + cap_len]))
        ptr = config[ptr + 1] & ~3
    return caps


class PciFunction(Protocol):
    """What the driver needs of a PCI function: the vfio-user client, or the function on
    this machine's bus through sysfs (appliance/sysfs_pci.py)."""

    def dma_map(self, iova: int, size: int, fd: int) -> None: ...

    def read(self, region: int, offset: int, count: int) -> bytes: ...

    def write(self, region: int, offset: int, data: bytes) -> None: ...

    def read_u(self, region: int, offset: int, size: int) -> int: ...

    def write_u(self, region: int, offset: int, size: int, value: int) -> None: ...

    def irq_count(self, index: int) -> int:
        """How many interrupts of kind `index` (PciIrq) the function can signal to us."""
        ...

    def set_irq_eventfds(self, index: int, start: int, fds: list[int]) -> None:
        """Have interrupts start.. of kind `index` signal `fds`."""
        ...


class VirtioPciDriver:
    def __init__(self, dev: PciFunction, ram: GuestRam) -> None:
        self.dev = dev
        self.ram = ram
        dev.dma_map(ram.guest_addr, ram.size, ram.fd)
        self.config = dev.read(PciRegion.CONFIG, 0, 256)
        self.caps = find_caps(self.config)
        for need in (VirtioCfgType.COMMON, VirtioCfgType.NOTIFY, VirtioCfgType.ISR,
                     VirtioCfgType.DEVICE):
            if need not in self.caps:
                raise DriverError(f"device has no virtio capability of type {need}")
        self.notify_mult = struct.unpack_from("<I", self.caps[VirtioCfgType.NOTIFY].raw, 16)[0]
        self.vectors: list[int] = []  # eventfd per MSI-X vector
        self.rings: dict[int, DriverRing] = {}
        self.notify_at: dict[int, int] = {}  # queue -> its notify register's BAR offset
        self.features = 0

    @property
    def ids(self) -> tuple[int, int]:
        return struct.unpack_from("<HH", self.config, 0)

    # -- register access -------------------------------------------------------------------

    def _common(self, off: int, size: int, value: int | None = None) -> int:
        c = self.caps[VirtioCfgType.COMMON]
        if value is None:
            return self.dev.read_u(c.bar, c.offset + off, size)
        self.dev.write_u(c.bar, c.offset + off, size, value)
        return value

    def status(self) -> int:
        return self._common(Common.DEVICE_STATUS, 1)

    def config_read(self, offset: int, size: int) -> bytes:
        c = self.caps[VirtioCfgType.DEVICE]
        return self.dev.read(c.bar, c.offset + offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        c = self.caps[VirtioCfgType.DEVICE]
        self.dev.write(c.bar, c.offset + offset, data)

    # -- initialisation --------------------------------------------------------------------

    def setup_vectors(self, count: int) -> list[int]:
        have = self.dev.irq_count(PciIrq.MSIX)
        if have < count:
            raise DriverError(f"{count} MSI-X vectors wanted, {have} to be had (through "
                              "sysfs none: INTx only)")
        self.vectors = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        self.dev.set_irq_eventfds(PciIrq.MSIX, 0, self.vectors)
        return self.vectors

    def init(self, wanted: int, config_vector: int = NO_VECTOR) -> int:
        """Reset, acknowledge, negotiate; returns the features both sides have."""
        self._common(Common.DEVICE_STATUS, 1, 0)
        deadline = time.monotonic() + RESET_TIMEOUT
        while self.status() != 0:  # virtio 1.x 4.1.4.3.2: wait until the reset completes
            if time.monotonic() > deadline:
                raise DriverError(f"the device did not complete its reset within "
                                  f"{RESET_TIMEOUT:g} s (status {self.status():#x})")
        self._common(Common.DEVICE_STATUS, 1, _FOUND)
        offered = 0
        for word in (0, 1):
            self._common(Common.DEVICE_FEATURE_SELECT, 4, word)
            offered |= self._common(Common.DEVICE_FEATURE, 4) << (32 * word)
        self.features = offered & wanted
        for word in (0, 1):
            self._common(Common.DRIVER_FEATURE_SELECT, 4, word)
            self._common(Common.DRIVER_FEATURE, 4, (self.features >> (32 * word)) & 0xFFFFFFFF)
        self._common(Common.DEVICE_STATUS, 1, _NEGOTIATED)
        if not self.status() & DeviceStatus.FEATURES_OK:
            raise DriverError(f"device refused features {self.features:#x}")
        self._common(Common.CONFIG_MSIX_VECTOR, 2, config_vector)
        return self.features

    def setup_queue(self, index: int, size: int, vector: int = NO_VECTOR) -> DriverRing:
        self._common(Common.QUEUE_SELECT, 2, index)
        if size > self._common(Common.QUEUE_SIZE, 2):
            raise DriverError(f"queue {index}: size {size} above the device's maximum")
        self._common(Common.QUEUE_SIZE, 2, size)
        ring = DriverRing(self.ram, size, bool(self.features & VirtioFeature.RING_EVENT_IDX))
        for off, gpa in ((Common.QUEUE_DESC, ring.desc_gpa),
                         (Common.QUEUE_DRIVER, ring.avail_gpa),
                         (Common.QUEUE_DEVICE, ring.used_gpa)):
            self._common(off, 4, gpa & 0xFFFFFFFF)
            self._common(off + 4, 4, gpa >> 32)
        if (self._common(Common.QUEUE_MSIX_VECTOR, 2, vector) != vector
                or self._common(Common.QUEUE_MSIX_VECTOR, 2) != vector):
            raise DriverError(f"queue {index}: vector {vector} refused")
        self._common(Common.QUEUE_ENABLE, 2, 1)
        n = self.caps[VirtioCfgType.NOTIFY]
        self.notify_at[index] = (n.offset
                                 + self._common(Common.QUEUE_NOTIFY_OFF, 2) * self.notify_mult)
        self.rings[index] = ring
        return ring

    def reset(self) -> None:
        """Status 0: the device resets (its vectors, queues and interrupt sources too);
        not waited for."""
        self._common(Common.DEVICE_STATUS, 1, 0)

    def driver_ok(self) -> None:
        self._common(Common.DEVICE_STATUS, 1, _NEGOTIATED | DeviceStatus.DRIVER_OK)

    # -- data path -------------------------------------------------------------------------

    def notify(self, index: int) -> None:
        """One register write (the queue's notify address is learned at set-up: on a PCI
        bus every access is a trap)."""
        self.dev.write_u(self.caps[VirtioCfgType.NOTIFY].bar, self.notify_at[index], 2, index)

    def kick(self, index: int) -> None:
        if self.rings[index].needs_kick():
            self.notify(index)

    def wait(self, vectors: list[int], timeout: float | None) -> list[int]:
        """Wait for any of `vectors`; returns those that fired (their counters cleared)."""
        fds = {self.vectors[v]: v for v in vectors}
        ready = readable(list(fds), timeout)
        fired = []
        for fd in ready:
            try:
                os.eventfd_read(fd)
                fired.append(fds[fd])
            except BlockingIOError:
                pass
        return fired

    def close(self) -> None:
        for ring in self.rings.values():
            ring.release()
        self.rings.clear()
        for fd in self.vectors:
            os.close(fd)
        self.vectors = []
