"""DEVICE_GET_REGION_INFO: `RegionInfo` (struct vfio_region_info) and its capability
chain (sparse mmap areas, region type, MSI-X mappable, and `RawCap` for capabilities not
interpreted here), in the kernel's layout with each entry padded to 8 bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from .constants import RegionCapId, RegionFlag
from .errors import BadPayload, BadPayloadSize, Truncated
from .payloads import _at_least

_CAP_HEADER = struct.Struct("<HHI")  # struct vfio_info_cap_header: id, version, next


@dataclass(frozen=True)
class SparseMmapCap:
    """VFIO_REGION_INFO_CAP_SPARSE_MMAP: the parts of the region that may be mmapped,
    as (offset, size) pairs relative to the region's mmap offset."""

    areas: tuple[tuple[int, int], ...]
    ID: ClassVar[int] = RegionCapId.SPARSE_MMAP
    VERSION: ClassVar[int] = 1
    HEAD: ClassVar[struct.Struct] = struct.Struct("<II")  # nr_areas, reserved
    AREA: ClassVar[struct.Struct] = struct.Struct("<QQ")

    def body(self) -> bytes:
        return self.HEAD.pack(len(self.areas), 0) + b"".join(
            self.AREA.pack(o, s) for o, s in self.areas
        )

    @classmethod
    def parse(cls, version: int, data: bytes) -> SparseMmapCap:
        if len(data) < cls.HEAD.size:
            raise Truncated(f"sparse mmap capability truncated ({len(data)} bytes)")
        n, _reserved = cls.HEAD.unpack_from(data)
        need = cls.HEAD.size + n * cls.AREA.size
        if len(data) < need:
            raise Truncated(
                f"sparse mmap capability with {n} areas needs {need} bytes, has {len(data)}"
            )
        return cls(
            tuple(cls.AREA.unpack_from(data, cls.HEAD.size + i * cls.AREA.size) for i in range(n))
        )


@dataclass(frozen=True)
class RegionTypeCap:
    """VFIO_REGION_INFO_CAP_TYPE: a device-specific region (index >= 9 for PCI)."""

    type: int
    subtype: int
    ID: ClassVar[int] = RegionCapId.TYPE
    VERSION: ClassVar[int] = 1
    FMT: ClassVar[struct.Struct] = struct.Struct("<II")

    def body(self) -> bytes:
        return self.FMT.pack(self.type, self.subtype)

    @classmethod
    def parse(cls, version: int, data: bytes) -> RegionTypeCap:
        if len(data) < cls.FMT.size:
            raise Truncated(f"region type capability truncated ({len(data)} bytes)")
        return cls(*cls.FMT.unpack_from(data))


@dataclass(frozen=True)
class MsixMappableCap:
    """VFIO_REGION_INFO_CAP_MSIX_MAPPABLE: the MSI-X table may be mmapped too."""

    ID: ClassVar[int] = RegionCapId.MSIX_MAPPABLE
    VERSION: ClassVar[int] = 1

    def body(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, version: int, data: bytes) -> MsixMappableCap:
        return cls()


@dataclass(frozen=True)
class RawCap:
    """A capability this module does not interpret; ``data`` runs to the next one."""

    id: int
    version: int
    data: bytes

    def body(self) -> bytes:
        return self.data


RegionCap = SparseMmapCap | RegionTypeCap | MsixMappableCap | RawCap
_CAP_TYPES: dict[int, type[SparseMmapCap] | type[RegionTypeCap] | type[MsixMappableCap]] = {
    c.ID: c for c in (SparseMmapCap, RegionTypeCap, MsixMappableCap)
}


def _cap_id(cap: RegionCap) -> tuple[int, int]:
    if isinstance(cap, RawCap):
        return cap.id, cap.version
    return cap.ID, cap.VERSION


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def caps_size(caps: Iterable[RegionCap]) -> int:
    """Bytes a capability chain takes (each entry padded to 8 bytes)."""
    return sum(_pad8(_CAP_HEADER.size + len(c.body())) for c in caps)


