"""What each command may carry: a `Spec` per command (who sends it, how its request and
reply payloads unpack, and the validators for argsz, flags, reserved fields, data counts
and the number of fds), collected in `SPECS`. The validators raise `VfioUserError`
subclasses; `codec` runs them when it decodes a message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .constants import (
    DEVICE_FEATURE_MASK,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_DATA_MASK,
    Command,
    DeviceFeatureFlag,
    DirtyPagesFlag,
    DmaMapFlag,
    DmaUnmapFlag,
    IoFdType,
    IrqInfoFlag,
    IrqSetFlag,
    Peer,
    RegionFlag,
)
from .errors import (
    BadArgsz,
    BadFdCount,
    BadPayload,
    BadPayloadSize,
    TransferTooLarge,
    Truncated,
)
from .payloads import (
    U64,
    Bitmap,
    BitmapRange,
    DeviceFeature,
    DeviceInfo,
    DirtyPages,
    DmaAccess,
    DmaMap,
    DmaUnmap,
    DmaWriteReply,
    Empty,
    IrqInfo,
    IrqSet,
    MigData,
    RegionAccess,
    RegionIoFds,
    RegionWriteMulti,
)
from .region_info import RegionInfo
from .version import Version

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
