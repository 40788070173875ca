"""The virtio 1.x modern PCI transport, device side (virtio spec "Virtio Over PCI Bus"),
as a register model with no I/O.

`VirtioPciState` holds the transport state and answers accesses to the four structures,
each at offsets relative to the structure: the common configuration
(``struct virtio_pci_common_cfg``, 0x40 bytes including queue_notify_data, queue_reset and
the admin-queue fields, which read 0), the ISR status (read-to-clear), the notification
area (queue *i* at ``i * 4``: queue_notify_off = i, multiplier 4) and the device-specific
configuration, which it delegates to a `ConfigSpace`. `VirtioPciBar` places the four in
one BAR and builds their capabilities.

Rules (beyond plain storage):

- device_status 0 resets the device: features, selectors, queues (size back to the
  maximum, disabled, addresses 0), vectors to NO_VECTOR, ISR; then `on_reset()`. The
  config generation is not reset (it only ever moves on).
- FEATURES_OK is refused (the stored status lacks it) if the driver accepted a bit the
  device does not offer, or did not accept VERSION_1 (this transport has no legacy
  interface; the spec allows a device to refuse). After FEATURES_OK, driver_feature writes
  are ignored. The driver feature windows 0-3 (bits 0-127) are stored; writes to higher
  windows are dropped.
- queue_size: writable while the queue is disabled, to a power of two <= the maximum;
  anything else keeps the old value. Ring addresses are likewise frozen while the queue is
  enabled. queue_enable 1 enables the queue once and calls `on_queue_enable(i)`; other
  values are ignored (the driver must not write 0).
- queue_reset (VIRTIO_F_RING_RESET, only when negotiated): writing 1 resets the selected
  queue like a device reset does, calls `on_queue_reset(i)` and completes at once, so it
  reads 0 again. queue_notify_data is read-only and holds the queue index.
- Vector registers accept a vector below `nvec` or NO_VECTOR; anything else stores
  NO_VECTOR, which the driver reads back as the failure.
- Selecting a queue that does not exist: queue registers read 0 (queue_msix_vector reads
  NO_VECTOR) and writes to them are ignored.
- Writes must hit one field with its own width (64-bit fields: a dword at either half, or
  a qword); other writes are ignored. Reads of 1, 2, 4 or 8 bytes may cover any bytes.
  Other sizes, and accesses past a structure, raise `PciAccessError`.
- A notification for a queue that is not enabled is ignored. Every non-zero status write
  is reported to `on_status(status)` (after the FEATURES_OK check).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntFlag
from typing import Protocol

from ..protocol.constants import DeviceStatus, VirtioFeature
from ..protocol.virtio_pci import NO_VECTOR, Common, VirtioCfgType
from .msix import PciAccessError, check_access
from .pci import Capability, virtio_cap

FEATURE_WINDOWS = 4  # driver_feature windows kept: bits 0..127

COMMON_CFG_SIZE = 0x40
ISR_CFG_SIZE = 4
NOTIFY_OFF_MULTIPLIER = 4


class Isr(IntFlag):
    QUEUE = 1
    CONFIG = 2


_COMMON = struct.Struct("<IIIIHHBBHHHHHQQQHHHH")
assert _COMMON.size == COMMON_CFG_SIZE

_RING_FIELDS = {Common.QUEUE_DESC: "desc", Common.QUEUE_DRIVER: "driver",
                Common.QUEUE_DEVICE: "device"}
# The writable fields other than the ring addresses, with their widths.
_WRITABLE: dict[int, int] = {Common.DEVICE_FEATURE_SELECT: 4, Common.DRIVER_FEATURE_SELECT: 4,
             Common.DRIVER_FEATURE: 4, Common.CONFIG_MSIX_VECTOR: 2, Common.DEVICE_STATUS: 1,
             Common.QUEUE_SELECT: 2, Common.QUEUE_SIZE: 2, Common.QUEUE_MSIX_VECTOR: 2,
             Common.QUEUE_ENABLE: 2, Common.QUEUE_RESET: 2}


class ConfigSpace(Protocol):
    """The device-specific configuration structure."""

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


@dataclass
class QueueState:
    """What the driver configured for one virtqueue."""

    size: int
    enabled: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0
    msix_vector: int = NO_VECTOR
    max_size: int = field(default=0, repr=False)

    def reset(self) -> None:
        self.size, self.enabled = self.max_size, False
        self.desc = self.driver = self.device = 0
        self.msix_vector = NO_VECTOR


def _nop(_: int) -> None:
    pass


class VirtioPciState:
    def __init__(self, device_features: int, num_queues: int, max_queue_size: int,
                 config: ConfigSpace, *, nvec: int,
                 on_reset: Callable[[], None] | None = None,
                 on_queue_enable: Callable[[int], None] | None = None,
                 on_queue_reset: Callable[[int], None] | None = None,
                 on_notify: Callable[[int], None] | None = None,
                 on_status: Callable[[int], None] | None = None) -> None:
        if not device_features & VirtioFeature.VERSION_1:
            raise ValueError("a modern virtio device must offer VIRTIO_F_VERSION_1")
        if not 0 <= device_features < 1 << 32 * FEATURE_WINDOWS:
            raise ValueError("device features beyond bit 127")
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues {num_queues}")
        if not 1 <= max_queue_size <= 0x8000 or max_queue_size & (max_queue_size - 1):
            raise ValueError(f"max_queue_size {max_queue_size}: not a power of two <= 32768")
        if not 0 <= nvec <= 2048:
            raise ValueError(f"nvec {nvec}")
        self.device_features = device_features
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        self.config = config
        self.nvec = nvec
        self.on_reset = on_reset or (lambda: None)
        self.on_queue_enable = on_queue_enable or _nop
        self.on_queue_reset = on_queue_reset or _nop
        self.on_notify = on_notify or _nop
        self.on_status = on_status or _nop
        self.queues = [QueueState(max_queue_size, max_size=max_queue_size)
                       for _ in range(num_queues)]
        self.config_generation = 0
        self._clear()

    def _clear(self) -> None:
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = NO_VECTOR
        self.status = 0
        self.queue_select = 0
        self.isr = 0
        for q in self.queues:
            q.reset()

    def reset(self) -> None:
        """Device reset (the driver wrote 0 to device_status, or the VMM reset the
        function); calls `on_reset`."""
        self._clear()
        self.on_reset()

    # --------------------------------------------------------------- device-side events

    def config_changed(self) -> int:
        """The device changed its config: new generation, ISR config bit. Returns the
        config vector to fire (NO_VECTOR: none)."""
        self.config_generation = (self.config_generation + 1) & 0xFF
        self.isr |= Isr.CONFIG
        return self.config_msix_vector

    def queue_interrupt(self, index: int) -> int:
        """The device used buffers of queue `index`: ISR queue bit; returns its vector."""
        vector = self.queues[index].msix_vector
        self.isr |= Isr.QUEUE
        return vector

    def set_needs_reset(self) -> int | None:
        """DEVICE_NEEDS_RESET; after DRIVER_OK the driver must get a config change
        notification: its vector is returned then (None before DRIVER_OK)."""
        self.status |= DeviceStatus.DEVICE_NEEDS_RESET
        if self.status & DeviceStatus.DRIVER_OK:
            return self.config_changed()
        return None

    @property
    def features_ok(self) -> bool:
        return bool(self.status & DeviceStatus.FEATURES_OK)

    @property
    def driver_ok(self) -> bool:
        return bool(self.status & DeviceStatus.DRIVER_OK)

    # --------------------------------------------------------------- common config

    def _selected(self) -> QueueState | None:
        qs = self.queue_select
        return self.queues[qs] if qs < self.num_queues else None

    def _vector(self, value: int) -> int:
        return value if value < self.nvec or value == NO_VECTOR else NO_VECTOR

    def common_read(self, offset: int, size: int) -> bytes:
        check_access("common cfg", offset, size, COMMON_CFG_SIZE, (1, 2, 4, 8), aligned=False)
        q = self._selected()
        dsel, gsel = self.device_feature_select, self.driver_feature_select
        image = _COMMON.pack(
            dsel, self.device_features >> 32 * dsel & 0xFFFFFFFF if dsel < FEATURE_WINDOWS else 0,
            gsel, self.driver_features >> 32 * gsel & 0xFFFFFFFF if gsel < FEATURE_WINDOWS else 0,
            self.config_msix_vector, self.num_queues, self.status, self.config_generation,
            self.queue_select,
            q.size if q else 0, q.msix_vector if q else NO_VECTOR, int(q.enabled) if q else 0,
            self.queue_select if q else 0,
            q.desc if q else 0, q.driver if q else 0, q.device if q else 0,
            self.queue_select if q else 0, 0, 0, 0)
        return image[offset:offset + size]

    def common_write(self, offset: int, data: bytes) -> None:
        size = len(data)
        check_access("common cfg", offset, size, COMMON_CFG_SIZE, (1, 2, 4, 8), aligned=False)
        value = int.from_bytes(data, "little")
        for base, name in _RING_FIELDS.items():
            if base <= offset < base + 8:
                if (offset - base, size) in ((0, 8), (0, 4), (4, 4)):
                    self._write_ring(name, offset - base, size, value)
                return
        if _WRITABLE.get(offset) != size:
            return  # a read-only field, or not one whole field
        match offset:
            case Common.DEVICE_FEATURE_SELECT:
                self.device_feature_select = value
            case Common.DRIVER_FEATURE_SELECT:
                self.driver_feature_select = value
            case Common.DRIVER_FEATURE:
                self._write_driver_features(value)
            case Common.CONFIG_MSIX_VECTOR:
                self.config_msix_vector = self._vector(value)
            case Common.DEVICE_STATUS:
                self._write_status(value)
            case Common.QUEUE_SELECT:
                self.queue_select = value
            case _:
                self._write_queue(Common(offset), value)

    def _write_driver_features(self, value: int) -> None:
        sel = self.driver_feature_select
        if self.features_ok or sel >= FEATURE_WINDOWS:
            return
        shift = 32 * sel
        self.driver_features = self.driver_features & ~(0xFFFFFFFF << shift) | value << shift

    def _features_acceptable(self) -> bool:
        accepted = self.driver_features
        return not accepted & ~self.device_features and bool(accepted & VirtioFeature.VERSION_1)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        if value & DeviceStatus.FEATURES_OK and not self._features_acceptable():
            value &= ~DeviceStatus.FEATURES_OK
        # DEVICE_NEEDS_RESET is the device's: the driver neither sets nor clears it.
        value = value & ~DeviceStatus.DEVICE_NEEDS_RESET \
            | self.status & DeviceStatus.DEVICE_NEEDS_RESET
        self.status = value
        self.on_status(value)

    def _write_queue(self, reg: Common, value: int) -> None:
        q, index = self._selected(), self.queue_select
        if q is None:
            return
        if reg == Common.QUEUE_SIZE:
            if not q.enabled and 0 < value <= q.max_size and not value & (value - 1):
                q.size = value
        elif reg == Common.QUEUE_MSIX_VECTOR:
            q.msix_vector = self._vector(value)
        elif reg == Common.QUEUE_ENABLE:
            if value == 1 and not q.enabled:
                q.enabled = True
                self.on_queue_enable(index)
        elif value == 1 and self.driver_features & VirtioFeature.RING_RESET:  # QUEUE_RESET
            q.reset()
            self.on_queue_reset(index)

    def _write_ring(self, name: str, half: int, size: int, value: int) -> None:
        q = self._selected()
        if q is None or q.enabled:
            return
        if size == 8:
            setattr(q, name, value)
            return
        old = getattr(q, name)
        shift = 8 * half
        setattr(q, name, old & ~(0xFFFFFFFF << shift) | value << shift)

    # --------------------------------------------------------------- ISR, notify, device

    def isr_read(self, offset: int, size: int) -> bytes:
        """The ISR byte at offset 0; reading it clears it."""
        check_access("ISR", offset, size, ISR_CFG_SIZE, (1, 2, 4), aligned=False)
        image = bytes([self.isr, 0, 0, 0])[offset:offset + size]
        if offset == 0:
            self.isr = 0
        return image

    def isr_write(self, offset: int, data: bytes) -> None:
        """Read-only: checked, then ignored."""
        check_access("ISR", offset, len(data), ISR_CFG_SIZE, (1, 2, 4), aligned=False)

    @property
    def notify_size(self) -> int:
        return self.num_queues * NOTIFY_OFF_MULTIPLIER

    def notify_write(self, offset: int, data: bytes) -> None:
        """A 16-bit (or, with NOTIFICATION_DATA, 32-bit) write at queue_notify_off * 4."""
        check_access("notify", offset, len(data), self.notify_size, (2, 4), aligned=False)
        index, rest = divmod(offset, NOTIFY_OFF_MULTIPLIER)
        if rest == 0 and self.queues[index].enabled:
            self.on_notify(index)

    def notify_read(self, offset: int, size: int) -> bytes:
        check_access("notify", offset, size, self.notify_size, (1, 2, 4), aligned=False)
        return bytes(size)

    def device_read(self, offset: int, size: int) -> bytes:
        return self.config.read(offset, size)

    def device_write(self, offset: int, data: bytes) -> None:
        self.config.write(offset, data)


# ------------------------------------------------------------------------ BAR layout

WINDOW = 0x1000


class VirtioPciBar:
    """The four structures in one BAR, a 4 KiB window each: common cfg @0x0000,
    ISR @0x1000, device cfg @0x2000, notify @0x3000 (docs/vvu-design.md, BAR 0). Bytes of
    a window past its structure read 0 and ignore writes; accesses outside the 16 KiB
    raise PciAccessError."""

    COMMON, ISR, DEVICE, NOTIFY = 0x0000, 0x1000, 0x2000, 0x3000
    SIZE = 0x4000

    def __init__(self, state: VirtioPciState, bar: int, device_config_size: int) -> None:
        if not 0 <= device_config_size <= WINDOW or state.notify_size > WINDOW:
            raise ValueError("a virtio structure does not fit its 4 KiB window")
        self.state = state
        self.bar = bar
        self.device_config_size = device_config_size

    def capabilities(self) -> list[Capability]:
        """common, notify (multiplier 4), ISR and — if there is one — device cfg."""
        mult = struct.pack("<I", NOTIFY_OFF_MULTIPLIER)
        caps = [virtio_cap(VirtioCfgType.COMMON, self.bar, self.COMMON, COMMON_CFG_SIZE),
                virtio_cap(VirtioCfgType.NOTIFY, self.bar, self.NOTIFY, self.state.notify_size,
                           extra=mult),
                virtio_cap(VirtioCfgType.ISR, self.bar, self.ISR, ISR_CFG_SIZE)]
        if self.device_config_size:
            caps.append(virtio_cap(VirtioCfgType.DEVICE, self.bar, self.DEVICE,
                                   self.device_config_size))
        return caps

    def _route(self, offset: int, size: int) -> tuple[int, int, bool]:
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > self.SIZE:
            raise PciAccessError(f"virtio BAR: access [{offset:#x}, +{size}) refused")
        window, rel = divmod(offset, WINDOW)
        limit = (COMMON_CFG_SIZE, ISR_CFG_SIZE, self.device_config_size,
                 self.state.notify_size)[window]
        return window * WINDOW, rel, rel + size <= limit

    def read(self, offset: int, size: int) -> bytes:
        base, rel, inside = self._route(offset, size)
        if not inside:
            return bytes(size)
        s = self.state
        reader = {self.COMMON: s.common_read, self.ISR: s.isr_read,
                  self.DEVICE: s.device_read, self.NOTIFY: s.notify_read}[base]
        return reader(rel, size)

    def write(self, offset: int, data: bytes) -> None:
        base, rel, inside = self._route(offset, len(data))
        if not inside:
            return
        s = self.state
        writer = {self.COMMON: s.common_write, self.ISR: s.isr_write,
                  self.DEVICE: s.device_write, self.NOTIFY: s.notify_write}[base]
        writer(rel, data)