@dataclass(frozen=True)
class RegionInfo:
    """struct vfio_region_info, plus the capability chain in a reply.

    In a request only ``argsz`` (the room for the reply) and ``index`` are set. A reply's
    ``argsz`` is the size the full answer needs; when that is more than the request's
    ``argsz`` the chain is left out (``caps == ()`` with the CAPS flag set) and the client
    asks again with a bigger ``argsz``. Use `RegionInfo.reply` to build one.
    """

    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int
    caps: tuple[RegionCap, ...] = ()
    HEAD: ClassVar[struct.Struct] = struct.Struct("<IIIIQQ")

    @classmethod
    def request(cls, index: int, argsz: int = 32) -> RegionInfo:
        return cls(argsz, 0, index, 0, 0, 0)

    @classmethod
    def reply(
        cls,
        index: int,
        flags: int,
        size: int,
        offset: int = 0,
        caps: tuple[RegionCap, ...] = (),
        max_argsz: int | None = None,
    ) -> RegionInfo:
        """The reply to a request whose argsz was ``max_argsz`` (unbounded if None).
        ``cap_offset`` stays 32 even when the chain does not fit: QEMU refuses a reply with
        the CAPS flag and a cap_offset outside [32, argsz]."""
        full = cls.HEAD.size + caps_size(caps)
        if caps:
            flags |= RegionFlag.CAPS
        fits = max_argsz is None or full <= max_argsz
        return cls(
            full, flags, index, cls.HEAD.size if caps else 0, size, offset, caps if fits else ()
        )

    @property
    def caps_left_out(self) -> bool:
        """The CAPS flag is set but the chain did not fit in the request's argsz."""
        return bool(self.flags & RegionFlag.CAPS) and not self.caps

    def pack(self) -> bytes:
        head = self.HEAD.pack(
            self.argsz, self.flags, self.index, self.cap_offset, self.size, self.offset
        )
        if not self.caps:
            return head
        if self.cap_offset < self.HEAD.size or self.cap_offset % 8:
            raise ValueError(f"cap_offset {self.cap_offset} must be >= 32 and 8-aligned")
        out = bytearray(head) + bytes(self.cap_offset - self.HEAD.size)
        for i, cap in enumerate(self.caps):
            body = cap.body()
            size = _pad8(_CAP_HEADER.size + len(body))
            nxt = 0 if i == len(self.caps) - 1 else len(out) + size
            cid, ver = _cap_id(cap)
            entry = _CAP_HEADER.pack(cid, ver, nxt) + body
            out += entry + bytes(size - len(entry))
        return bytes(out)

    @classmethod
    def unpack(cls, data: bytes) -> RegionInfo:
        _at_least(cls, data, cls.HEAD.size)
        argsz, flags, index, cap_offset, size, offset = cls.HEAD.unpack_from(data)
        if len(data) == cls.HEAD.size:
            return cls(argsz, flags, index, cap_offset, size, offset)
        if not flags & RegionFlag.CAPS:
            raise BadPayloadSize(f"region info of {len(data)} bytes without the CAPS flag")
        return cls(argsz, flags, index, cap_offset, size, offset, _parse_caps(data, cap_offset))


def _parse_caps(data: bytes, first: int) -> tuple[RegionCap, ...]:
    caps: list[RegionCap] = []
    pos = first
    lowest = RegionInfo.HEAD.size
    while True:
        if pos < lowest:
            raise BadPayload(f"capability at offset {pos} overlaps what precedes it")
        if pos + _CAP_HEADER.size > len(data):
            raise Truncated(f"capability header at offset {pos} beyond {len(data)} bytes")
        cid, version, nxt = _CAP_HEADER.unpack_from(data, pos)
        end = nxt if nxt else len(data)
        if nxt and nxt < pos + _CAP_HEADER.size:
            raise BadPayload(f"capability chain goes backwards ({pos} -> {nxt})")
        if end > len(data):
            raise Truncated(f"capability at {pos} runs to {end}, beyond {len(data)} bytes")
        body = bytes(data[pos + _CAP_HEADER.size : end])
        kind = _CAP_TYPES.get(cid)
        cap: RegionCap
        if kind is not None and version == kind.VERSION:
            cap = kind.parse(version, body)
        else:
            cap = RawCap(cid, version, body)
        caps.append(cap)
        if not nxt:
            return tuple(caps)
        lowest = pos + _CAP_HEADER.size
        pos = nxt
