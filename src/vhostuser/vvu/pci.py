"""The configuration space of a PCI type-0 function (256 bytes, no extended space), as a
register model with no I/O, plus builders for the virtio and MSI-X capabilities.

The space is a byte image with a per-byte write mask and a per-byte write-1-to-clear mask
(the scheme of QEMU's hw/pci/pci.c), so any access of 1, 2 or 4 bytes inside the space
works, aligned or not; other sizes and out-of-range accesses raise `PciAccessError`.

What is writable:

- command: Memory Space (bit 1), Bus Master (bit 2), INTx Disable (bit 10). I/O Space is
  hardwired to 0 (memory BARs only); parity/SERR reporting is not modelled (reads 0).
- status: read-only, except the error bits (15, 14, 13, 12, 11, 8), which are
  write-1-to-clear. Nothing sets them, so they read 0. Bit 4 (capabilities list) is set
  when there are capabilities; bit 3 (interrupt status) follows `set_interrupt_status`.
- BARs: the address bits of each declared BAR (sizing: write all-ones, read back the size
  mask with the flag bits; a 64-bit BAR's upper dword likewise). Unused slots read 0, so
  sizing finds nothing. No expansion ROM (0x30 reads 0).
- cache line size (0x0c) and interrupt line (0x3c): plain scratch registers, which
  firmware writes and expects to read back.
- MSI-X message control: MSI-X Enable (bit 15) and Function Mask (bit 14).

Everything else is read-only; writes to it are ignored, as hardware does.

Interrupt pin: 0 (no INTx) by default; ``interrupt_pin=1`` for INTA#, whose level and
unmask handshake `intx.IntxLine` models on top of this space.
"""

from __future__ import annotations

import struct
from dataclasses import KW_ONLY, dataclass
from enum import IntFlag

from ..protocol.virtio_pci import CapId
from .msix import MsixTable, PciAccessError, check_access

__all__ = [
    "CONFIG_SPACE_SIZE",
    "Bar",
    "Capability",
    "Command",
    "MsixTable",
    "PciAccessError",
    "PciConfig",
    "Status",
    "msix_cap",
    "virtio_cap",
    "virtio_cap64",
]

CONFIG_SPACE_SIZE = 256
CAP_START = 0x40
NUM_BARS = 6

# header offsets
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION, CLASS_PROG, CACHE_LINE_SIZE, HEADER_TYPE = 0x08, 0x09, 0x0C, 0x0E
BAR0, SUBSYS_VENDOR_ID, SUBSYS_ID, CAPABILITY_LIST = 0x10, 0x2C, 0x2E, 0x34
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D

BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCH = 0x8

MSIX_CTRL_ENABLE = 0x8000
MSIX_CTRL_MASKALL = 0x4000


class Command(IntFlag):
    IO = 1 << 0
    MEMORY = 1 << 1
    MASTER = 1 << 2
    INTX_DISABLE = 1 << 10


WRITABLE_COMMAND = Command.MEMORY | Command.MASTER | Command.INTX_DISABLE


class Status(IntFlag):
    INTERRUPT = 1 << 3
    CAP_LIST = 1 << 4
    MASTER_PARITY_ERROR = 1 << 8
    SIG_TARGET_ABORT = 1 << 11
    REC_TARGET_ABORT = 1 << 12
    REC_MASTER_ABORT = 1 << 13
    SIG_SYSTEM_ERROR = 1 << 14
    DETECTED_PARITY = 1 << 15


W1C_STATUS = (Status.MASTER_PARITY_ERROR | Status.SIG_TARGET_ABORT | Status.REC_TARGET_ABORT
              | Status.REC_MASTER_ABORT | Status.SIG_SYSTEM_ERROR | Status.DETECTED_PARITY)


# ------------------------------------------------------------------------------- BARs


@dataclass(frozen=True)
class Bar:
    """A memory BAR. A 64-bit BAR uses slots `index` and `index + 1`."""

    index: int
    size: int
    _: KW_ONLY
    mem64: bool = True
    prefetch: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.index < NUM_BARS - (1 if self.mem64 else 0):
            raise ValueError(f"BAR index {self.index} out of range for a "
                             f"{'64' if self.mem64 else '32'}-bit BAR")
        limit = 1 << (63 if self.mem64 else 31)
        if self.size < 16 or self.size > limit or self.size & (self.size - 1):
            raise ValueError(f"BAR{self.index} size {self.size:#x}: not a power of two "
                             f"in [16, {limit:#x}]")

    @property
    def slots(self) -> range:
        return range(self.index, self.index + (2 if self.mem64 else 1))

    @property
    def flags(self) -> int:
        """The read-only low bits: memory space, type, prefetchable."""
        return (BAR_MEM_TYPE_64 if self.mem64 else 0) | (BAR_MEM_PREFETCH if self.prefetch else 0)

    @property
    def address_mask(self) -> int:
        """The writable address bits, over 32 or 64 bits."""
        return ~(self.size - 1) & ((1 << (64 if self.mem64 else 32)) - 1)


# ------------------------------------------------------------------------ capabilities


