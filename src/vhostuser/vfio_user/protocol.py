"""The vfio-user protocol (QEMU docs/interop/vfio-user.rst) with no I/O.

Every message is a 16-byte header followed by a command-specific payload::

    u16 msg_id | u16 command | u32 size (whole message, header included) | u32 flags | u32 error

A reader takes the header (with any fds), calls `decode_header`, reads `header.body_size`
more bytes and calls `decode_command` (a command from the peer) or `decode_reply` (the
answer to a command it sent). Both check the payload layout, the ``argsz`` rules, the
flags and the number of fds the command may carry, and raise a typed `VfioUserError`;
errors raised after the header was read carry it (``exc.header``) and an errno
(``exc.errno``) so that a server can answer with an error reply instead of hanging up.

Payloads are frozen dataclasses with ``pack()`` and ``unpack()``; all fields are host byte
order (x86-64: little-endian), as on the wire. Structures that come from
``<linux/vfio.h>`` (region info and its capability chain, irq info, irq set, device
feature) keep the kernel's layout.
"""

from __future__ import annotations

import errno as _errno
import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import IntEnum, IntFlag
from typing import ClassVar, Protocol

from ..protocol.errors import ProtocolError

# --------------------------------------------------------------------------- constants

HEADER_SIZE = 16
VERSION_MAJOR = 0  # what QEMU 10.1+ and libvfio-user speak
VERSION_MINOR = 0

#: Defaults of the VERSION capabilities, used when the peer leaves them out.
DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
DEFAULT_MAX_DMA_MAPS = 65535
DEFAULT_PGSIZES = 4096

#: QEMU never sends or accepts more than 16 fds in one message (VFIO_USER_MAX_MAX_FDS);
#: the spec itself sets no limit. A reader leaves room for this many.
MAX_MSG_FDS = 16
#: QEMU accepts max_data_xfer_size up to 64 MiB.
MAX_DATA_XFER_SIZE = 64 << 20
#: Room for the fixed part of the largest data-carrying payload plus data.
DATA_OVERHEAD = 64
#: Default bound on a whole message, checked by decode_header before a body is read.
DEFAULT_MAX_MESSAGE_SIZE = HEADER_SIZE + DATA_OVERHEAD + DEFAULT_MAX_DATA_XFER_SIZE + 65536


