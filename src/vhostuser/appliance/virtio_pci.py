"""A virtio 1.x modern PCI driver over a vfio-user client: find the capabilities, negotiate
features, set up split rings in the driver's memory, notify, receive MSI-X interrupts on
eventfds. Enough to drive any modern virtio device from a process with no VM."""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from typing import Protocol

from ..shutdown import readable
from ..vfio_user.client import VfioUserClient
from ..vfio_user.protocol import PciIrq
from ..virtq.guest_ram import GuestRam
from ..virtq.split_driver import DriverRing

CONFIG_REGION = 7
VENDOR_CAP = 0x09
COMMON, NOTIFY, ISR, DEVICE = 1, 2, 3, 4
NO_VECTOR = 0xFFFF

# struct virtio_pci_common_cfg offsets
DFSELECT, DF, GFSELECT, GF, MSIX_CONFIG, NUM_QUEUES, STATUS = 0, 4, 8, 12, 16, 18, 20
Q_SELECT, Q_SIZE, Q_MSIX, Q_ENABLE, Q_NOTIFY_OFF = 22, 24, 26, 28, 30
Q_DESC, Q_DRIVER, Q_DEVICE = 32, 40, 48
S_ACK, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK, S_NEEDS_RESET = 1, 2, 4, 8, 64


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
        if config[ptr] == VENDOR_CAP:
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


class VirtioPciDriver:
    def __init__(self, dev: PciFunction, ram: GuestRam) -> None:
        self.dev = dev
        self.ram = ram
        dev.dma_map(ram.guest_addr, ram.size, ram.fd)
        self.config = dev.read(CONFIG_REGION, 0, 256)
        self.caps = find_caps(self.config)
        for need in (COMMON, NOTIFY, ISR, DEVICE):
            if need not in self.caps:
                raise DriverError(f"device has no virtio capability of type {need}")
        self.notify_mult = struct.unpack_from("<I", self.caps[NOTIFY].raw, 16)[0]
        self.vectors: list[int] = []  # eventfd per MSI-X vector
        self.rings: dict[int, DriverRing] = {}
        self.notify_at: dict[int, int] = {}  # queue -> its notify register's BAR offset
        self.features = 0

    @property
    def ids(self) -> tuple[int, int]:
        return struct.unpack_from("<HH", self.config, 0)

    # -- register access -------------------------------------------------------------------

    def _common(self, off: int, size: int, value: int | None = None) -> int:
        c = self.caps[COMMON]
        if value is None:
            return self.dev.read_u(c.bar, c.offset + off, size)
        self.dev.write_u(c.bar, c.offset + off, size, value)
        return value

    def status(self) -> int:
        return self._common(STATUS, 1)

    def config_read(self, offset: int, size: int) -> bytes:
        c = self.caps[DEVICE]
        return self.dev.read(c.bar, c.offset + offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        c = self.caps[DEVICE]
        self.dev.write(c.bar, c.offset + offset, data)

    # -- initialisation --------------------------------------------------------------------

    def setup_vectors(self, count: int) -> list[int]:
        if not isinstance(self.dev, VfioUserClient):
            raise DriverError("interrupt vectors need the device over vfio-user")
        have = self.dev.irq_count(PciIrq.MSIX)
        if have < count:
            raise DriverError(f"device has {have} MSI-X vectors, {count} wanted")
        self.vectors = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        self.dev.set_irq_eventfds(PciIrq.MSIX, 0, self.vectors)
        return self.vectors

    def init(self, wanted: int, config_vector: int = NO_VECTOR) -> int:
        """Reset, acknowledge, negotiate; returns the features both sides have."""
        self._common(STATUS, 1, 0)
        deadline = time.monotonic() + RESET_TIMEOUT
        while self.status() != 0:  # virtio 1.x 4.1.4.3.2: wait until the reset completes
            if time.monotonic() > deadline:
                raise DriverError(f"the device did not complete its reset within "
                                  f"{RESET_TIMEOUT:g} s (status {self.status():#x})")
        self._common(STATUS, 1, S_ACK | S_DRIVER)
        offered = 0
        for word in (0, 1):
            self._common(DFSELECT, 4, word)
            offered |= self._common(DF, 4) << (32 * word)
        self.features = offered & wanted
        for word in (0, 1):
            self._common(GFSELECT, 4, word)
            self._common(GF, 4, (self.features >> (32 * word)) & 0xFFFFFFFF)
        self._common(STATUS, 1, S_ACK | S_DRIVER | S_FEATURES_OK)
        if not self.status() & S_FEATURES_OK:
            raise DriverError(f"device refused features {self.features:#x}")
        self._common(MSIX_CONFIG, 2, config_vector)
        return self.features

    def setup_queue(self, index: int, size: int, vector: int = NO_VECTOR) -> DriverRing:
        self._common(Q_SELECT, 2, index)
        if size > self._common(Q_SIZE, 2):
            raise DriverError(f"queue {index}: size {size} above the device's maximum")
        self._common(Q_SIZE, 2, size)
        ring = DriverRing(self.ram, size, bool(self.features & (1 << 29)))
        for off, gpa in ((Q_DESC, ring.desc_gpa), (Q_DRIVER, ring.avail_gpa),
                         (Q_DEVICE, ring.used_gpa)):
            self._common(off, 4, gpa & 0xFFFFFFFF)
            self._common(off + 4, 4, gpa >> 32)
        if self._common(Q_MSIX, 2, vector) != vector or self._common(Q_MSIX, 2) != vector:
            raise DriverError(f"queue {index}: vector {vector} refused")
        self._common(Q_ENABLE, 2, 1)
        n = self.caps[NOTIFY]
        self.notify_at[index] = n.offset + self._common(Q_NOTIFY_OFF, 2) * self.notify_mult
        self.rings[index] = ring
        return ring

    def reset(self) -> None:
        """Status 0: the device resets (its vectors, queues and interrupt sources too);
        not waited for."""
        self._common(STATUS, 1, 0)

    def driver_ok(self) -> None:
        self._common(STATUS, 1, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)

    # -- data path -------------------------------------------------------------------------

    def notify(self, index: int) -> None:
        """One register write (the queue's notify address is learned at set-up: on a PCI
        bus every access is a trap)."""
        self.dev.write_u(self.caps[NOTIFY].bar, self.notify_at[index], 2, index)

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