@dataclass(frozen=True)
class Capability:
    """One capability: its id and the bytes after the id/next pair. `wmask` (empty: all
    read-only) gives the writable bits of `body`, byte for byte."""

    cap_id: int
    body: bytes
    wmask: bytes = b""

    def __post_init__(self) -> None:
        if not 0 <= self.cap_id <= 0xFF:
            raise ValueError(f"capability id {self.cap_id:#x}")
        if self.wmask and len(self.wmask) != len(self.body):
            raise ValueError("capability wmask must be as long as its body")

    @property
    def length(self) -> int:
        return 2 + len(self.body)


def _u32(name: str, value: int) -> int:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} {value:#x} does not fit 32 bits")
    return value


def _check_bar(bar: int) -> None:
    if not 0 <= bar < NUM_BARS:
        raise ValueError(f"BAR index {bar}")


def virtio_cap(cfg_type: int, bar: int, offset: int, length: int, id: int = 0,
               extra: bytes = b"") -> Capability:
    """``struct virtio_pci_cap`` (16 bytes) followed by `extra` (for the notify
    capability: le32 notify_off_multiplier)."""
    _check_bar(bar)
    cap_len = 16 + len(extra)
    body = struct.pack("<BBBB2xII", cap_len, cfg_type, bar, id,
                       _u32("offset", offset), _u32("length", length))
    return Capability(CapId.VENDOR, body + extra)


def virtio_cap64(cfg_type: int, bar: int, offset: int, length: int, id: int = 0) -> Capability:
    """``struct virtio_pci_cap64`` (24 bytes): offset and length split into low and high
    dwords; used by the shared-memory capability (cfg_type 8, `id` = shmid)."""
    _check_bar(bar)
    if not (0 <= offset < 1 << 64 and 0 <= length < 1 << 64):
        raise ValueError("offset/length do not fit 64 bits")
    body = struct.pack("<BBBB2xIIII", 24, cfg_type, bar, id, offset & 0xFFFFFFFF,
                       length & 0xFFFFFFFF, offset >> 32, length >> 32)
    return Capability(CapId.VENDOR, body)


def msix_cap(table_size: int, table_bar: int, table_offset: int, pba_bar: int,
             pba_offset: int) -> Capability:
    """The MSI-X capability (12 bytes): message control (table size - 1; Enable and
    Function Mask writable), table offset|BIR, PBA offset|BIR."""
    if not 1 <= table_size <= 2048:
        raise ValueError(f"MSI-X table size {table_size} not in 1..2048")
    _check_bar(table_bar)
    _check_bar(pba_bar)
    if table_offset % 8 or pba_offset % 8:
        raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
    body = struct.pack("<HII", table_size - 1, _u32("table offset", table_offset) | table_bar,
                       _u32("PBA offset", pba_offset) | pba_bar)
    wmask = struct.pack("<HII", MSIX_CTRL_ENABLE | MSIX_CTRL_MASKALL, 0, 0)
    return Capability(CapId.MSIX, body, wmask)


# ----------------------------------------------------------------------- config space


class PciConfig:
    """A type-0 configuration space. `msix` is the function's MSI-X table, told of
    Enable/Function Mask changes; it needs an MSI-X capability of the same size."""

    def __init__(self, vendor: int, device: int, *, subsys_vendor: int, subsys_id: int,
                 class_code: int, revision: int, bars: list[Bar], caps: list[Capability],
                 interrupt_pin: int = 0, msix: MsixTable | None = None) -> None:
        if not 0 <= class_code <= 0xFFFFFF:
            raise ValueError(f"class code {class_code:#x} does not fit 24 bits")
        if not 0 <= interrupt_pin <= 4:
            raise ValueError(f"interrupt pin {interrupt_pin} not in 0..4")
        self.bars: dict[int, Bar] = {}
        used: set[int] = set()
        for bar in bars:
            if used & set(bar.slots):
                raise ValueError(f"BAR{bar.index} overlaps another BAR's slot")
            used.update(bar.slots)
            self.bars[bar.index] = bar
        self._msix = msix
        self._data = bytearray(CONFIG_SPACE_SIZE)
        self._wmask = bytearray(CONFIG_SPACE_SIZE)
        self._w1c = bytearray(CONFIG_SPACE_SIZE)

        struct.pack_into("<HH", self._data, VENDOR_ID, vendor, device)
        struct.pack_into("<I", self._data, REVISION, class_code << 8 | revision)
        struct.pack_into("<HH", self._data, SUBSYS_VENDOR_ID, subsys_vendor, subsys_id)
        self._data[INTERRUPT_PIN] = interrupt_pin
        struct.pack_into("<H", self._wmask, COMMAND, WRITABLE_COMMAND)
        struct.pack_into("<H", self._w1c, STATUS, W1C_STATUS)
        self._wmask[CACHE_LINE_SIZE] = 0xFF
        self._wmask[INTERRUPT_LINE] = 0xFF
        for bar in self.bars.values():
            at = BAR0 + 4 * bar.index
            self._data[at] = bar.flags
            mask = bar.address_mask & ~0xF
            struct.pack_into("<Q" if bar.mem64 else "<I", self._wmask, at, mask)

        self.cap_offsets: list[int] = []
        self._msix_cap: int | None = None
        self._place_caps(caps)
        self._reset_image = bytes(self._data)

    def _place_caps(self, caps: list[Capability]) -> None:
        at = CAP_START
        for cap in caps:
            if at + cap.length > CONFIG_SPACE_SIZE:
                raise ValueError("capabilities do not fit in the 256-byte config space")
            self.cap_offsets.append(at)
            self._data[at] = cap.cap_id
            self._data[at + 2:at + cap.length] = cap.body
            if cap.wmask:
                self._wmask[at + 2:at + cap.length] = cap.wmask
            if cap.cap_id == CapId.MSIX:
                if self._msix_cap is not None:
                    raise ValueError("more than one MSI-X capability")
                self._msix_cap = at
                self._check_msix(cap)
            at = (at + cap.length + 3) & ~3  # capability pointers are dword aligned
        for i, here in enumerate(self.cap_offsets):
            self._data[here + 1] = self.cap_offsets[i + 1] if i + 1 < len(caps) else 0
        if caps:
            self._data[CAPABILITY_LIST] = CAP_START
            struct.pack_into("<H", self._data, STATUS, Status.CAP_LIST)
        elif self._msix is not None:
            raise ValueError("an MSI-X table needs an MSI-X capability")

    def _check_msix(self, cap: Capability) -> None:
        ctrl, table, pba = struct.unpack("<HII", cap.body)
        nvec = (ctrl & 0x7FF) + 1
        if self._msix is not None and self._msix.nvec != nvec:
            raise ValueError(f"MSI-X capability says {nvec} vectors, table has "
                             f"{self._msix.nvec}")
        spans = [(table & 7, table & ~7, nvec * 16), (pba & 7, pba & ~7, (nvec + 63) // 64 * 8)]
        for bir, offset, size in spans:
            bar = self.bars.get(bir)
            if bar is None or offset + size > bar.size:
                raise ValueError(f"MSI-X structure at BAR{bir}+{offset:#x} is not inside "
                                 "a declared BAR")
        (b1, o1, s1), (b2, o2, s2) = spans
        if b1 == b2 and o1 < o2 + s2 and o2 < o1 + s1:
            raise ValueError("MSI-X table and PBA overlap")

    # ------------------------------------------------------------------------- access

    def read(self, offset: int, size: int) -> bytes:
        check_access("PCI config", offset, size, CONFIG_SPACE_SIZE, (1, 2, 4), aligned=False)
        return bytes(self._data[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        check_access("PCI config", offset, len(data), CONFIG_SPACE_SIZE, (1, 2, 4),
                     aligned=False)
        for i, byte in enumerate(data):
            at = offset + i
            wm, w1c = self._wmask[at], self._w1c[at]
            value = (self._data[at] & ~wm) | (byte & wm)
            self._data[at] = value & ~(byte & w1c) & 0xFF
        ctrl = self._msix_cap
        touched = ctrl is not None and offset < ctrl + 4 and ctrl + 2 < offset + len(data)
        if touched and self._msix is not None:
            self._msix.set_control(self.msix_enabled, self.msix_masked)

    def dump(self) -> bytes:
        """The whole space (reads have no side effects), e.g. for a 256-byte
        REGION_READ."""
        return bytes(self._data)

    def reset(self) -> None:
        """Back to the power-on image (command 0, BARs unprogrammed, MSI-X disabled); the
        MSI-X table is reset too."""
        self._data[:] = self._reset_image
        if self._msix is not None:
            self._msix.reset()

    # ------------------------------------------------------------------------- state

    def _u16(self, offset: int) -> int:
        return int.from_bytes(self._data[offset:offset + 2], "little")

    @property
    def command(self) -> int:
        return self._u16(COMMAND)

    @property
    def memory_enabled(self) -> bool:
        return bool(self.command & Command.MEMORY)

    @property
    def bus_master(self) -> bool:
        return bool(self.command & Command.MASTER)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.command & Command.INTX_DISABLE)

    def set_interrupt_status(self, asserted: bool) -> None:
        """Status bit 3: the function's INTx state (whether or not INTx Disable is set)."""
        status = self._u16(STATUS) & ~Status.INTERRUPT
        struct.pack_into("<H", self._data, STATUS, status | (Status.INTERRUPT if asserted else 0))

    def _msix_control(self) -> int:
        return 0 if self._msix_cap is None else self._u16(self._msix_cap + 2)

    @property
    def msix_enabled(self) -> bool:
        return bool(self._msix_control() & MSIX_CTRL_ENABLE)

    @property
    def msix_masked(self) -> bool:
        """The MSI-X Function Mask bit."""
        return bool(self._msix_control() & MSIX_CTRL_MASKALL)

    def bar_address(self, index: int) -> int:
        """The address programmed into a declared BAR (flag bits stripped)."""
        bar = self.bars.get(index)
        if bar is None:
            raise ValueError(f"BAR{index} is not a declared BAR")
        at = BAR0 + 4 * index
        raw: int = struct.unpack_from("<Q" if bar.mem64 else "<I", self._data, at)[0]
        return raw & bar.address_mask & ~0xF