class Command(IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11  # server -> client
    DMA_WRITE = 12  # server -> client
    DEVICE_RESET = 13
    DIRTY_PAGES = 14  # dropped from the spec; still in QEMU's protocol.h
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class Peer(IntEnum):
    """Who sends a command."""

    CLIENT = 0  # the VMM (QEMU)
    SERVER = 1  # the device


class MsgType(IntEnum):
    COMMAND = 0
    REPLY = 1


class HeaderFlag(IntFlag):
    TYPE_MASK = 0xF
    NO_REPLY = 0x10
    ERROR = 0x20


# Plain ints: `~` on an IntFlag only complements the bits the flag defines.
KNOWN_HEADER_FLAGS = int(HeaderFlag.TYPE_MASK | HeaderFlag.NO_REPLY | HeaderFlag.ERROR)


class PciRegion(IntEnum):
    """VFIO_PCI_*_REGION_INDEX."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


PCI_NUM_REGIONS = 9


class PciIrq(IntEnum):
    """VFIO_PCI_*_IRQ_INDEX."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


PCI_NUM_IRQS = 5


class DeviceFlag(IntFlag):
    """VFIO_DEVICE_FLAGS_*."""

    RESET = 1 << 0
    PCI = 1 << 1
    PLATFORM = 1 << 2
    AMBA = 1 << 3
    CCW = 1 << 4
    AP = 1 << 5
    FSL_MC = 1 << 6
    CAPS = 1 << 7
    CDX = 1 << 8


class RegionFlag(IntFlag):
    """VFIO_REGION_INFO_FLAG_*."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class RegionCapId(IntEnum):
    """VFIO_REGION_INFO_CAP_*."""

    SPARSE_MMAP = 1
    TYPE = 2
    MSIX_MAPPABLE = 3
    NVLINK2_SSATGT = 4
    NVLINK2_LNKSPD = 5


class RegionType(IntEnum):
    """VFIO_REGION_TYPE_* (the ``type`` of a TYPE capability)."""

    GFX = 1
    CCW = 2
    MIGRATION_DEPRECATED = 3
    PCI_VENDOR_TYPE = 1 << 31  # or'ed with a 16-bit PCI vendor id


REGION_TYPE_PCI_VENDOR_MASK = 0xFFFF


class IrqInfoFlag(IntFlag):
    """VFIO_IRQ_INFO_*."""

    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlag(IntFlag):
    """VFIO_IRQ_SET_*: exactly one DATA_* and one ACTION_* bit."""

    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


IRQ_SET_DATA_MASK = IrqSetFlag.DATA_NONE | IrqSetFlag.DATA_BOOL | IrqSetFlag.DATA_EVENTFD
IRQ_SET_ACTION_MASK = IrqSetFlag.ACTION_MASK | IrqSetFlag.ACTION_UNMASK | IrqSetFlag.ACTION_TRIGGER


class DmaMapFlag(IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1


class DmaUnmapFlag(IntFlag):
    GET_DIRTY_BITMAP = 1 << 0  # from older spec versions: rejected by check_supported
    ALL = 1 << 1  # QEMU sends it (address 0, size 0) to drop every mapping


class DirtyPagesFlag(IntFlag):
    START = 1 << 0
    STOP = 1 << 1
    GET_BITMAP = 1 << 2


class IoFdType(IntEnum):
    IOEVENTFD = 0
    IOREGIONFD = 1


class DeviceFeatureFlag(IntFlag):
    GET = 1 << 16
    SET = 1 << 17
    PROBE = 1 << 18


DEVICE_FEATURE_MASK = 0xFFFF


class DeviceFeatureIndex(IntEnum):
    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8


class MigState(IntEnum):
    """vfio_device_mig_state."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


# --------------------------------------------------------------------------- errors


class VfioUserError(ProtocolError):
    """A message that breaks the vfio-user protocol.

    ``header`` is the offending message's header once it is known (so a server can send
    an error reply with the same msg_id); ``errno`` is what such a reply carries.
    """

    errno: int = _errno.EINVAL

    def __init__(self, message: str, header: Header | None = None) -> None:
        super().__init__(message)
        self.header = header


class Truncated(VfioUserError):
    """Fewer bytes than the header or the payload's fixed structure needs."""


class BadSize(VfioUserError):
    """The header's size field: below 16, above the limit, or not the bytes that came."""


class BadFlags(VfioUserError):
    """Unknown message type, reserved header bits, NO_REPLY on a reply, ERROR on a command."""


class UnknownCommand(VfioUserError):
    errno = _errno.ENOSYS


class WrongDirection(VfioUserError):
    """A server command (DMA_READ/WRITE) from the client, or a client command from the
    server."""

    errno = _errno.ENOSYS


class BadPayloadSize(VfioUserError):
    """The payload length does not fit the command (extra bytes, or data length not the
    count)."""


class BadArgsz(VfioUserError):
    """``argsz`` inconsistent with the payload (too small, or a reply bigger than it)."""


class BadPayload(VfioUserError):
    """Right size, wrong content: unknown flag bits, non-zero reserved fields, bad JSON,
    broken capability chain."""


class BadFdCount(VfioUserError):
    """The number of fds attached does not fit the command."""


class TransferTooLarge(VfioUserError):
    """A data count above the negotiated max_data_xfer_size."""

    errno = _errno.E2BIG


class Unsupported(VfioUserError):
    """Well-formed, but a feature this implementation refuses (see `check_supported`)."""

    errno = _errno.ENOTSUP


class UnexpectedReply(VfioUserError):
    """A reply where a command was expected, or the reverse, or a mismatched id/command."""


# --------------------------------------------------------------------------- payloads


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


class _Fixed:
    """Base for payloads with one fixed struct layout; fields in declaration order."""

    FMT: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        return self.FMT.pack(*self.__dict__.values())

    @classmethod
    def unpack(cls, data: bytes):  # type: ignore[no-untyped-def]
        _exact(cls, data, cls.FMT.size)
        return cls(*cls.FMT.unpack(data))


@dataclass(frozen=True)
class U64(_Fixed):
    value: int
    FMT: ClassVar[struct.Struct] = struct.Struct("=Q")


# ---- VERSION


@dataclass(frozen=True)
class TwinSocket:
    supported: bool = False
    fd_index: int | None = None  # only in a reply


@dataclass(frozen=True)
class MigrationCaps:
    """QEMU's "migration" capability object (not in the spec's table)."""

    pgsize: int | None = None
    max_bitmap_size: int | None = None


@dataclass(frozen=True)
class Limits:
    """Capabilities with the spec's defaults filled in."""

    max_msg_fds: int
    max_data_xfer_size: int
    max_dma_maps: int
    pgsizes: int
    write_multiple: bool
    twin_socket: bool


def _json_uint(where: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadPayload(f"VERSION: {where} must be a non-negative integer, got {value!r}")
    return value


def _json_bool(where: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise BadPayload(f"VERSION: {where} must be a boolean, got {value!r}")
    return value


def _json_obj(where: str, value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise BadPayload(f"VERSION: {where} must be an object, got {value!r}")
    return value


@dataclass(frozen=True)
class Capabilities:
    """The ``capabilities`` object of VERSION. None means "absent" (the default applies);
    unknown members are kept, as JSON text, in ``extra``."""

    max_msg_fds: int | None = None
    max_data_xfer_size: int | None = None
    max_dma_maps: int | None = None
    pgsizes: int | None = None
    twin_socket: TwinSocket | None = None
    write_multiple: bool | None = None
    migration: MigrationCaps | None = None
    extra: tuple[tuple[str, str], ...] = ()

    def limits(self) -> Limits:
        return Limits(
            max_msg_fds=_pick(self.max_msg_fds, DEFAULT_MAX_MSG_FDS),
            max_data_xfer_size=_pick(self.max_data_xfer_size, DEFAULT_MAX_DATA_XFER_SIZE),
            max_dma_maps=_pick(self.max_dma_maps, DEFAULT_MAX_DMA_MAPS),
            pgsizes=_pick(self.pgsizes, DEFAULT_PGSIZES),
            write_multiple=bool(self.write_multiple),
            twin_socket=bool(self.twin_socket and self.twin_socket.supported),
        )

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for name in ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes"):
            if (v := getattr(self, name)) is not None:
                out[name] = v
        if self.twin_socket is not None:
            twin: dict[str, object] = {"supported": self.twin_socket.supported}
            if self.twin_socket.fd_index is not None:
                twin["fd_index"] = self.twin_socket.fd_index
            out["twin_socket"] = twin
        if self.write_multiple is not None:
            out["write_multiple"] = self.write_multiple
        if self.migration is not None:
            mig: dict[str, object] = {}
            if self.migration.pgsize is not None:
                mig["pgsize"] = self.migration.pgsize
            if self.migration.max_bitmap_size is not None:
                mig["max_bitmap_size"] = self.migration.max_bitmap_size
            out["migration"] = mig
        for name, text in self.extra:
            out[name] = json.loads(text)
        return out

    @classmethod
    def from_json(cls, obj: object) -> Capabilities:
        caps = dict(_json_obj("capabilities", obj))
        kw: dict[str, object] = {}
        for name in ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes"):
            if name in caps:
                kw[name] = _json_uint(name, caps.pop(name))
        if "twin_socket" in caps:
            twin = dict(_json_obj("twin_socket", caps.pop("twin_socket")))
            supported = _json_bool("twin_socket.supported", twin.get("supported", False))
            fd_index = twin.get("fd_index")
            kw["twin_socket"] = TwinSocket(
                supported, None if fd_index is None else _json_uint("fd_index", fd_index)
            )
        if "write_multiple" in caps:
            kw["write_multiple"] = _json_bool("write_multiple", caps.pop("write_multiple"))
        if "migration" in caps:
            mig = _json_obj("migration", caps.pop("migration"))
            kw["migration"] = MigrationCaps(
                *(
                    None if mig.get(k) is None else _json_uint(f"migration.{k}", mig[k])
                    for k in ("pgsize", "max_bitmap_size")
                )
            )
        kw["extra"] = tuple((k, json.dumps(v, separators=(",", ":"))) for k, v in caps.items())
        return cls(**kw)  # type: ignore[arg-type]


def _pick(value: int | None, default: int) -> int:
    return default if value is None else value


@dataclass(frozen=True)
class Version:
    """VERSION request and reply: major, minor, then optional NUL-terminated JSON
    ``{"capabilities": {...}}``. ``capabilities`` None means no JSON at all (QEMU rejects
    such a reply: a server should always send at least ``Capabilities()``)."""

    major: int
    minor: int
    capabilities: Capabilities | None = None
    extra: tuple[tuple[str, str], ...] = ()  # unknown top-level members (JSON text)
    HEAD: ClassVar[struct.Struct] = struct.Struct("=HH")

    def json_text(self) -> str | None:
        if self.capabilities is None and not self.extra:
            return None
        obj: dict[str, object] = {}
        if self.capabilities is not None:
            obj["capabilities"] = self.capabilities.to_json()
        for name, text in self.extra:
            obj[name] = json.loads(text)
        return json.dumps(obj, separators=(",", ":"))

    def pack(self) -> bytes:
        text = self.json_text()
        data = b"" if text is None else text.encode() + b"\0"
        return self.HEAD.pack(self.major, self.minor) + data

    @classmethod
    def unpack(cls, data: bytes) -> Version:
        _at_least(cls, data, cls.HEAD.size)
        major, minor = cls.HEAD.unpack_from(data)
        raw = bytes(data[cls.HEAD.size :])
        if not raw:
            return cls(major, minor)
        if raw[-1] != 0:
            raise BadPayload("VERSION: capability data is not NUL-terminated")
        if 0 in raw[:-1]:
            raise BadPayload("VERSION: NUL byte inside the capability data")
        try:
            obj = json.loads(raw[:-1].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise BadPayload(f"VERSION: capability data is not UTF-8 JSON: {e}") from e
        top = dict(_json_obj("version data", obj))
        caps = Capabilities.from_json(top.pop("capabilities")) if "capabilities" in top else None
        extra = tuple((k, json.dumps(v, separators=(",", ":"))) for k, v in top.items())
        return cls(major, minor, caps, extra)


# ---- DMA_MAP / DMA_UNMAP


@dataclass(frozen=True)
class DmaMap(_Fixed):
    """DMA_MAP request; one fd (mappable) or none (use DMA_READ/WRITE). Reply: Empty."""

    argsz: int
    flags: int
    offset: int  # in the fd; 0 without one
    address: int
    size: int
    FMT: ClassVar[struct.Struct] = struct.Struct("=IIQQQ")

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
    FMT: ClassVar[struct.Struct] = struct.Struct("=QQ")


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
    HEAD: ClassVar[struct.Struct] = struct.Struct("=IIQQ")

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
    FMT: ClassVar[struct.Struct] = struct.Struct("=IIII")

    @classmethod
    def request(cls) -> DeviceInfo:
        return cls(cls.FMT.size, 0, 0, 0)

    @classmethod
    def reply(cls, flags: int, num_regions: int, num_irqs: int) -> DeviceInfo:
        return cls(cls.FMT.size, flags, num_regions, num_irqs)


# ---- DEVICE_GET_REGION_INFO and its capability chain


_CAP_HEADER = struct.Struct("=HHI")  # struct vfio_info_cap_header: id, version, next


@dataclass(frozen=True)
class SparseMmapCap:
    """VFIO_REGION_INFO_CAP_SPARSE_MMAP: the parts of the region that may be mmapped,
    as (offset, size) pairs relative to the region's mmap offset."""

    areas: tuple[tuple[int, int], ...]
    ID: ClassVar[int] = RegionCapId.SPARSE_MMAP
    VERSION: ClassVar[int] = 1
    HEAD: ClassVar[struct.Struct] = struct.Struct("=II")  # nr_areas, reserved
    AREA: ClassVar[struct.Struct] = struct.Struct("=QQ")

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
    FMT: ClassVar[struct.Struct] = struct.Struct("=II")

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
    HEAD: ClassVar[struct.Struct] = struct.Struct("=IIIIQQ")

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
    FMT: ClassVar[struct.Struct] = struct.Struct("=QQIII4xQ")


@dataclass(frozen=True)
class RegionIoFds:
    argsz: int
    flags: int
    index: int
    count: int
    subregions: tuple[IoFdSubRegion, ...] = ()
    HEAD: ClassVar[struct.Struct] = struct.Struct("=IIII")

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
    FMT: ClassVar[struct.Struct] = struct.Struct("=IIII")

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
    HEAD: ClassVar[struct.Struct] = struct.Struct("=IIIII")

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
    HEAD: ClassVar[struct.Struct] = struct.Struct("=QII")

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
    HEAD: ClassVar[struct.Struct] = struct.Struct("=QQ")

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
        return struct.pack("=QQ", self.address, self.count)

    @classmethod
    def unpack(cls, data: bytes) -> DmaWriteReply | Empty:
        if len(data) == 0:
            return Empty()
        if len(data) == 12:
            return cls(*struct.unpack("=QI", data))
        if len(data) == 16:
            return cls(*struct.unpack("=QQ", data))
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
    FMT: ClassVar[struct.Struct] = struct.Struct("=QQQQ")


@dataclass(frozen=True)
class DirtyPages:
    """DIRTY_PAGES (command 14, no longer in the spec): START, STOP or GET_BITMAP (with a
    range; the reply appends the bitmap)."""

    argsz: int
    flags: int
    range: BitmapRange | None = None
    data: bytes = b""
    HEAD: ClassVar[struct.Struct] = struct.Struct("=II")

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
    FMT: ClassVar[struct.Struct] = struct.Struct("=QII8s")

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
    HEAD: ClassVar[struct.Struct] = struct.Struct("=Q")

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
    HEAD: ClassVar[struct.Struct] = struct.Struct("=II")

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
    HEAD: ClassVar[struct.Struct] = struct.Struct("=II")

    def pack(self) -> bytes:
        return self.HEAD.pack(self.argsz, self.size) + self.data

    @classmethod
    def unpack(cls, data: bytes) -> MigData:
        _at_least(cls, data, cls.HEAD.size)
        return cls(*cls.HEAD.unpack_from(data), bytes(data[cls.HEAD.size :]))  # type: ignore[call-arg]


# --------------------------------------------------------------------------- header


_HEADER = struct.Struct("=HHIII")


@dataclass(frozen=True)
class Header:
    msg_id: int
    command: int
    size: int  # the whole message, header included
    flags: int
    error: int = 0

    @property
    def body_size(self) -> int:
        return self.size - HEADER_SIZE

    @property
    def is_reply(self) -> bool:
        return self.flags & HeaderFlag.TYPE_MASK == MsgType.REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & HeaderFlag.ERROR)

    def pack(self) -> bytes:
        return _HEADER.pack(self.msg_id, self.command, self.size, self.flags, self.error)


def command_name(cmd: int) -> str:
    try:
        return Command(cmd).name
    except ValueError:
        return f"command {cmd}"


def decode_header(data: bytes | memoryview, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Header:
    """Validate the 16-byte header. ``max_size`` bounds the whole message (see
    `max_message_size`)."""
    if len(data) < HEADER_SIZE:
        raise Truncated(f"truncated header: {len(data)} of {HEADER_SIZE} bytes")
    if len(data) > HEADER_SIZE:
        raise BadSize(f"header must be {HEADER_SIZE} bytes, got {len(data)}")
    h = Header(*_HEADER.unpack(data))
    what = f"{command_name(h.command)} (id {h.msg_id})"
    if h.size < HEADER_SIZE:
        raise BadSize(f"{what}: message size {h.size} is smaller than the header", h)
    if h.size > max_size:
        raise BadSize(f"{what}: message size {h.size} exceeds {max_size}", h)
    kind = h.flags & HeaderFlag.TYPE_MASK
    if kind not in (MsgType.COMMAND, MsgType.REPLY):
        raise BadFlags(f"{what}: unknown message type {kind} (flags {h.flags:#x})", h)
    if h.flags & ~KNOWN_HEADER_FLAGS:
        raise BadFlags(f"{what}: reserved header flags set: {h.flags & ~KNOWN_HEADER_FLAGS:#x}", h)
    if kind == MsgType.REPLY and h.flags & HeaderFlag.NO_REPLY:
        raise BadFlags(f"{what}: NO_REPLY set on a reply", h)
    if kind == MsgType.COMMAND and h.flags & HeaderFlag.ERROR:
        raise BadFlags(f"{what}: ERROR set on a command", h)
    return h


def max_message_size(max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE) -> int:
    """A bound on any message when data transfers are at most ``max_data_xfer_size``."""
    return HEADER_SIZE + DATA_OVERHEAD + max_data_xfer_size + 65536


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Message:
    msg_id: int
    command: int
    payload: Payload
    flags: int = MsgType.COMMAND
    error: int = 0  # errno of an error reply

    @property
    def is_reply(self) -> bool:
        return self.flags & HeaderFlag.TYPE_MASK == MsgType.REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & HeaderFlag.ERROR)

    @property
    def name(self) -> str:
        return command_name(self.command)


def encode(msg: Message) -> bytes:
    body = msg.payload.pack()
    if msg.is_error and body:
        raise ValueError("an error reply carries no payload")
    return (
        _HEADER.pack(msg.msg_id, msg.command, HEADER_SIZE + len(body), msg.flags, msg.error) + body
    )


def command(
    cmd: int, payload: Payload | None = None, msg_id: int = 0, no_reply: bool = False
) -> Message:
    flags = MsgType.COMMAND | (HeaderFlag.NO_REPLY if no_reply else 0)
    return Message(msg_id, cmd, payload if payload is not None else Empty(), flags)


def reply_to(request: Message | Header, payload: Payload | None = None) -> Message:
    return Message(
        request.msg_id, request.command, payload if payload is not None else Empty(), MsgType.REPLY
    )


def error_reply(request: Message | Header, errno: int) -> Message:
    """The reply that fails ``request`` with a (positive) errno; header only."""
    return Message(
        request.msg_id, request.command, Empty(), MsgType.REPLY | HeaderFlag.ERROR, errno
    )


# --------------------------------------------------------------------------- specs

# A validator checks a decoded payload against the command's rules and the fd count;
# it raises VfioUserError. `limit` is the max_data_xfer_size in force (None: unchecked).
Check = Callable[[object, int, "int | None"], None]


@dataclass(frozen=True)
class Spec:
    sender: Peer
    request: Callable[[bytes], object]
    reply: Callable[[bytes], object]
    check_request: Check
    check_reply: Check


def _want_fds(what: str, nfds: int, *allowed: int) -> None:
    if nfds not in allowed:
        raise BadFdCount(f"{what} carries {nfds} fds, expected {' or '.join(map(str, allowed))}")


def _no_fds(what: str) -> Check:
    def check(p: object, nfds: int, limit: int | None) -> None:
        _want_fds(what, nfds, 0)

    return check


def _known_bits(what: str, flags: int, known: int) -> None:
    unknown = int(flags) & ~int(known)
    if unknown:
        raise BadPayload(f"{what}: unknown flag bits {unknown:#x}")


def _argsz_min(what: str, argsz: int, minimum: int) -> None:
    if argsz < minimum:
        raise BadArgsz(f"{what}: argsz {argsz} is below {minimum}")


def _argsz_covers(what: str, argsz: int, length: int) -> None:
    """A reply's argsz is the size of the full answer: never less than what was sent."""
    if argsz < length:
        raise BadArgsz(f"{what}: {length} bytes sent but argsz {argsz}")


def _xfer(what: str, count: int, limit: int | None) -> None:
    if limit is not None and count > limit:
        raise TransferTooLarge(f"{what}: count {count} exceeds max_data_xfer_size {limit}")


def _data_len(what: str, count: int, data: bytes) -> None:
    if len(data) != count:
        cls = Truncated if len(data) < count else BadPayloadSize
        raise cls(f"{what}: count {count} but {len(data)} data bytes")


def _zero(what: str, **fields: int) -> None:
    bad = {k: v for k, v in fields.items() if v}
    if bad:
        raise BadPayload(
            f"{what}: must be zero in a request: " + ", ".join(f"{k}={v}" for k, v in bad.items())
        )


# ---- per-command checks


def _version_reply(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, Version)
    twin = p.capabilities.twin_socket if p.capabilities else None
    if twin is not None and twin.supported and twin.fd_index is not None:
        if twin.fd_index >= nfds:
            raise BadFdCount(
                f"VERSION reply: twin_socket.fd_index {twin.fd_index} but {nfds} fds attached"
            )
    else:
        _want_fds("VERSION reply", nfds, 0)


def _version_request(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, Version)
    _want_fds("VERSION", nfds, 0)
    twin = p.capabilities.twin_socket if p.capabilities else None
    if twin is not None and twin.fd_index is not None:
        raise BadPayload("VERSION: twin_socket.fd_index is only valid in a reply")


def _dma_map(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, DmaMap)
    if p.argsz != DmaMap.FMT.size:
        raise BadArgsz(f"DMA_MAP: argsz {p.argsz}, must be {DmaMap.FMT.size}")
    _known_bits("DMA_MAP", p.flags, DmaMapFlag.READ | DmaMapFlag.WRITE)
    _want_fds("DMA_MAP", nfds, 0, 1)
    if nfds == 0 and p.offset:
        raise BadPayload(f"DMA_MAP: offset {p.offset:#x} without an fd (must be 0)")


def _dma_unmap(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, DmaUnmap)
    _want_fds("DMA_UNMAP", nfds, 0)
    _known_bits("DMA_UNMAP", p.flags, DmaUnmapFlag.GET_DIRTY_BITMAP | DmaUnmapFlag.ALL)
    if p.flags & DmaUnmapFlag.ALL and p.flags & DmaUnmapFlag.GET_DIRTY_BITMAP:
        raise BadPayload("DMA_UNMAP: ALL and GET_DIRTY_BITMAP together")
    if p.data:
        raise BadPayloadSize(f"DMA_UNMAP request carries {len(p.data)} bitmap bytes")
    need = DmaUnmap.HEAD.size
    if p.bitmap is not None:
        need += Bitmap.FMT.size + p.bitmap.size
    _argsz_min("DMA_UNMAP", p.argsz, need)


def _dma_unmap_reply(p: object, nfds: int, limit: int | None) -> None:
    _want_fds("DMA_UNMAP reply", nfds, 0)
    if isinstance(p, DmaUnmap) and p.bitmap is not None:
        _data_len("DMA_UNMAP reply bitmap", p.bitmap.size, p.data)


def _device_info(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, DeviceInfo)
    _want_fds("DEVICE_GET_INFO", nfds, 0)
    _argsz_min("DEVICE_GET_INFO", p.argsz, DeviceInfo.FMT.size)
    _zero("DEVICE_GET_INFO", flags=p.flags, num_regions=p.num_regions, num_irqs=p.num_irqs)


def _device_info_reply(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, DeviceInfo)
    _want_fds("DEVICE_GET_INFO reply", nfds, 0)


def _region_info(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, RegionInfo)
    _want_fds("DEVICE_GET_REGION_INFO", nfds, 0)
    if p.caps:
        raise BadPayloadSize("DEVICE_GET_REGION_INFO request carries capabilities")
    _argsz_min("DEVICE_GET_REGION_INFO", p.argsz, RegionInfo.HEAD.size)
    _zero(
        "DEVICE_GET_REGION_INFO",
        flags=p.flags,
        cap_offset=p.cap_offset,
        size=p.size,
        offset=p.offset,
    )


def _region_info_reply(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, RegionInfo)
    what = f"DEVICE_GET_REGION_INFO reply (region {p.index})"
    _want_fds(what, nfds, 0, 1)
    _known_bits(
        what, p.flags, RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP | RegionFlag.CAPS
    )
    if p.flags & RegionFlag.CAPS and not p.caps and p.argsz <= RegionInfo.HEAD.size:
        raise BadArgsz(f"{what}: CAPS flag but argsz {p.argsz} leaves no room for them")
    if nfds and not p.flags & RegionFlag.MMAP:
        raise BadFdCount(f"{what}: an fd without the MMAP flag")


def _io_fds(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, RegionIoFds)
    _want_fds("DEVICE_GET_REGION_IO_FDS", nfds, 0)
    if p.subregions:
        raise BadPayloadSize("DEVICE_GET_REGION_IO_FDS request carries sub-regions")
    _argsz_min("DEVICE_GET_REGION_IO_FDS", p.argsz, RegionIoFds.HEAD.size)
    _zero("DEVICE_GET_REGION_IO_FDS", flags=p.flags, count=p.count)


def _io_fds_reply(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, RegionIoFds)
    what = "DEVICE_GET_REGION_IO_FDS reply"
    if p.flags:
        raise BadPayload(f"{what}: flags {p.flags:#x} must be zero")
    if not p.subregions:
        _want_fds(what, nfds, 0)
        return
    if nfds == 0:
        raise BadFdCount(f"{what}: {p.count} sub-regions but no fd")
    for s in p.subregions:
        if s.fd_index >= nfds:
            raise BadFdCount(f"{what}: fd_index {s.fd_index} but {nfds} fds attached")
        if s.type not in (IoFdType.IOEVENTFD, IoFdType.IOREGIONFD):
            raise BadPayload(f"{what}: unknown sub-region type {s.type}")


def _irq_info(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, IrqInfo)
    _want_fds("DEVICE_GET_IRQ_INFO", nfds, 0)
    _argsz_min("DEVICE_GET_IRQ_INFO", p.argsz, IrqInfo.FMT.size)
    _zero("DEVICE_GET_IRQ_INFO", flags=p.flags, count=p.count)


def _irq_info_reply(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, IrqInfo)
    _want_fds("DEVICE_GET_IRQ_INFO reply", nfds, 0)
    _known_bits(
        "DEVICE_GET_IRQ_INFO reply",
        p.flags,
        IrqInfoFlag.EVENTFD | IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED | IrqInfoFlag.NORESIZE,
    )


def _set_irqs(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, IrqSet)
    what = f"DEVICE_SET_IRQS (index {p.index})"
    _known_bits(what, p.flags, IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK)
    data, action = p.flags & IRQ_SET_DATA_MASK, p.flags & IRQ_SET_ACTION_MASK
    if data.bit_count() != 1 or action.bit_count() != 1:
        raise BadPayload(f"{what}: flags {p.flags:#x} need one DATA_* and one ACTION_* bit")
    length = IrqSet.HEAD.size + len(p.data)
    if p.argsz != length:
        raise BadArgsz(f"{what}: argsz {p.argsz} but payload is {length} bytes")
    if data == IrqSetFlag.DATA_BOOL:
        _data_len(what, p.count, p.data)
    elif p.data and not (data == IrqSetFlag.DATA_EVENTFD and len(p.data) == 4 * p.count):
        raise BadPayloadSize(f"{what}: {len(p.data)} data bytes with flags {p.flags:#x}")
    if data == IrqSetFlag.DATA_EVENTFD:
        _want_fds(what, nfds, *sorted({0, p.count}))
    else:
        _want_fds(what, nfds, 0)


def _region_read(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, RegionAccess)
    _want_fds("REGION_READ", nfds, 0)
    if p.data:
        raise BadPayloadSize(f"REGION_READ request carries {len(p.data)} data bytes")
    _xfer("REGION_READ", p.count, limit)


def _region_read_reply(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, RegionAccess)
    _want_fds("REGION_READ reply", nfds, 0)
    _data_len("REGION_READ reply", p.count, p.data)
    _xfer("REGION_READ reply", p.count, limit)


def _region_write(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, RegionAccess)
    _want_fds("REGION_WRITE", nfds, 0)
    _xfer("REGION_WRITE", p.count, limit)
    _data_len("REGION_WRITE", p.count, p.data)


def _region_write_reply(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, RegionAccess)
    _want_fds("REGION_WRITE reply", nfds, 0)
    if p.data:
        raise BadPayloadSize(f"REGION_WRITE reply carries {len(p.data)} data bytes")


def _dma_read(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, DmaAccess)
    _want_fds("DMA_READ", nfds, 0)
    if p.data:
        raise BadPayloadSize(f"DMA_READ request carries {len(p.data)} data bytes")
    _xfer("DMA_READ", p.count, limit)


def _dma_read_reply(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, DmaAccess)
    _want_fds("DMA_READ reply", nfds, 0)
    _data_len("DMA_READ reply", p.count, p.data)


def _dma_write(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, DmaAccess)
    _want_fds("DMA_WRITE", nfds, 0)
    _xfer("DMA_WRITE", p.count, limit)
    _data_len("DMA_WRITE", p.count, p.data)


def _dirty_pages(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, DirtyPages)
    _want_fds("DIRTY_PAGES", nfds, 0)
    op = p.flags & (DirtyPagesFlag.START | DirtyPagesFlag.STOP | DirtyPagesFlag.GET_BITMAP)
    _known_bits("DIRTY_PAGES", p.flags, op)
    if op.bit_count() != 1:
        raise BadPayload(f"DIRTY_PAGES: flags {p.flags:#x} need exactly one operation")
    if p.data:
        raise BadPayloadSize(f"DIRTY_PAGES request carries {len(p.data)} bitmap bytes")
    need = DirtyPages.HEAD.size
    if p.range is not None:
        need += BitmapRange.FMT.size + p.range.bitmap_size
    _argsz_min("DIRTY_PAGES", p.argsz, need)


def _dirty_pages_reply(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, DirtyPages)
    _want_fds("DIRTY_PAGES reply", nfds, 0)
    if p.range is not None:
        _data_len("DIRTY_PAGES reply bitmap", p.range.bitmap_size, p.data)


def _write_multi(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, RegionWriteMulti)
    _want_fds("REGION_WRITE_MULTI", nfds, 0)
    if not p.writes:
        raise BadPayload("REGION_WRITE_MULTI with no writes")


def _device_feature(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, DeviceFeature)
    what = f"DEVICE_FEATURE (feature {p.feature})"
    _want_fds(what, nfds, 0)
    op = DeviceFeatureFlag.GET | DeviceFeatureFlag.SET | DeviceFeatureFlag.PROBE
    _known_bits(what, p.flags, op | DEVICE_FEATURE_MASK)
    if not p.flags & op:
        raise BadPayload(f"{what}: none of GET, SET, PROBE")
    both = DeviceFeatureFlag.GET | DeviceFeatureFlag.SET
    if p.flags & both == both and not p.flags & DeviceFeatureFlag.PROBE:
        raise BadPayload(f"{what}: GET and SET together without PROBE")
    _argsz_min(what, p.argsz, DeviceFeature.HEAD.size)


def _device_feature_reply(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, DeviceFeature)
    _want_fds("DEVICE_FEATURE reply", nfds, 0)


def _mig_read(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, MigData)
    _want_fds("MIG_DATA_READ", nfds, 0)
    if p.data:
        raise BadPayloadSize(f"MIG_DATA_READ request carries {len(p.data)} data bytes")
    _xfer("MIG_DATA_READ", p.size, limit)
    _argsz_min("MIG_DATA_READ", p.argsz, MigData.HEAD.size + p.size)


def _mig_read_reply(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, MigData)
    _want_fds("MIG_DATA_READ reply", nfds, 0)
    _data_len("MIG_DATA_READ reply", p.size, p.data)


def _mig_write(p: object, nfds: int, limit: int | None) -> None:
    assert isinstance(p, MigData)
    _want_fds("MIG_DATA_WRITE", nfds, 0)
    _xfer("MIG_DATA_WRITE", p.size, limit)
    _data_len("MIG_DATA_WRITE", p.size, p.data)
    _argsz_min("MIG_DATA_WRITE", p.argsz, MigData.HEAD.size)


def _unmap_reply(data: bytes) -> Empty | DmaUnmap:
    return Empty() if not data else DmaUnmap.unpack(data)


C, S = Peer.CLIENT, Peer.SERVER
SPECS: dict[int, Spec] = {
    Command.VERSION: Spec(C, Version.unpack, Version.unpack, _version_request, _version_reply),
    Command.DMA_MAP: Spec(C, DmaMap.unpack, Empty.unpack, _dma_map, _no_fds("DMA_MAP reply")),
    Command.DMA_UNMAP: Spec(C, DmaUnmap.unpack, _unmap_reply, _dma_unmap, _dma_unmap_reply),
    Command.DEVICE_GET_INFO: Spec(
        C, DeviceInfo.unpack, DeviceInfo.unpack, _device_info, _device_info_reply
    ),
    Command.DEVICE_GET_REGION_INFO: Spec(
        C, RegionInfo.unpack, RegionInfo.unpack, _region_info, _region_info_reply
    ),
    Command.DEVICE_GET_REGION_IO_FDS: Spec(
        C, RegionIoFds.unpack, RegionIoFds.unpack, _io_fds, _io_fds_reply
    ),
    Command.DEVICE_GET_IRQ_INFO: Spec(
        C, IrqInfo.unpack, IrqInfo.unpack, _irq_info, _irq_info_reply
    ),
    Command.DEVICE_SET_IRQS: Spec(
        C, IrqSet.unpack, Empty.unpack, _set_irqs, _no_fds("DEVICE_SET_IRQS reply")
    ),
    Command.REGION_READ: Spec(
        C, RegionAccess.unpack, RegionAccess.unpack, _region_read, _region_read_reply
    ),
    Command.REGION_WRITE: Spec(
        C, RegionAccess.unpack, RegionAccess.unpack, _region_write, _region_write_reply
    ),
    Command.DMA_READ: Spec(S, DmaAccess.unpack, DmaAccess.unpack, _dma_read, _dma_read_reply),
    Command.DMA_WRITE: Spec(
        S, DmaAccess.unpack, DmaWriteReply.unpack, _dma_write, _no_fds("DMA_WRITE reply")
    ),
    Command.DEVICE_RESET: Spec(
        C, Empty.unpack, Empty.unpack, _no_fds("DEVICE_RESET"), _no_fds("DEVICE_RESET reply")
    ),
    Command.DIRTY_PAGES: Spec(
        C, DirtyPages.unpack, DirtyPages.unpack, _dirty_pages, _dirty_pages_reply
    ),
    Command.REGION_WRITE_MULTI: Spec(
        C, RegionWriteMulti.unpack, U64.unpack, _write_multi, _no_fds("REGION_WRITE_MULTI reply")
    ),
    Command.DEVICE_FEATURE: Spec(
        C, DeviceFeature.unpack, DeviceFeature.unpack, _device_feature, _device_feature_reply
    ),
    Command.MIG_DATA_READ: Spec(C, MigData.unpack, MigData.unpack, _mig_read, _mig_read_reply),
    Command.MIG_DATA_WRITE: Spec(
        C, MigData.unpack, Empty.unpack, _mig_write, _no_fds("MIG_DATA_WRITE reply")
    ),
}


def _attach(e: VfioUserError, header: Header) -> VfioUserError:
    if e.header is None:
        e.header = header
    return e


def _body(header: Header, body: bytes | memoryview, what: str) -> None:
    if len(body) != header.body_size:
        raise BadSize(
            f"{what}: header says {header.size} bytes, got {HEADER_SIZE + len(body)}", header
        )


def decode_command(
    header: Header,
    body: bytes | memoryview,
    nfds: int = 0,
    *,
    sender: Peer = Peer.CLIENT,
    max_data_xfer_size: int | None = None,
) -> Message:
    """Validate and decode a command sent by ``sender`` (CLIENT: what a device server
    receives; SERVER: DMA_READ/WRITE, what a client receives). ``max_data_xfer_size`` is
    the receiver's advertised limit on data counts (None: not checked)."""
    what = f"{command_name(header.command)} (id {header.msg_id})"
    if header.is_reply:
        raise UnexpectedReply(f"{what}: a reply where a command was expected", header)
    _body(header, body, what)
    spec = SPECS.get(header.command)
    if spec is None:
        raise UnknownCommand(f"unknown command {header.command} (id {header.msg_id})", header)
    if spec.sender is not sender:
        raise WrongDirection(
            f"{what} is sent by the {spec.sender.name.lower()}, not the {sender.name.lower()}",
            header,
        )
    try:
        payload = spec.request(bytes(body))
        spec.check_request(payload, nfds, max_data_xfer_size)
    except VfioUserError as e:
        raise _attach(e, header) from None
    return Message(header.msg_id, header.command, payload, header.flags)  # type: ignore[arg-type]


def decode_reply(
    header: Header,
    body: bytes | memoryview,
    nfds: int = 0,
    *,
    request: Message | Header | None = None,
    command: int | None = None,
    max_data_xfer_size: int | None = None,
) -> Message:
    """Validate and decode a reply. Give the ``request`` it answers (its command and
    msg_id must match) or just the expected ``command``. An error reply decodes to a
    Message with ``is_error`` and ``error`` (errno) and an `Empty` payload."""
    expected = request.command if request is not None else command
    what = f"{command_name(header.command)} reply (id {header.msg_id})"
    if not header.is_reply:
        raise UnexpectedReply(f"{what}: a command where a reply was expected", header)
    if expected is not None and header.command != expected:
        raise UnexpectedReply(f"{what}: expected a reply to {command_name(expected)}", header)
    if request is not None and header.msg_id != request.msg_id:
        raise UnexpectedReply(f"{what}: expected msg_id {request.msg_id}", header)
    _body(header, body, what)
    spec = SPECS.get(header.command)
    if spec is None:
        raise UnknownCommand(f"reply to unknown command {header.command}", header)
    if header.is_error:
        if body:
            raise BadPayloadSize(f"{what}: error reply with {len(body)} payload bytes", header)
        if nfds:
            raise BadFdCount(f"{what}: error reply with {nfds} fds", header)
        return Message(header.msg_id, header.command, Empty(), header.flags, header.error)
    try:
        payload = spec.reply(bytes(body))
        if isinstance(argsz := getattr(payload, "argsz", None), int):
            _argsz_covers(what, argsz, len(body))
        spec.check_reply(payload, nfds, max_data_xfer_size)
    except VfioUserError as e:
        raise _attach(e, header) from None
    return Message(header.msg_id, header.command, payload, header.flags)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- policy helpers


def check_supported(msg: Message, refuse: Iterable[int] = ()) -> None:
    """Raise `Unsupported` (errno ENOTSUP) for what this project does not implement:
    dirty-page logging (DIRTY_PAGES, DMA_UNMAP with GET_DIRTY_BITMAP), migration
    (DEVICE_FEATURE, MIG_DATA_READ/WRITE), and any command listed in ``refuse``."""
    header = Header(msg.msg_id, msg.command, HEADER_SIZE, msg.flags)
    name = command_name(msg.command)
    if msg.command in (
        Command.DIRTY_PAGES,
        Command.DEVICE_FEATURE,
        Command.MIG_DATA_READ,
        Command.MIG_DATA_WRITE,
    ) or msg.command in set(refuse):
        raise Unsupported(f"{name} is not supported", header)
    if isinstance(msg.payload, DmaUnmap) and msg.payload.flags & DmaUnmapFlag.GET_DIRTY_BITMAP:
        raise Unsupported("DMA_UNMAP with GET_DIRTY_BITMAP is not supported", header)


def negotiate_version(
    proposal: Version, caps: Capabilities, *, major: int = VERSION_MAJOR, minor: int = VERSION_MINOR
) -> Version:
    """The server's VERSION reply to ``proposal``: same major (else `Unsupported`: the
    spec says the server closes the connection), the lower minor, and the members of
    ``caps`` that the client proposed too (the reply must be a subset). Twin-socket mode
    is only kept if the client supports it. Always carries a capabilities object."""
    if proposal.major != major:
        raise Unsupported(f"VERSION: client major {proposal.major}, server speaks {major}")
    offered = proposal.capabilities or Capabilities()
    kept: dict[str, object] = {}
    for name in (
        "max_msg_fds",
        "max_data_xfer_size",
        "max_dma_maps",
        "pgsizes",
        "write_multiple",
        "migration",
    ):
        if getattr(offered, name) is not None and getattr(caps, name) is not None:
            kept[name] = getattr(caps, name)
    if kept.get("write_multiple") and not offered.write_multiple:
        kept["write_multiple"] = False
    if caps.twin_socket is not None and offered.twin_socket and offered.twin_socket.supported:
        kept["twin_socket"] = caps.twin_socket
    return Version(major, min(minor, proposal.minor), replace(Capabilities(), **kept))  # type: ignore[arg-type]
