"""Payload types of vhost-user messages: one small frozen dataclass each, with pack/unpack.

All fields are host byte order (x86-64: little-endian), as on the wire.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from ..fixed_struct import FixedStruct
from .constants import MAX_CONFIG_SIZE, MAX_MEM_REGIONS, VRING_IDX_MASK, VRING_NOFD_MASK
from .errors import BadPayload, BadPayloadSize


class Payload(Protocol):
    def pack(self) -> bytes: ...


@dataclass(frozen=True)
class Empty:
    SIZE: ClassVar[int] = 0

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, data: bytes) -> Empty:
        _exact(cls, data, 0)
        return cls()


def _exact(cls: type, data: bytes, size: int) -> None:
    if len(data) != size:
        raise BadPayloadSize(f"{cls.__name__} payload must be {size} bytes, got {len(data)}")


class _Fixed(FixedStruct):
    """Base for payloads with one fixed struct layout; fields in declaration order."""

    @classmethod
    def check_size(cls, data: bytes, size: int) -> None:
        _exact(cls, data, size)


@dataclass(frozen=True)
class U64(_Fixed):
    value: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<Q")


@dataclass(frozen=True)
class VringFile(_Fixed):
    """u64 of SET_VRING_KICK/CALL/ERR: ring index in bits 0-7, NOFD in bit 8."""

    value: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<Q")

    @classmethod
    def make(cls, index: int, nofd: bool = False) -> VringFile:
        return cls((index & VRING_IDX_MASK) | (VRING_NOFD_MASK if nofd else 0))

    @property
    def index(self) -> int:
        return self.value & VRING_IDX_MASK

    @property
    def nofd(self) -> bool:
        return bool(self.value & VRING_NOFD_MASK)


@dataclass(frozen=True)
class VringState(_Fixed):
    index: int
    num: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<II")


@dataclass(frozen=True)
class VringAddr(_Fixed):
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")


@dataclass(frozen=True)
class MemRegion(_Fixed):
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<QQQQ")


@dataclass(frozen=True)
class MemTable:
    regions: tuple[MemRegion, ...]
    HEAD: ClassVar[struct.Struct] = struct.Struct("<II")

    def pack(self) -> bytes:
        return self.HEAD.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes) -> MemTable:
        if len(data) < cls.HEAD.size:
            raise BadPayloadSize(f"memory table payload too short ({len(data)} bytes)")
        n, _pad = cls.HEAD.unpack_from(data)
        if n > MAX_MEM_REGIONS:
            raise BadPayload(f"memory table has {n} regions, at most {MAX_MEM_REGIONS} allowed")
        rsize = MemRegion.FMT.size
        # QEMU sends the full 8-region array; others send exactly nregions entries.
        if len(data) not in (cls.HEAD.size + n * rsize, cls.HEAD.size + MAX_MEM_REGIONS * rsize):
            raise BadPayloadSize(f"memory table of {n} regions cannot be {len(data)} bytes")
        off = cls.HEAD.size
        return cls(tuple(MemRegion.unpack(data[off + i * rsize : off + (i + 1) * rsize])
                         for i in range(n)))


@dataclass(frozen=True)
class SingleMemRegion:
    """ADD_MEM_REG / REM_MEM_REG: u64 padding, then one region."""

    region: MemRegion

    def pack(self) -> bytes:
        return bytes(8) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes) -> SingleMemRegion:
        _exact(cls, data, 8 + MemRegion.FMT.size)
        return cls(MemRegion.unpack(data[8:]))


@dataclass(frozen=True)
class LogBase(_Fixed):
    mmap_size: int
    mmap_offset: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<QQ")


@dataclass(frozen=True)
class IotlbMsg(_Fixed):
    iova: int
    size: int
    uaddr: int
    perm: int
    type: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<QQQBB6x")


@dataclass(frozen=True)
class Config:
    offset: int
    size: int
    flags: int
    data: bytes = field(default=b"")
    HEAD: ClassVar[struct.Struct] = struct.Struct("<III")

    def pack(self) -> bytes:
        return self.HEAD.pack(self.offset, self.size, self.flags) + self.data

    @classmethod
    def unpack(cls, data: bytes) -> Config:
        if len(data) < cls.HEAD.size:
            raise BadPayloadSize(f"config payload too short ({len(data)} bytes)")
        offset, size, flags = cls.HEAD.unpack_from(data)
        if size > MAX_CONFIG_SIZE:
            raise BadPayload(f"config size {size} exceeds {MAX_CONFIG_SIZE}")
        if len(data) != cls.HEAD.size + size:
            raise BadPayloadSize(f"config payload of size {size} cannot be {len(data)} bytes")
        return cls(offset, size, flags, bytes(data[cls.HEAD.size :]))


@dataclass(frozen=True)
class VringArea(_Fixed):
    u64: int
    size: int
    offset: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<QQQ")

    @property
    def index(self) -> int:
        return self.u64 & VRING_IDX_MASK

    @property
    def nofd(self) -> bool:
        return bool(self.u64 & VRING_NOFD_MASK)


@dataclass(frozen=True)
class Inflight(_Fixed):
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<QQHH4x")


@dataclass(frozen=True)
class SharedObject(_Fixed):
    uuid: bytes
    FMT: ClassVar[struct.Struct] = struct.Struct("<16s")


@dataclass(frozen=True)
class DeviceStateParams(_Fixed):
    direction: int
    phase: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<II")


@dataclass(frozen=True)
class ShmemMap(_Fixed):
    shmid: int
    fd_offset: int
    shm_offset: int
    len: int
    flags: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<B7xQQQQ")


@dataclass(frozen=True)
class ShmemConfig:
    sizes: tuple[int, ...]
    MAX: ClassVar[int] = 256
    HEAD: ClassVar[struct.Struct] = struct.Struct("<II")

    def pack(self) -> bytes:
        padded = list(self.sizes) + [0] * (self.MAX - len(self.sizes))
        return self.HEAD.pack(len(self.sizes), 0) + struct.pack(f"={self.MAX}Q", *padded)

    @classmethod
    def unpack(cls, data: bytes) -> ShmemConfig:
        _exact(cls, data, cls.HEAD.size + 8 * cls.MAX)
        n, _ = cls.HEAD.unpack_from(data)
        if n > cls.MAX:
            raise BadPayload(f"shmem config has {n} regions, at most {cls.MAX}")
        return cls(struct.unpack_from(f"={n}Q", data, cls.HEAD.size))


@dataclass(frozen=True)
class Raw:
    """Opaque payload (crypto sessions): carried, not interpreted."""

    data: bytes

    def pack(self) -> bytes:
        return self.data

    @classmethod
    def unpack(cls, data: bytes) -> Raw:
        return cls(bytes(data))
