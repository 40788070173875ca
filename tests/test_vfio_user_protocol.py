"""The vfio-user protocol layer: every command and reply round-trips, every error class is
raised where it should be, and bytes recorded from QEMU 11.1 and libvfio-user decode."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from vhostuser.vfio_user import protocol as p
from vhostuser.vfio_user.protocol import Command as Cmd
from vhostuser.vfio_user.socket import PeerClosed, VfioUserChannel

# ----------------------------------------------------------------------------- helpers


def wire(msg: p.Message) -> tuple[p.Header, bytes]:
    data = p.encode(msg)
    return p.decode_header(data[:16]), data[16:]


def as_command(
    cmd: int, payload: object, nfds: int = 0, sender: p.Peer = p.Peer.CLIENT, **kw: object
) -> p.Message:
    header, body = wire(p.command(cmd, payload, msg_id=0x1234))  # type: ignore[arg-type]
    return p.decode_command(header, body, nfds, sender=sender, **kw)  # type: ignore[arg-type]


def as_reply(cmd: int, payload: object, nfds: int = 0, **kw: object) -> p.Message:
    request = p.command(cmd, None, msg_id=0x4321)
    header, body = wire(p.reply_to(request, payload))  # type: ignore[arg-type]
    return p.decode_reply(header, body, nfds, request=request, **kw)  # type: ignore[arg-type]


QEMU_CAPS = p.Capabilities(
    max_msg_fds=16,
    max_data_xfer_size=1 << 20,
    max_dma_maps=65535,
    pgsizes=4096,
    write_multiple=True,
    migration=p.MigrationCaps(pgsize=4096, max_bitmap_size=1 << 28),
)
SPARSE = p.SparseMmapCap(((0, 0x1000), (0x2000, 0x2000)))
RTYPE = p.RegionTypeCap(p.RegionType.PCI_VENDOR_TYPE | 0x1AF4, 1)
IOEVENT = p.IoFdSubRegion(0x3000, 4, 0, p.IoFdType.IOEVENTFD, 0, 0)
IOREGION = p.IoFdSubRegion(0x3004, 4, 1, p.IoFdType.IOREGIONFD, 0, 0xCAFE)
EV = p.IrqSetFlag.DATA_EVENTFD | p.IrqSetFlag.ACTION_TRIGGER
BOOL_MASK = p.IrqSetFlag.DATA_BOOL | p.IrqSetFlag.ACTION_MASK
ALL_OFF = p.IrqSetFlag.DATA_NONE | p.IrqSetFlag.ACTION_TRIGGER
GET = p.DeviceFeatureFlag.GET
SET = p.DeviceFeatureFlag.SET
PROBE = p.DeviceFeatureFlag.PROBE
MIGRATION = p.DeviceFeatureIndex.MIGRATION

# (command, request, request fds, reply, reply fds): at least one case per command.
CASES: list[tuple[int, object, int, object, int]] = [
    (Cmd.VERSION, p.Version(0, 0, QEMU_CAPS), 0,
     p.Version(0, 0, p.Capabilities(max_msg_fds=8, max_data_xfer_size=1 << 20)), 0),
    (Cmd.VERSION, p.Version(0, 0), 0, p.Version(0, 0, p.Capabilities()), 0),
    (Cmd.VERSION, p.Version(0, 1, p.Capabilities(twin_socket=p.TwinSocket(True))), 0,
     p.Version(0, 1, p.Capabilities(twin_socket=p.TwinSocket(True, 0))), 1),
    (Cmd.DMA_MAP, p.DmaMap.make(0x100000, 0xFF00000, offset=0x100000), 1, p.Empty(), 0),
    (Cmd.DMA_MAP, p.DmaMap.make(0xC0000, 0x20000, flags=p.DmaMapFlag.READ), 0, p.Empty(), 0),
    (Cmd.DMA_UNMAP, p.DmaUnmap.make(0x100000, 0xFF00000), 0, p.Empty(), 0),
    (Cmd.DMA_UNMAP, p.DmaUnmap.make(0, 0x10000000), 0, p.DmaUnmap.make(0, 0x10000000), 0),
    (Cmd.DMA_UNMAP, p.DmaUnmap.make(0, 0, p.DmaUnmapFlag.ALL), 0, p.Empty(), 0),
    (Cmd.DMA_UNMAP,
     p.DmaUnmap(48, p.DmaUnmapFlag.GET_DIRTY_BITMAP, 0, 0x40000, p.Bitmap(4096, 8)), 0,
     p.DmaUnmap(48, p.DmaUnmapFlag.GET_DIRTY_BITMAP, 0, 0x40000, p.Bitmap(4096, 8), b"\xff" * 8),
     0),
    (Cmd.DEVICE_GET_INFO, p.DeviceInfo.request(), 0,
     p.DeviceInfo.reply(p.DeviceFlag.PCI | p.DeviceFlag.RESET, 9, 5), 0),
    (Cmd.DEVICE_GET_REGION_INFO, p.RegionInfo.request(p.PciRegion.CONFIG), 0,
     p.RegionInfo.reply(7, p.RegionFlag.READ | p.RegionFlag.WRITE, 4096), 0),
    (Cmd.DEVICE_GET_REGION_INFO, p.RegionInfo.request(p.PciRegion.BAR0, 4096), 0,
     p.RegionInfo.reply(0, p.RegionFlag.READ | p.RegionFlag.WRITE | p.RegionFlag.MMAP,
                        0x4000, 0, (SPARSE, RTYPE, p.MsixMappableCap()), 4096), 1),
    (Cmd.DEVICE_GET_REGION_INFO, p.RegionInfo.request(p.PciRegion.BAR0), 0,
     p.RegionInfo.reply(0, p.RegionFlag.READ, 0x4000, 0, (SPARSE,), 32), 0),
    (Cmd.DEVICE_GET_REGION_IO_FDS, p.RegionIoFds.request(0, 256), 0,
     p.RegionIoFds(96, 0, 0, 2, (IOEVENT, IOREGION)), 2),
    (Cmd.DEVICE_GET_REGION_IO_FDS, p.RegionIoFds.request(0), 0, p.RegionIoFds(96, 0, 0, 2), 0),
    (Cmd.DEVICE_GET_IRQ_INFO, p.IrqInfo.request(p.PciIrq.MSIX), 0,
     p.IrqInfo.reply(p.PciIrq.MSIX, p.IrqInfoFlag.EVENTFD | p.IrqInfoFlag.NORESIZE, 2), 0),
    (Cmd.DEVICE_SET_IRQS, p.IrqSet.make(EV, p.PciIrq.MSIX, 0, 2), 2, p.Empty(), 0),
    (Cmd.DEVICE_SET_IRQS, p.IrqSet.make(EV, p.PciIrq.MSIX, 0, 2), 0, p.Empty(), 0),
    (Cmd.DEVICE_SET_IRQS, p.IrqSet.make(EV, p.PciIrq.MSIX, 0, 2, bytes(8)), 2, p.Empty(), 0),
    (Cmd.DEVICE_SET_IRQS, p.IrqSet.make(BOOL_MASK, 0, 0, 3, b"\1\0\1"), 0, p.Empty(), 0),
    (Cmd.DEVICE_SET_IRQS, p.IrqSet.make(ALL_OFF, p.PciIrq.INTX, 0, 0), 0, p.Empty(), 0),
    (Cmd.REGION_READ, p.RegionAccess(0x10, 7, 4), 0, p.RegionAccess(0x10, 7, 4, b"\1\2\3\4"), 0),
    (Cmd.REGION_WRITE, p.RegionAccess(0x30, 7, 4, b"\0\xf8\xff\xff"), 0,
     p.RegionAccess(0x30, 7, 4), 0),
    (Cmd.DMA_READ, p.DmaAccess(0x1000, 8), 0, p.DmaAccess(0x1000, 8, bytes(range(8))), 0),
    (Cmd.DMA_WRITE, p.DmaAccess(0x1000, 3, b"abc"), 0, p.DmaWriteReply(0x1000, 3), 0),
    (Cmd.DMA_WRITE, p.DmaAccess(0x1000, 3, b"abc"), 0, p.Empty(), 0),
    (Cmd.DEVICE_RESET, p.Empty(), 0, p.Empty(), 0),
    (Cmd.DIRTY_PAGES, p.DirtyPages(8, p.DirtyPagesFlag.START), 0,
     p.DirtyPages(8, p.DirtyPagesFlag.START), 0),
    (Cmd.DIRTY_PAGES,
     p.DirtyPages(48, p.DirtyPagesFlag.GET_BITMAP, p.BitmapRange(0, 0x8000, 4096, 8)), 0,
     p.DirtyPages(48, p.DirtyPagesFlag.GET_BITMAP, p.BitmapRange(0, 0x8000, 4096, 8),
                  b"\x01" + bytes(7)), 0),
    (Cmd.REGION_WRITE_MULTI,
     p.RegionWriteMulti((p.MultiWrite(0, 2, 1, b"\1"), p.MultiWrite(8, 2, 8, b"12345678"))), 0,
     p.U64(2), 0),
    (Cmd.DEVICE_FEATURE, p.DeviceFeature(16, GET | MIGRATION), 0,
     p.DeviceFeature(16, GET | MIGRATION, struct.pack("=Q", 1)), 0),
    (Cmd.DEVICE_FEATURE, p.DeviceFeature(8, PROBE | GET | SET | MIGRATION), 0,
     p.DeviceFeature(8, PROBE | GET | SET | MIGRATION), 0),
    (Cmd.MIG_DATA_READ, p.MigData(4104, 4096), 0, p.MigData(11, 3, b"xyz"), 0),
    (Cmd.MIG_DATA_WRITE, p.MigData(8, 3, b"xyz"), 0, p.Empty(), 0),
]  # fmt: skip


def _sender(cmd: int) -> p.Peer:
    return p.SPECS[cmd].sender


@pytest.mark.parametrize("case", CASES, ids=lambda c: p.Command(c[0]).name)
def test_round_trip(case: tuple[int, object, int, object, int]) -> None:
    cmd, req, nfds, rep, rfds = case
    msg = as_command(cmd, req, nfds, sender=_sender(cmd))
    assert msg.payload == req and msg.command == cmd and msg.msg_id == 0x1234
    assert not msg.is_reply and not msg.no_reply
    assert p.encode(msg) == p.encode(p.command(cmd, req, 0x1234))  # type: ignore[arg-type]
    back = as_reply(cmd, rep, rfds)
    assert back.payload == rep and back.is_reply and not back.is_error
    assert p.encode(back)[16:] == rep.pack()  # type: ignore[attr-defined]


def test_every_command_has_a_case() -> None:
    assert {c[0] for c in CASES} == set(p.SPECS) == set(p.Command)


def test_no_reply_flag_round_trips() -> None:
    w = p.RegionAccess(0, 2, 1, b"\1")
    header, body = wire(p.command(Cmd.REGION_WRITE, w, 5, no_reply=True))
    msg = p.decode_command(header, body)
    assert msg.no_reply and header.no_reply and header.flags == 0x10


@pytest.mark.parametrize("cmd", list(p.Command))
def test_error_reply_round_trip(cmd: int) -> None:
    request = p.command(cmd, None, msg_id=9)
    data = p.encode(p.error_reply(request, errno.ENOTSUP))
    assert data == struct.pack("=HHIII", 9, cmd, 16, 0x21, errno.ENOTSUP)
    msg = p.decode_reply(p.decode_header(data[:16]), b"", request=request)
    assert msg.is_error and msg.error == errno.ENOTSUP and msg.payload == p.Empty()


def test_region_info_caps_chain_layout() -> None:
    info = p.RegionInfo.reply(0, p.RegionFlag.MMAP, 0x4000, 0, (SPARSE, RTYPE))
    data = info.pack()
    assert info.flags & p.RegionFlag.CAPS and info.cap_offset == 32
    assert info.argsz == len(data) == 32 + (8 + 8 + 32) + (8 + 8)
    cid, ver, nxt = struct.unpack_from("=HHI", data, 32)
    assert (cid, ver, nxt) == (p.RegionCapId.SPARSE_MMAP, 1, 80)
    assert struct.unpack_from("=HHIII", data, 80) == (p.RegionCapId.TYPE, 1, 0, RTYPE.type, 1)
    raw = p.RawCap(77, 3, b"12345678")
    assert p.RegionInfo.unpack(p.RegionInfo.reply(0, 0, 1, caps=(raw,)).pack()).caps == (raw,)


def test_region_info_caps_left_out_when_argsz_too_small() -> None:
    info = p.RegionInfo.reply(0, p.RegionFlag.READ, 0x4000, 0, (SPARSE,), max_argsz=32)
    assert info.caps == () and info.caps_left_out and info.argsz == 80
    assert info.cap_offset == 32  # QEMU rejects CAPS with a cap_offset outside [32, argsz]
    assert len(info.pack()) == 32


# ----------------------------------------------------------------------------- real bytes

QEMU_VERSION = (
    b"\x00\x00\x01\x00\xd6\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
    b'"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, '
    b'"pgsize": 4096}, "write_multiple": true}}\x00'
)
LIBVFIO_USER_VERSION_REPLY = (
    b"\x00\x00\x01\x00}\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    b'{ "capabilities": { "max_msg_fds": 8, "max_data_xfer_size": 1048576, '
    b'"migration": { "pgsize": 4096 } } }\x00'
)
QEMU_SET_IRQS = bytes.fromhex(
    "170008002400000000000000000000001400000024000000" + "00" * 8 + "01000000"
)
QEMU_REGION_WRITE = bytes.fromhex(
    "11000a002400000000000000000000003000000000000000070000000400000000f8ffff"
)


def test_qemu_version_proposal_decodes() -> None:
    header = p.decode_header(QEMU_VERSION[:16])
    assert header == p.Header(0, Cmd.VERSION, 214, 0, 0)
    msg = p.decode_command(header, QEMU_VERSION[16:])
    assert msg.payload == p.Version(0, 0, QEMU_CAPS)
    reply = p.decode_reply(
        p.decode_header(LIBVFIO_USER_VERSION_REPLY[:16]), LIBVFIO_USER_VERSION_REPLY[16:],
        request=msg,
    )  # fmt: skip
    caps = reply.payload.capabilities  # type: ignore[attr-defined]
    assert caps.limits() == p.Limits(8, 1 << 20, 65535, 4096, False, False)


# QEMU 11.1.3's answers to a server's DMA_READ (16 bytes at 0x8000) and DMA_WRITE (8 bytes)
QEMU_DMA_READ_REPLY = bytes.fromhex(
    "00000b00300000000100000000000000" + "00800000000000001000000000000000"
    + "4142434445464748" + "00" * 8
)  # fmt: skip
QEMU_DMA_WRITE_REPLY = bytes.fromhex(
    "01000c00200000000100000000000000" + "00800000000000000800000000000000"
)


def test_qemu_dma_replies_decode() -> None:
    read = p.command(Cmd.DMA_READ, p.DmaAccess(0x8000, 16), 0)
    msg = p.decode_reply(p.decode_header(QEMU_DMA_READ_REPLY[:16]), QEMU_DMA_READ_REPLY[16:],
                         request=read)  # fmt: skip
    assert msg.payload == p.DmaAccess(0x8000, 16, b"ABCDEFGH" + bytes(8))
    write = p.command(Cmd.DMA_WRITE, p.DmaAccess(0x8000, 8, b"ABCDEFGH"), 1)
    data = QEMU_DMA_WRITE_REPLY
    msg = p.decode_reply(p.decode_header(data[:16]), data[16:], request=write)
    assert msg.payload == p.DmaWriteReply(0x8000, 8)
    assert p.encode(p.reply_to(write, p.DmaWriteReply(0x8000, 8))) == data


def test_qemu_set_irqs_and_region_write_decode() -> None:
    msg = p.decode_command(p.decode_header(QEMU_SET_IRQS[:16]), QEMU_SET_IRQS[16:], 1)
    assert msg.payload == p.IrqSet(20, EV, p.PciIrq.INTX, 0, 1)
    msg = p.decode_command(p.decode_header(QEMU_REGION_WRITE[:16]), QEMU_REGION_WRITE[16:])
    assert msg.payload == p.RegionAccess(0x30, p.PciRegion.CONFIG, 4, b"\0\xf8\xff\xff")


def test_negotiate_version_keeps_a_subset() -> None:
    ours = p.Capabilities(max_msg_fds=8, max_data_xfer_size=1 << 20, pgsizes=4096,
                          twin_socket=p.TwinSocket(True, 0), write_multiple=True)  # fmt: skip
    answer = p.negotiate_version(p.Version(0, 3, QEMU_CAPS), ours)
    assert answer == p.Version(0, 0, p.Capabilities(
        max_msg_fds=8, max_data_xfer_size=1 << 20, pgsizes=4096, write_multiple=True))  # fmt: skip
    bare = p.negotiate_version(p.Version(0, 0), ours)
    assert bare.capabilities == p.Capabilities() and bare.pack().endswith(b"}\0")
    with pytest.raises(p.Unsupported):
        p.negotiate_version(p.Version(1, 0), ours)


def test_capabilities_keep_unknown_members() -> None:
    body = struct.pack("=HH", 0, 0) + b'{"capabilities":{"future":[1,2]},"x":true}\0'
    v = p.Version.unpack(body)
    assert v.capabilities == p.Capabilities(extra=(("future", "[1,2]"),))
    assert v.extra == (("x", "true"),) and p.Version.unpack(v.pack()) == v


# ----------------------------------------------------------------------------- header errors


def hdr(msg_id: int = 1, cmd: int = Cmd.DEVICE_RESET, size: int = 16, flags: int = 0) -> bytes:
    return struct.pack("=HHIII", msg_id, cmd, size, flags, 0)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (hdr()[:15], p.Truncated),
        (hdr() + b"\0", p.BadSize),
        (hdr(size=15), p.BadSize),
        (hdr(size=p.DEFAULT_MAX_MESSAGE_SIZE + 1), p.BadSize),
        (hdr(flags=2), p.BadFlags),
        (hdr(flags=0xF), p.BadFlags),
        (hdr(flags=0x40), p.BadFlags),
        (hdr(flags=0x80000000), p.BadFlags),
        (hdr(flags=0x11), p.BadFlags),  # NO_REPLY on a reply
        (hdr(flags=0x20), p.BadFlags),  # ERROR on a command
    ],
)
def test_bad_header(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        p.decode_header(data)


def test_header_limit_is_adjustable() -> None:
    big = hdr(size=p.max_message_size(64 << 20))
    with pytest.raises(p.BadSize):
        p.decode_header(big)
    assert p.decode_header(big, p.max_message_size(64 << 20)).body_size > 64 << 20


def test_body_not_matching_header_size() -> None:
    header = p.decode_header(hdr(size=20))
    with pytest.raises(p.BadSize) as e:
        p.decode_command(header, b"\0" * 3)
    assert e.value.header == header
    with pytest.raises(p.BadSize):
        p.decode_reply(p.decode_header(hdr(size=20, flags=1)), b"", command=Cmd.DEVICE_RESET)


def test_unknown_command() -> None:
    for cmd in (0, 14 + 100, 0xFFFF):
        with pytest.raises(p.UnknownCommand) as e:
            p.decode_command(p.decode_header(hdr(cmd=cmd)), b"")
        assert e.value.errno == errno.ENOSYS and e.value.header is not None
    with pytest.raises(p.UnknownCommand):
        p.decode_reply(p.decode_header(hdr(cmd=99, flags=1)), b"")


def test_wrong_direction() -> None:
    with pytest.raises(p.WrongDirection):
        as_command(Cmd.DMA_READ, p.DmaAccess(0, 8))  # from the client
    with pytest.raises(p.WrongDirection):
        as_command(Cmd.REGION_READ, p.RegionAccess(0, 0, 4), sender=p.Peer.SERVER)


def test_unexpected_reply() -> None:
    request = p.command(Cmd.DEVICE_GET_INFO, p.DeviceInfo.request(), 3)
    good = p.reply_to(request, p.DeviceInfo.reply(p.DeviceFlag.PCI, 9, 5))
    header, body = wire(good)
    with pytest.raises(p.UnexpectedReply):
        p.decode_command(header, body)  # a reply where a command was expected
    with pytest.raises(p.UnexpectedReply):
        p.decode_reply(*wire(request), request=request)  # the reverse
    with pytest.raises(p.UnexpectedReply):
        p.decode_reply(header, body, request=p.command(Cmd.DEVICE_GET_INFO, None, 4))
    with pytest.raises(p.UnexpectedReply):
        p.decode_reply(header, body, command=Cmd.DEVICE_GET_IRQ_INFO)


def test_error_reply_must_be_bare() -> None:
    with pytest.raises(p.BadPayloadSize):
        p.decode_reply(p.decode_header(hdr(size=20, flags=0x21)), b"\0" * 4)
    with pytest.raises(p.BadFdCount):
        p.decode_reply(p.decode_header(hdr(flags=0x21)), b"", 1)
    with pytest.raises(ValueError):
        p.encode(p.Message(1, Cmd.DEVICE_RESET, p.U64(1), 0x21, errno.EIO))


# ----------------------------------------------------------------------------- payload errors


def raw_command(cmd: int, body: bytes, nfds: int = 0, **kw: object) -> p.Message:
    header = p.decode_header(struct.pack("=HHIII", 7, cmd, 16 + len(body), 0, 0))
    return p.decode_command(header, body, nfds, sender=_sender(cmd), **kw)  # type: ignore[arg-type]


def raw_reply(cmd: int, body: bytes, nfds: int = 0) -> p.Message:
    header = p.decode_header(struct.pack("=HHIII", 7, cmd, 16 + len(body), 1, 0))
    return p.decode_reply(header, body, nfds, command=cmd)


@pytest.mark.parametrize(
    ("cmd", "body"),
    [
        (Cmd.VERSION, b"\0\0\0"),
        (Cmd.DMA_MAP, p.DmaMap.make(0, 4096).pack()[:-1]),
        (Cmd.DMA_UNMAP, p.DmaUnmap.make(0, 4096).pack()[:20]),
        (Cmd.DMA_UNMAP, p.DmaUnmap(40, 1, 0, 4096).pack()),  # bitmap flag, no bitmap
        (Cmd.DEVICE_GET_INFO, b"\x10\0\0\0"),
        (Cmd.DEVICE_GET_REGION_INFO, bytes(31)),
        (Cmd.DEVICE_SET_IRQS, bytes(19)),
        (Cmd.REGION_READ, bytes(15)),
        (Cmd.REGION_WRITE, p.RegionAccess(0, 0, 4, b"\1\2").pack()),  # count 4, 2 bytes
        (Cmd.DMA_WRITE, p.DmaAccess(0, 4, b"\1").pack()),
        (Cmd.DEVICE_FEATURE, b"\0" * 7),
        (Cmd.MIG_DATA_WRITE, p.MigData(8, 4, b"ab").pack()),
        (Cmd.REGION_WRITE_MULTI, b"\0" * 7),
        (Cmd.DIRTY_PAGES, struct.pack("=II", 40, p.DirtyPagesFlag.GET_BITMAP)),
    ],
    ids=lambda v: p.Command(v).name if isinstance(v, int) else "",
)
def test_truncated_payload(cmd: int, body: bytes) -> None:
    with pytest.raises(p.Truncated) as e:
        raw_command(cmd, body)
    assert e.value.header is not None and e.value.header.msg_id == 7


@pytest.mark.parametrize(
    ("cmd", "body"),
    [
        (Cmd.DMA_MAP, p.DmaMap.make(0, 4096).pack() + b"\0"),
        (Cmd.DMA_UNMAP, p.DmaUnmap.make(0, 4096).pack() + b"\0"),
        (Cmd.DEVICE_GET_INFO, p.DeviceInfo.request().pack() + b"\0"),
        (Cmd.DEVICE_GET_IRQ_INFO, p.IrqInfo.request(0).pack() + b"\0"),
        (Cmd.DEVICE_GET_REGION_IO_FDS, p.RegionIoFds.request(0).pack() + b"\0"),
        (Cmd.DEVICE_GET_REGION_INFO, p.RegionInfo.request(0).pack() + bytes(8)),
        (Cmd.DEVICE_RESET, b"\0"),
        (Cmd.REGION_READ, p.RegionAccess(0, 0, 4, b"data").pack()),
        (Cmd.REGION_WRITE, p.RegionAccess(0, 0, 1, b"\1\2").pack()),
        (Cmd.DMA_READ, p.DmaAccess(0, 1, b"x").pack()),
        (Cmd.DEVICE_SET_IRQS, p.IrqSet.make(ALL_OFF, 0, 0, 1, b"\1").pack()),
        (Cmd.DEVICE_SET_IRQS, p.IrqSet.make(EV, 0, 0, 2, b"\1\2\3").pack()),
        (Cmd.REGION_WRITE_MULTI, p.RegionWriteMulti((p.MultiWrite(0, 0, 1, b"x"),)).pack()[:-1]),
        (Cmd.MIG_DATA_READ, p.MigData(16, 0, b"x").pack()),
    ],
    ids=lambda v: p.Command(v).name if isinstance(v, int) else "",
)
def test_bad_payload_size(cmd: int, body: bytes) -> None:
    with pytest.raises(p.BadPayloadSize):
        raw_command(cmd, body)


def test_bad_payload_size_in_replies() -> None:
    with pytest.raises(p.BadPayloadSize):
        raw_reply(Cmd.DMA_MAP, b"\0")
    with pytest.raises(p.BadPayloadSize):
        raw_reply(Cmd.REGION_WRITE, p.RegionAccess(0, 0, 1, b"x").pack())
    with pytest.raises(p.Truncated):
        raw_reply(Cmd.REGION_READ, p.RegionAccess(0, 0, 4, b"ab").pack())
    with pytest.raises(p.BadPayloadSize):
        raw_reply(Cmd.DMA_WRITE, bytes(20))
    with pytest.raises(p.BadPayloadSize):  # region info tail without the CAPS flag
        raw_reply(Cmd.DEVICE_GET_REGION_INFO, p.RegionInfo(40, 0, 0, 0, 0, 0).pack() + bytes(8))


@pytest.mark.parametrize(
    ("cmd", "payload"),
    [
        (Cmd.DMA_MAP, p.DmaMap(24, 3, 0, 0, 4096)),
        (Cmd.DMA_UNMAP, p.DmaUnmap(16, 0, 0, 4096)),
        (Cmd.DMA_UNMAP, p.DmaUnmap(40, 1, 0, 4096, p.Bitmap(4096, 8))),  # no room for bitmap
        (Cmd.DEVICE_GET_INFO, p.DeviceInfo(8, 0, 0, 0)),
        (Cmd.DEVICE_GET_REGION_INFO, p.RegionInfo.request(0, 16)),
        (Cmd.DEVICE_GET_REGION_IO_FDS, p.RegionIoFds.request(0, 8)),
        (Cmd.DEVICE_GET_IRQ_INFO, p.IrqInfo(4, 0, 0, 0)),
        (Cmd.DEVICE_SET_IRQS, p.IrqSet(24, ALL_OFF, 0, 0, 0)),
        (Cmd.DEVICE_SET_IRQS, p.IrqSet(20, BOOL_MASK, 0, 0, 2, b"\1\1")),
        (Cmd.DEVICE_FEATURE, p.DeviceFeature(4, GET | MIGRATION)),
        (Cmd.MIG_DATA_READ, p.MigData(8, 4096)),
        (Cmd.DIRTY_PAGES, p.DirtyPages(4, p.DirtyPagesFlag.STOP)),
    ],
    ids=lambda v: p.Command(v).name if isinstance(v, int) else "",
)
def test_bad_argsz(cmd: int, payload: object) -> None:
    with pytest.raises(p.BadArgsz) as e:
        as_command(cmd, payload, sender=_sender(cmd))
    assert e.value.errno == errno.EINVAL


def test_bad_argsz_in_replies() -> None:
    with pytest.raises(p.BadArgsz):  # reply longer than its argsz
        as_reply(Cmd.DEVICE_GET_INFO, p.DeviceInfo(12, p.DeviceFlag.PCI, 9, 5))
    full = p.RegionInfo.reply(0, 0, 1, caps=(SPARSE,))
    with pytest.raises(p.BadArgsz):
        as_reply(Cmd.DEVICE_GET_REGION_INFO, p.RegionInfo(40, *list(full.__dict__.values())[1:]))
    with pytest.raises(p.BadArgsz):  # CAPS flag, nothing sent and argsz says there is nothing
        as_reply(Cmd.DEVICE_GET_REGION_INFO, p.RegionInfo(32, p.RegionFlag.CAPS, 0, 32, 1, 0))
    with pytest.raises(p.BadArgsz):
        as_reply(Cmd.MIG_DATA_READ, p.MigData(8, 3, b"xyz"))


@pytest.mark.parametrize(
    ("cmd", "payload"),
    [
        (Cmd.DMA_MAP, p.DmaMap.make(0, 4096, flags=4)),
        (Cmd.DMA_MAP, p.DmaMap.make(0, 4096, offset=4096)),  # offset without an fd
        (Cmd.DMA_UNMAP, p.DmaUnmap.make(0, 4096, flags=4)),
        (Cmd.DMA_UNMAP, p.DmaUnmap(40, 3, 0, 0, p.Bitmap(4096, 0))),  # ALL + bitmap
        (Cmd.DEVICE_GET_INFO, p.DeviceInfo(16, 0, 9, 0)),
        (Cmd.DEVICE_GET_REGION_INFO, p.RegionInfo(32, 1, 0, 0, 0, 0)),
        (Cmd.DEVICE_GET_REGION_IO_FDS, p.RegionIoFds(16, 0, 0, 3)),
        (Cmd.DEVICE_GET_IRQ_INFO, p.IrqInfo(16, 1, 0, 0)),
        (Cmd.DEVICE_SET_IRQS, p.IrqSet.make(p.IrqSetFlag.ACTION_MASK, 0, 0, 0)),
        (Cmd.DEVICE_SET_IRQS, p.IrqSet.make(EV | p.IrqSetFlag.DATA_BOOL, 0, 0, 0)),
        (Cmd.DEVICE_SET_IRQS, p.IrqSet.make(EV | p.IrqSetFlag.ACTION_MASK, 0, 0, 0)),
        (Cmd.DEVICE_SET_IRQS, p.IrqSet.make(EV | 0x40, 0, 0, 0)),
        (Cmd.DEVICE_FEATURE, p.DeviceFeature(8, MIGRATION)),
        (Cmd.DEVICE_FEATURE, p.DeviceFeature(8, GET | SET | MIGRATION)),
        (Cmd.DEVICE_FEATURE, p.DeviceFeature(8, GET | (1 << 20))),
        (Cmd.DIRTY_PAGES, p.DirtyPages(8, p.DirtyPagesFlag.START | p.DirtyPagesFlag.STOP)),
        (Cmd.REGION_WRITE_MULTI, p.RegionWriteMulti(())),
        (Cmd.VERSION, p.Version(0, 0, p.Capabilities(twin_socket=p.TwinSocket(True, 0)))),
    ],
    ids=lambda v: p.Command(v).name if isinstance(v, int) else "",
)
def test_bad_payload(cmd: int, payload: object) -> None:
    with pytest.raises(p.BadPayload):
        as_command(cmd, payload)


@pytest.mark.parametrize(
    "data",
    [
        b"{}",  # no NUL
        b'{"capabilities":{}}\0\0',  # NUL inside
        b"{not json}\0",
        b"\xff\0",
        b"[1]\0",  # not an object
        b'{"capabilities":[]}\0',
        b'{"capabilities":{"max_msg_fds":-1}}\0',
        b'{"capabilities":{"max_msg_fds":true}}\0',
        b'{"capabilities":{"max_data_xfer_size":1.5}}\0',
        b'{"capabilities":{"write_multiple":1}}\0',
        b'{"capabilities":{"twin_socket":{"supported":"yes"}}}\0',
        b'{"capabilities":{"migration":{"pgsize":"4k"}}}\0',
    ],
)
def test_bad_version_data(data: bytes) -> None:
    with pytest.raises(p.BadPayload):
        raw_command(Cmd.VERSION, b"\0\0\0\0" + data)


def test_bad_payload_in_replies() -> None:
    with pytest.raises(p.BadPayload):
        as_reply(Cmd.DEVICE_GET_IRQ_INFO, p.IrqInfo(16, 0x10, 0, 1))
    with pytest.raises(p.BadPayload):
        as_reply(Cmd.DEVICE_GET_REGION_INFO, p.RegionInfo(32, 0x10, 0, 0, 1, 0))
    with pytest.raises(p.BadPayload):
        as_reply(Cmd.DEVICE_GET_REGION_IO_FDS, p.RegionIoFds(56, 0, 0, 1, (
            p.IoFdSubRegion(0, 4, 0, 7, 0, 0),)), 1)  # fmt: skip


def test_truncated_is_not_bad_payload() -> None:
    assert not issubclass(p.Truncated, p.BadPayload)
    with pytest.raises(p.Truncated):
        raw_reply(Cmd.REGION_WRITE_MULTI, b"")


def region_reply_bytes(caps_blob: bytes, cap_offset: int = 32) -> bytes:
    return (
        struct.pack("=IIIIQQ", 32 + len(caps_blob), p.RegionFlag.CAPS, 0, cap_offset, 1, 0)
        + caps_blob
    )


@pytest.mark.parametrize(
    ("blob", "cap_offset", "error"),
    [
        (struct.pack("=HHI", 1, 1, 0) + bytes(4), 32, p.Truncated),  # sparse head cut
        (struct.pack("=HHIII", 1, 1, 0, 2, 0) + bytes(16), 32, p.Truncated),  # 2 areas, 1 sent
        (struct.pack("=HHI", 2, 1, 0) + bytes(4), 32, p.Truncated),
        (struct.pack("=HHI", 3, 1, 200), 32, p.Truncated),  # next beyond the reply
        (struct.pack("=HHI", 3, 1, 32) + bytes(8), 32, p.BadPayload),  # loop
        (struct.pack("=HHI", 3, 1, 0), 8, p.BadPayload),  # inside the fixed part
        (struct.pack("=HHI", 3, 1, 0), 0, p.BadPayload),
        (bytes(4), 32, p.Truncated),
    ],
)
def test_broken_capability_chain(blob: bytes, cap_offset: int, error: type[Exception]) -> None:
    with pytest.raises(error):
        raw_reply(Cmd.DEVICE_GET_REGION_INFO, region_reply_bytes(blob, cap_offset))


# ----------------------------------------------------------------------------- fd counts


@pytest.mark.parametrize(
    ("cmd", "payload", "nfds"),
    [
        (Cmd.VERSION, p.Version(0, 0), 1),
        (Cmd.DMA_MAP, p.DmaMap.make(0, 4096), 2),
        (Cmd.DMA_UNMAP, p.DmaUnmap.make(0, 4096), 1),
        (Cmd.DEVICE_GET_INFO, p.DeviceInfo.request(), 1),
        (Cmd.DEVICE_GET_REGION_INFO, p.RegionInfo.request(0), 1),
        (Cmd.DEVICE_GET_REGION_IO_FDS, p.RegionIoFds.request(0), 1),
        (Cmd.DEVICE_GET_IRQ_INFO, p.IrqInfo.request(0), 1),
        (Cmd.DEVICE_SET_IRQS, p.IrqSet.make(EV, 2, 0, 2), 1),
        (Cmd.DEVICE_SET_IRQS, p.IrqSet.make(EV, 2, 0, 2), 3),
        (Cmd.DEVICE_SET_IRQS, p.IrqSet.make(ALL_OFF, 2, 0, 1), 1),
        (Cmd.REGION_READ, p.RegionAccess(0, 0, 4), 1),
        (Cmd.REGION_WRITE, p.RegionAccess(0, 0, 1, b"x"), 1),
        (Cmd.DEVICE_RESET, p.Empty(), 1),
        (Cmd.DIRTY_PAGES, p.DirtyPages(8, 1), 1),
        (Cmd.REGION_WRITE_MULTI, p.RegionWriteMulti((p.MultiWrite(0, 0, 1, b"x"),)), 1),
        (Cmd.DEVICE_FEATURE, p.DeviceFeature(8, PROBE | 1), 1),
        (Cmd.MIG_DATA_READ, p.MigData(8, 0), 1),
        (Cmd.MIG_DATA_WRITE, p.MigData(8, 0), 1),
    ],
    ids=lambda v: p.Command(v).name if isinstance(v, int) else "",
)
def test_bad_fd_count(cmd: int, payload: object, nfds: int) -> None:
    with pytest.raises(p.BadFdCount):
        as_command(cmd, payload, nfds)


def test_bad_fd_count_server_commands_and_replies() -> None:
    for cmd, payload in ((Cmd.DMA_READ, p.DmaAccess(0, 1)), (Cmd.DMA_WRITE, p.DmaAccess(0, 0))):
        with pytest.raises(p.BadFdCount):
            as_command(cmd, payload, 1, sender=p.Peer.SERVER)
    with pytest.raises(p.BadFdCount):  # twin socket announced, no fd attached
        as_reply(Cmd.VERSION, p.Version(0, 0, p.Capabilities(twin_socket=p.TwinSocket(True, 0))))
    with pytest.raises(p.BadFdCount):
        as_reply(Cmd.VERSION, p.Version(0, 0, p.Capabilities()), 1)
    with pytest.raises(p.BadFdCount):  # an fd for a region that is not mappable
        as_reply(Cmd.DEVICE_GET_REGION_INFO, p.RegionInfo.reply(7, p.RegionFlag.READ, 256), 1)
    with pytest.raises(p.BadFdCount):
        as_reply(Cmd.DEVICE_GET_REGION_INFO, p.RegionInfo.reply(0, p.RegionFlag.MMAP, 1), 2)
    with pytest.raises(p.BadFdCount):  # fd_index 1 with one fd
        as_reply(Cmd.DEVICE_GET_REGION_IO_FDS, p.RegionIoFds(96, 0, 0, 2, (IOEVENT, IOREGION)), 1)
    with pytest.raises(p.BadFdCount):
        as_reply(Cmd.DEVICE_GET_REGION_IO_FDS, p.RegionIoFds(56, 0, 0, 1, (IOEVENT,)), 0)
    for cmd in (Cmd.DMA_MAP, Cmd.DEVICE_SET_IRQS, Cmd.DEVICE_RESET, Cmd.DEVICE_GET_INFO):
        with pytest.raises(p.BadFdCount):
            raw_reply(cmd, p.DeviceInfo.reply(0, 0, 0).pack() if cmd == 4 else b"", 1)


# ----------------------------------------------------------------------------- limits, policy


def test_transfer_too_large() -> None:
    msg = as_command(Cmd.REGION_READ, p.RegionAccess(0, 0, 4), max_data_xfer_size=4)
    assert msg.payload == p.RegionAccess(0, 0, 4)
    for cmd, payload, sender in [
        (Cmd.REGION_READ, p.RegionAccess(0, 0, 5), p.Peer.CLIENT),
        (Cmd.REGION_WRITE, p.RegionAccess(0, 0, 5, b"12345"), p.Peer.CLIENT),
        (Cmd.DMA_READ, p.DmaAccess(0, 5), p.Peer.SERVER),
        (Cmd.DMA_WRITE, p.DmaAccess(0, 5, b"12345"), p.Peer.SERVER),
        (Cmd.MIG_DATA_READ, p.MigData(13, 5), p.Peer.CLIENT),
        (Cmd.MIG_DATA_WRITE, p.MigData(13, 5, b"12345"), p.Peer.CLIENT),
    ]:
        with pytest.raises(p.TransferTooLarge) as e:
            as_command(cmd, payload, sender=sender, max_data_xfer_size=4)
        assert e.value.errno == errno.E2BIG
    with pytest.raises(p.TransferTooLarge):
        as_reply(Cmd.REGION_READ, p.RegionAccess(0, 0, 5, b"12345"), max_data_xfer_size=4)


@pytest.mark.parametrize(
    ("cmd", "payload"),
    [
        (Cmd.DIRTY_PAGES, p.DirtyPages(8, p.DirtyPagesFlag.START)),
        (Cmd.DMA_UNMAP, p.DmaUnmap(48, 1, 0, 0x40000, p.Bitmap(4096, 8))),
        (Cmd.DEVICE_FEATURE, p.DeviceFeature(16, GET | MIGRATION)),
        (Cmd.MIG_DATA_READ, p.MigData(4104, 4096)),
        (Cmd.MIG_DATA_WRITE, p.MigData(8, 3, b"xyz")),
    ],
    ids=lambda v: p.Command(v).name if isinstance(v, int) else "",
)
def test_unsupported_is_decoded_then_rejected(cmd: int, payload: object) -> None:
    msg = as_command(cmd, payload)
    with pytest.raises(p.Unsupported) as e:
        p.check_supported(msg)
    assert e.value.errno == errno.ENOTSUP
    assert e.value.header is not None
    answer = p.error_reply(e.value.header, e.value.errno)
    assert (answer.msg_id, answer.command, answer.error) == (0x1234, cmd, errno.ENOTSUP)


def test_supported_commands_pass_the_policy() -> None:
    p.check_supported(as_command(Cmd.DMA_UNMAP, p.DmaUnmap.make(0, 4096)))
    p.check_supported(as_command(Cmd.DEVICE_RESET, p.Empty()))
    with pytest.raises(p.Unsupported):
        p.check_supported(as_command(Cmd.DEVICE_RESET, p.Empty()), refuse=[Cmd.DEVICE_RESET])


def test_error_classes_are_protocol_errors() -> None:
    from vhostuser.protocol import ProtocolError

    for cls in (p.Truncated, p.BadSize, p.BadFlags, p.UnknownCommand, p.WrongDirection,
                p.BadPayloadSize, p.BadArgsz, p.BadPayload, p.BadFdCount, p.TransferTooLarge,
                p.Unsupported, p.UnexpectedReply):  # fmt: skip
        assert issubclass(cls, p.VfioUserError) and issubclass(cls, ProtocolError)


# ----------------------------------------------------------------------------- socket framing


@pytest.fixture
def pair() -> Iterator[tuple[VfioUserChannel, VfioUserChannel]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client, server = VfioUserChannel(a), VfioUserChannel(b, max_fds=4)
    yield client, server
    client.close()
    server.close()


def test_channel_carries_fds(pair: tuple[VfioUserChannel, VfioUserChannel]) -> None:
    client, server = pair
    fd = os.memfd_create("guest-ram")
    os.write(fd, b"guest")
    try:
        request = p.command(Cmd.DMA_MAP, p.DmaMap.make(0, 4096), client.next_msg_id())
        client.send(request, [fd])
        msg, fds = server.recv_command()
        assert msg == request and len(fds) == 1 and fds[0] != fd
        assert os.pread(fds[0], 5, 0) == b"guest"
        os.close(fds[0])
        server.send(p.reply_to(msg))
        answer, rfds = client.recv_reply(request)
        assert answer.payload == p.Empty() and rfds == []
    finally:
        os.close(fd)


def test_channel_too_many_fds(pair: tuple[VfioUserChannel, VfioUserChannel]) -> None:
    client, server = pair
    fds = [os.eventfd(0) for _ in range(6)]
    try:
        client.send(p.command(Cmd.DEVICE_SET_IRQS, p.IrqSet.make(EV, 2, 0, 6), 1), fds)
        with pytest.raises(p.BadFdCount):
            server.recv_raw()
        with pytest.raises(ValueError):
            server.send(p.command(Cmd.DEVICE_RESET, None, 2), fds)
    finally:
        for fd in fds:
            os.close(fd)


def test_channel_closes_fds_of_a_bad_message(pair: tuple[VfioUserChannel, VfioUserChannel]) -> None:
    client, server = pair
    fd = os.eventfd(0)
    before = set(os.listdir("/proc/self/fd"))
    client.send(p.command(Cmd.DEVICE_RESET, None, 3), [fd])  # RESET carries no fd
    with pytest.raises(p.BadFdCount) as e:
        server.recv_command()
    assert e.value.header is not None and e.value.header.msg_id == 3
    assert set(os.listdir("/proc/self/fd")) == before
    os.close(fd)
    client.send_bytes(hdr(flags=0x40))
    with pytest.raises(p.BadFlags):
        server.recv_raw()


def test_channel_peer_closed(pair: tuple[VfioUserChannel, VfioUserChannel]) -> None:
    client, server = pair
    client.send_bytes(p.encode(p.command(Cmd.DEVICE_GET_INFO, p.DeviceInfo.request(), 1))[:20])
    client.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(PeerClosed):
        server.recv_raw()
    with pytest.raises(PeerClosed):
        server.recv_raw()


def test_channel_split_header_and_dma_from_server(
    pair: tuple[VfioUserChannel, VfioUserChannel],
) -> None:
    client, server = pair
    data = p.encode(p.command(Cmd.DMA_WRITE, p.DmaAccess(0x1000, 3, b"abc"), 0xFFFF))
    server.sock.sendall(data[:5])
    server.sock.sendall(data[5:])
    msg, _ = client.recv_command(sender=p.Peer.SERVER)
    assert msg.payload == p.DmaAccess(0x1000, 3, b"abc") and msg.msg_id == 0xFFFF
    ids = [client.next_msg_id() for _ in range(3)]
    assert ids == [0, 1, 2]
