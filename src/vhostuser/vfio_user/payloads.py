"""Payload types of vfio-user messages: a frozen dataclass per command's request or
reply, with ``pack()`` and ``unpack()``, plus the shared base they build on (`Payload`,
`Empty`, fixed-layout structs). All fields are host byte order (x86-64: little-endian),
as on the wire; structures from ``<linux/vfio.h>`` keep the kernel's layout. The VERSION
payload lives in `version`, DEVICE_GET_REGION_INFO and its capability chain in
`region_info`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Protocol

from ..fixed_struct import FixedStruct
from .constants import (
    DEVICE_FEATURE_MASK,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_DATA_MASK,
    DirtyPagesFlag,
    DmaMapFlag,
    DmaUnmapFlag,
    IrqSetFlag,
)
from .errors import BadPayload, BadPayloadSize, Truncated


class Payload(Protocol):
    def pack(self) -> bytes: ...


def _exact(cls: type, data: bytes, size: int) -> None:
    if len(data) < size:
        raise Truncated(f"{cls.__name__} payload truncated: {len(data)} of {size} bytes")
    if len(data) > size:
        raise BadPayloadSize(f"{cls.__name__} payload must be {size} bytes, got {len(data)}")


def _at_least(cls: type, data: bytes, size: int) -> None:
    if len(data) < size:
        raise Truncated(f"{cls.__name__} payload truncated: {len(data)} of {size} bytes")


@dataclass(frozen=True)
class Empty:
    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, data: bytes) -> Empty:
        _exact(cls, data, 0)
        return cls()


class _Fixed(FixedStruct):
    """Base for payloads with one fixed struct layout; fields in declaration order."""

    @classmethod
    def check_size(cls, data: bytes, size: int) -> None:
        _exact(cls, data, size)


@dataclass(frozen=True)
class U64(_Fixed):
    value: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<Q")


# ---- DMA_MAP / DMA_UNMAP


@dataclass(frozen=True)
class DmaMap(_Fixed):
    """DMA_MAP request; one fd (mappable) or none (use DMA_READ/WRITE). Reply: Empty."""

    argsz: int
    flags: int
    offset: int  # in the fd; 0 without one
    address: int
    size: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<IIQQQ")

    @classmethod
    def make(
        cls,
        address: int,
        size: int,
        offset: int = 0,
        flags: int = DmaMapFlag.READ | DmaMapFlag.WRITE,
    ) -> DmaMap:
        return cls(cls.FMT.size, flags, offset, address, size)


@dataclass(frozen=True)
class Bitmap(_Fixed):
    """struct vfio_user_bitmap: page size and size in bytes of a dirty bitmap."""

    pgsize: int
    size: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<QQ")


@dataclass(frozen=True)
class DmaUnmap:
    """DMA_UNMAP request, and the reply (the same entry; with GET_DIRTY_BITMAP followed by
    the bitmap's bytes)."""

    argsz: int
    flags: int
    address: int
    size: int
    bitmap: Bitmap | None = None  # present iff flags has GET_DIRTY_BITMAP
    data: bytes = b""  # the dirty bitmap itself (reply only)
    HEAD: ClassVar[struct.Struct] = struct.Struct("<IIQQ")

    @classmethod
    def make(cls, address: int, size: int, flags: int = 0) -> DmaUnmap:
        return cls(cls.HEAD.size, flags, address, size)

    def pack(self) -> bytes:
        tail = b"" if self.bitmap is None else self.bitmap.pack() + self.data
        return self.HEAD.pack(self.argsz, self.flags, self.address, self.size) + tail

    @classmethod
    def unpack(cls, data: bytes) -> DmaUnmap:
        _at_least(cls, data, cls.HEAD.size)
        argsz, flags, address, size = cls.HEAD.unpack_from(data)
        if not flags & DmaUnmapFlag.GET_DIRTY_BITMAP:
            _exact(cls, data, cls.HEAD.size)
            return cls(argsz, flags, address, size)
        end = cls.HEAD.size + Bitmap.FMT.size
        _at_least(cls, data, end)
        bitmap = Bitmap.unpack(data[cls.HEAD.size : end])
        return cls(argsz, flags, address, size, bitmap, bytes(data[end:]))


# ---- DEVICE_GET_INFO


@dataclass(frozen=True)
class DeviceInfo(_Fixed):
    argsz: int
    flags: int
    num_regions: int
    num_irqs: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<IIII")

    @classmethod
    def request(cls) -> DeviceInfo:
        return cls(cls.FMT.size, 0, 0, 0)

    @classmethod
    def reply(cls, flags: int, num_regions: int, num_irqs: int) -> DeviceInfo:
        return cls(cls.FMT.size, flags, num_regions, num_irqs)


# ---- DEVICE_GET_REGION_IO_FDS


@dataclass(frozen=True)
class IoFdSubRegion(_Fixed):
    """One sub-region of a REGION_IO_FDS reply; ``data`` is datamatch (ioeventfd) or
    user_data (ioregionfd)."""

    offset: int
    size: int
    fd_index: int
    type: int
    flags: int
    data: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<QQIII4xQ")


@dataclass(frozen=True)
class RegionIoFds:
    argsz: int
    flags: int
    index: int
    count: int
    subregions: tuple[IoFdSubRegion, ...] = ()
    HEAD: ClassVar[struct.Struct] = struct.Struct("<IIII")

    @classmethod
    def request(cls, index: int, argsz: int = 16) -> RegionIoFds:
        return cls(argsz, 0, index, 0)

    def pack(self) -> bytes:
        return self.HEAD.pack(self.argsz, self.flags, self.index, self.count) + b"".join(
            s.pack() for s in self.subregions
        )

    @classmethod
    def unpack(cls, data: bytes) -> RegionIoFds:
        _at_least(cls, data, cls.HEAD.size)
        argsz, flags, index, count = cls.HEAD.unpack_from(data)
        if len(data) == cls.HEAD.size:
            return cls(argsz, flags, index, count)
        sz = IoFdSubRegion.FMT.size
        if len(data) != cls.HEAD.size + count * sz:
            raise BadPayloadSize(
                f"REGION_IO_FDS with {count} sub-regions cannot be {len(data)} bytes"
            )
        off = cls.HEAD.size
        return cls(
            argsz,
            flags,
            index,
            count,
            tuple(
                IoFdSubRegion.unpack(data[off + i * sz : off + (i + 1) * sz]) for i in range(count)
            ),
        )


# ---- DEVICE_GET_IRQ_INFO / DEVICE_SET_IRQS


@dataclass(frozen=True)
class IrqInfo(_Fixed):
    argsz: int
    flags: int
    index: int
    count: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<IIII")

    @classmethod
    def request(cls, index: int) -> IrqInfo:
        return cls(cls.FMT.size, 0, index, 0)

    @classmethod
    def reply(cls, index: int, flags: int, count: int) -> IrqInfo:
        return cls(cls.FMT.size, flags, index, count)


@dataclass(frozen=True)
class IrqSet:
    """struct vfio_irq_set. With DATA_BOOL ``data`` holds ``count`` bytes; with
    DATA_EVENTFD the eventfds travel as SCM_RIGHTS (``count`` of them, or none to
    de-assign) and ``data`` is normally empty (QEMU sends argsz 20)."""

    argsz: int
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""
    HEAD: ClassVar[struct.Struct] = struct.Struct("<IIIII")

    @classmethod
    def make(cls, flags: int, index: int, start: int, count: int, data: bytes = b"") -> IrqSet:
        return cls(cls.HEAD.size + len(data), flags, index, start, count, data)

    @property
    def data_type(self) -> IrqSetFlag:
        return IrqSetFlag(self.flags & IRQ_SET_DATA_MASK)

    @property
    def action(self) -> IrqSetFlag:
        return IrqSetFlag(self.flags & IRQ_SET_ACTION_MASK)

    @property
    def bools(self) -> tuple[bool, ...]:
        return tuple(b != 0 for b in self.data)

    def pack(self) -> bytes:
        return (
            self.HEAD.pack(self.argsz, self.flags, self.index, self.start, self.count) + self.data
        )

    @classmethod
    def unpack(cls, data: bytes) -> IrqSet:
        _at_least(cls, data, cls.HEAD.size)
        return cls(*cls.HEAD.unpack_from(data), bytes(data[cls.HEAD.size :]))  # type: ignore[call-arg]


# ---- REGION_READ / REGION_WRITE / DMA_READ / DMA_WRITE


@dataclass(frozen=True)
class RegionAccess:
    """REGION_READ/WRITE request and reply: ``data`` is present in a write request and
    a read reply, and then must be ``count`` bytes."""

    offset: int
    region: int
    count: int
    data: bytes = b""
    HEAD: ClassVar[struct.Struct] = struct.Struct("<QII")

    def pack(self) -> bytes:
        return self.HEAD.pack(self.offset, self.region, self.count) + self.data

    @classmethod
    def unpack(cls, data: bytes) -> RegionAccess:
        _at_least(cls, data, cls.HEAD.size)
        return cls(*cls.HEAD.unpack_from(data), bytes(data[cls.HEAD.size :]))  # type: ignore[call-arg]


@dataclass(frozen=True)
class DmaAccess:
    """DMA_READ/WRITE (server -> client) request and reply: u64 address, u64 count, data
    (what the spec says and QEMU 11.1 does; a u32 count is refused by QEMU with E2BIG)."""

    address: int
    count: int
    data: bytes = b""
    HEAD: ClassVar[struct.Struct] = struct.Struct("<QQ")

    def pack(self) -> bytes:
        return self.HEAD.pack(self.address, self.count) + self.data

    @classmethod
    def unpack(cls, data: bytes) -> DmaAccess:
        _at_least(cls, data, cls.HEAD.size)
        return cls(*cls.HEAD.unpack_from(data), bytes(data[cls.HEAD.size :]))  # type: ignore[call-arg]


@dataclass(frozen=True)
class DmaWriteReply:
    """DMA_WRITE reply. QEMU 11.1 answers with u64 address + u64 count (16 bytes, what
    this packs); the spec's table says a u32 count (12 bytes) and older QEMU sent the
    header alone (`Empty`): all three decode."""

    address: int
    count: int

    def pack(self) -> bytes:
        return struct.pack("<QQ", self.address, self.count)

    @classmethod
    def unpack(cls, data: bytes) -> DmaWriteReply | Empty:
        if len(data) == 0:
            return Empty()
        if len(data) == 12:
            return cls(*struct.unpack("<QI", data))
        if len(data) == 16:
            return cls(*struct.unpack("<QQ", data))
        if len(data) < 12:
            raise Truncated(f"DMA_WRITE reply truncated: {len(data)} bytes")
        raise BadPayloadSize(f"DMA_WRITE reply must be 0, 12 or 16 bytes, got {len(data)}")


# ---- DIRTY_PAGES (legacy), REGION_WRITE_MULTI, DEVICE_FEATURE, MIG_DATA_*


@dataclass(frozen=True)
class BitmapRange(_Fixed):
    iova: int
    size: int
    pgsize: int
    bitmap_size: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<QQQQ")


@dataclass(frozen=True)
class DirtyPages:
    """DIRTY_PAGES (command 14, no longer in the spec): START, STOP or GET_BITMAP (with a
    range; the reply appends the bitmap)."""

    argsz: int
    flags: int
    range: BitmapRange | None = None
    data: bytes = b""
    HEAD: ClassVar[struct.Struct] = struct.Struct("<II")

    def pack(self) -> bytes:
        tail = b"" if self.range is None else self.range.pack() + self.data
        return self.HEAD.pack(self.argsz, self.flags) + tail

    @classmethod
    def unpack(cls, data: bytes) -> DirtyPages:
        _at_least(cls, data, cls.HEAD.size)
        argsz, flags = cls.HEAD.unpack_from(data)
        if not flags & DirtyPagesFlag.GET_BITMAP:
            _exact(cls, data, cls.HEAD.size)
            return cls(argsz, flags)
        end = cls.HEAD.size + BitmapRange.FMT.size
        _at_least(cls, data, end)
        return cls(argsz, flags, BitmapRange.unpack(data[cls.HEAD.size : end]), bytes(data[end:]))


MULTI_DATA = 8


@dataclass(frozen=True)
class MultiWrite:
    """One write of REGION_WRITE_MULTI: at most 8 bytes (``data`` is ``count`` bytes; the
    wire pads it to 8)."""

    offset: int
    region: int
    count: int
    data: bytes
    FMT: ClassVar[struct.Struct] = struct.Struct("<QII8s")

    def pack(self) -> bytes:
        return self.FMT.pack(self.offset, self.region, self.count, self.data)

    @classmethod
    def unpack(cls, data: bytes) -> MultiWrite:
        _exact(cls, data, cls.FMT.size)
        offset, region, count, raw = cls.FMT.unpack(data)
        if count > MULTI_DATA:
            raise BadPayload(f"REGION_WRITE_MULTI entry of {count} bytes (at most {MULTI_DATA})")
        return cls(offset, region, count, raw[:count])


@dataclass(frozen=True)
class RegionWriteMulti:
    writes: tuple[MultiWrite, ...]
    HEAD: ClassVar[struct.Struct] = struct.Struct("<Q")

    def pack(self) -> bytes:
        return self.HEAD.pack(len(self.writes)) + b"".join(w.pack() for w in self.writes)

    @classmethod
    def unpack(cls, data: bytes) -> RegionWriteMulti:
        _at_least(cls, data, cls.HEAD.size)
        (n,) = cls.HEAD.unpack_from(data)
        sz = MultiWrite.FMT.size
        if len(data) != cls.HEAD.size + n * sz:
            raise BadPayloadSize(f"REGION_WRITE_MULTI with {n} writes cannot be {len(data)} bytes")
        off = cls.HEAD.size
        return cls(
            tuple(MultiWrite.unpack(data[off + i * sz : off + (i + 1) * sz]) for i in range(n))
        )


@dataclass(frozen=True)
class DeviceFeature:
    argsz: int
    flags: int
    data: bytes = b""
    HEAD: ClassVar[struct.Struct] = struct.Struct("<II")

    @property
    def feature(self) -> int:
        return self.flags & DEVICE_FEATURE_MASK

    def pack(self) -> bytes:
        return self.HEAD.pack(self.argsz, self.flags) + self.data

    @classmethod
    def unpack(cls, data: bytes) -> DeviceFeature:
        _at_least(cls, data, cls.HEAD.size)
        return cls(*cls.HEAD.unpack_from(data), bytes(data[cls.HEAD.size :]))  # type: ignore[call-arg]


@dataclass(frozen=True)
class MigData:
    """MIG_DATA_READ request (no data) and reply, MIG_DATA_WRITE request."""

    argsz: int
    size: int
    data: bytes = b""
    HEAD: ClassVar[struct.Struct] = struct.Struct("<II")

    def pack(self) -> bytes:
        return self.HEAD.pack(self.argsz, self.size) + self.data

    @classmethod
    def unpack(cls, data: bytes) -> MigData:
        _at_least(cls, data, cls.HEAD.size)
        return cls(*cls.HEAD.unpack_from(data), bytes(data[cls.HEAD.size :]))  # type: ignore[call-arg]
