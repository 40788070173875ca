"""vhost-user-check's checks that make requests of a vhost-user-net back-end: frames on the
transmit queue of pair 0, which a back-end reads on its own. What becomes of a frame is
the back-end's business (a switch port floods it, a sink drops it, testpmd's io mode sends
it back); what is checked is that every buffer comes back, that GET_VRING_BASE drains,
and that frames no device should take whole (shorter than their header, asking for an
offload that was not negotiated, longer than any frame) neither crash the back-end nor
make it write outside its memory. The rules: virtio 1.x §5.1.6 (device operation) and
vhost-user's ring rules."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Sequence

from ..devices.net_offload import (
    F_CSUM,
    F_HOST_ECN,
    F_HOST_TSO4,
    F_HOST_TSO6,
    F_HOST_UFO,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    NEEDS_CSUM,
)
from ..protocol import VirtioFeature
from ..virtq.ring import DESC_F_NEXT
from .checks import Failed, Skipped, _alive, _attack, _chain, check
from .rig import NET_TX, PROBE_FRAME, Session, session

_HDR = struct.Struct("<BBHHHHH")  # virtio_net_hdr with num_buffers: 12 bytes
FRAMES = 16


def _frame(i: int) -> bytes:
    return PROBE_FRAME[:12] + b"\x88\xb5" + bytes([i]) * 50


@check("net-io", "frames transmitted, one through an indirect table, all come back used",
       kinds=("net",))
def _net_io(path: str) -> str:
    with session(path) as s:
        net = s.setup_net()
        net.send([_frame(i) for i in range(FRAMES)])
        done = s.fe.wait_used(NET_TX, FRAMES, timeout=5.0)
        ring = s.ring(NET_TX)
        indirect = bool(s.fe.features & VirtioFeature.RING_INDIRECT_DESC)
        if indirect:
            hdr = s.ram.alloc(12)
            body = s.ram.alloc(64)
            s.ram.at(body, 64)[:] = _frame(99)
            ring.add([(hdr, 12, False), (body, 64, False)], indirect=True)
            s.fe.kick(NET_TX)
            done += s.fe.wait_used(NET_TX, 1, timeout=5.0)
        return (f"{len(done)} frames used" + (", one of them through an indirect table"
                                               if indirect else ""))


@check("net-stop-drains", "GET_VRING_BASE on the transmit queue returns once every frame "
                          "the back-end took is used, and the queue goes on from that base",
       kinds=("net",))
def _net_stop_drains(path: str) -> str:
    with session(path) as s:
        s.setup_net()
        ring = s.ring(NET_TX)
        for i in range(FRAMES):
            gpa = s.ram.alloc(12 + 64)
            s.ram.at(gpa, 12 + 64)[:] = bytes(12) + _frame(i)
            ring.add([(gpa, 12 + 64, False)])
        os.eventfd_write(s.fe.queues[NET_TX].kick, 1)
        base = s.fe.get_vring_base(NET_TX)
        used = ring.used_idx()
        if used != base or not 0 <= base <= FRAMES:
            raise Failed(f"after GET_VRING_BASE: base {base}, used idx {used}, {FRAMES} "
                         "frames made available (a frame taken but not used is lost)")
        s.fe.start_queue(NET_TX, base)
        os.eventfd_write(s.fe.queues[NET_TX].kick, 1)
        deadline = time.monotonic() + 5.0
        while ring.used_idx() != FRAMES and time.monotonic() < deadline:
            time.sleep(0.01)
        if ring.used_idx() != FRAMES:
            raise Failed(f"after the restart at {base}: used idx {ring.used_idx()} of "
                         f"{FRAMES}")
        return f"base {base} = used idx; the other {FRAMES - base} used after the restart"


@check("net-reconnect", "a new connection after ones that went away with frames in flight "
                        "is served", kinds=("net",))
def _net_reconnect(path: str) -> str:
    for _ in range(3):
        with session(path) as s:
            s.setup_net().send([_frame(i) for i in range(4)])
    _alive(path)
    return "three connections dropped with frames in flight, the fourth served"


def _tx_chain(s: Session, descs: Sequence[tuple[bytes | int, int]]) -> None:
    """A transmit chain of readable buffers: (contents, 0) written to fresh memory, or
    (guest address, length) as given."""
    out = []
    for i, (what, n) in enumerate(descs):
        nxt = DESC_F_NEXT if i + 1 < len(descs) else 0
        if isinstance(what, bytes):
            gpa = s.ram.alloc(max(len(what), 1))
            s.ram.at(gpa, len(what))[:] = what
            out.append((gpa, len(what), nxt, i + 1))
        else:
            out.append((what, n, nxt, i + 1))
    _chain(s, out)


@check("net-short-frame", "a transmitted chain of 8 bytes, shorter than the virtio-net "
                          "header", kinds=("net",))
def _net_short(path: str) -> str:
    return _attack(path, lambda s: _tx_chain(s, [(bytes(8), 0)]), "an 8-byte frame")


@check("net-offload-not-negotiated", "a frame whose header asks for a checksum and TCP "
                                     "segmentation, neither negotiated", kinds=("net",))
def _net_offload(path: str) -> str:
    hdr = _HDR.pack(NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16, 0)
    return _attack(path, lambda s: _tx_chain(s, [(hdr + _frame(1) * 40, 0)]),
                   "NEEDS_CSUM and GSO_TCPV4 without CSUM or HOST_TSO4")


def _ipv4(proto: int, l4: bytes, total: int | None = None, frag: int = 0x4000) -> bytes:
    """An IPv4 packet of 192.0.2.1 -> 192.0.2.2 behind the probe frame's addresses (its
    header checksum left 0: the checks are about what the device does with it)."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total or 20 + len(l4), 1, frag, 64, proto, 0,
                     bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))
    return PROBE_FRAME[:12] + b"\x08\x00" + ip + l4


_TCP = struct.pack("!HHIIBBHHH", 40000, 5000, 1, 1, 5 << 4, 0x18, 500, 0, 0)
_UDP = struct.pack("!HHHH", 4000, 4001, 8 + 3000, 0)

# (what, header, frame): GSO and checksum requests their packets do not match
_LIES = [
    ("an MSS of 1", (GSO_TCPV4, 1, 34, 16), _ipv4(6, _TCP + bytes(3000))),
    ("an MSS of 0", (GSO_TCPV4, 0, 34, 16), _ipv4(6, _TCP + bytes(3000))),
    ("the checksum past the frame", (GSO_NONE, 0, 60000, 16), _ipv4(6, _TCP + bytes(100))),
    ("the checksum field's last byte past the frame", (GSO_NONE, 0, 34, 119),
     _ipv4(6, _TCP + bytes(100))),
    ("TCPv6 segmentation of an IPv4 packet", (GSO_TCPV6, 1448, 34, 16),
     _ipv4(6, _TCP + bytes(3000))),
    ("TCP segmentation of a UDP packet", (GSO_TCPV4, 1448, 34, 16),
     _ipv4(17, _UDP + bytes(3000))),
    ("a TCP header of 60 bytes in a packet of 30", (GSO_TCPV4, 1448, 34, 16),
     _ipv4(6, _TCP[:12] + b"\xf0" + _TCP[13:] + bytes(10))),
    ("an IP total length past the frame", (GSO_TCPV4, 1448, 34, 16),
     _ipv4(6, _TCP + bytes(3000), total=60000)),
    ("an IPv4 fragment", (GSO_UDP, 1448, 34, 6), _ipv4(17, _UDP + bytes(3000), frag=0x2001)),
    ("an ECN request of a truncated frame", (GSO_TCPV4 | GSO_ECN, 1448, 34, 16),
     _ipv4(6, _TCP)[:40]),
    ("not IP at all", (GSO_TCPV4, 1448, 34, 16), PROBE_FRAME + bytes(3000)),
]


@check("net-offload-lies", "with checksum and segmentation offloads negotiated, frames "
                           "whose headers do not match their packets (an MSS of 0 or 1, a "
                           "checksum past the frame, the wrong GSO type, lengths past the "
                           "frame, a fragment, not IP)", kinds=("net",))
def _net_offload_lies(path: str) -> str:
    want = F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_UFO | F_HOST_ECN
    with session(path) as s:
        s.setup_net(features=want)
        if s.fe.features & (F_CSUM | F_HOST_TSO4) != F_CSUM | F_HOST_TSO4:
            raise Skipped("CSUM and HOST_TSO4 not offered")
        ring = s.ring(NET_TX)
        for _, (gso, size, start, offset), frame in _LIES:
            data = _HDR.pack(NEEDS_CSUM, gso, 54, size, start, offset, 0) + frame
            gpa = s.ram.alloc(len(data))
            s.ram.at(gpa, len(data))[:] = data
            ring.add([(gpa, len(data), False)])
        s.fe.kick(NET_TX)
        try:
            s.fe.wait_used(NET_TX, len(_LIES), timeout=5.0)
        except TimeoutError:
            raise Failed(f"{ring.used_idx()} of {len(_LIES)} frames used") from None
        if not s.ram.guards_intact():
            raise Failed("the back-end wrote outside the memory region it was given")
    _alive(path)
    return f"{len(_LIES)} frames used; served on"


@check("net-oversize", "a frame of 65550 bytes over 17 descriptors, longer than any MTU",
       kinds=("net",))
def _net_oversize(path: str) -> str:
    parts = [(bytes(12) + _frame(2), 0)] + [(bytes(4096), 0)] * 16
    return _attack(path, lambda s: _tx_chain(s, parts), "a 65 KiB frame")


@check("net-rx-outside", "a receive buffer outside every memory region, then a broadcast "
                         "frame transmitted (a back-end that sends frames back to the port "
                         "meets it)", kinds=("net",))
def _net_rx_outside(path: str) -> str:
    with session(path) as s:
        net = s.setup_net(rx_buffers=0)
        rx = s.ring(0)
        rx.add([(s.ram.size + (1 << 30), 2048, True)])  # the first buffer a frame meets
        net.post_rx(8)
        net.send([_frame(3)])
        deadline = time.monotonic() + 1.0
        while rx.used_idx() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        outcome = "a frame came back" if rx.used_idx() else "no frame came back"
        if not s.ram.guards_intact():
            raise Failed("the back-end wrote outside the memory region it was given")
    _alive(path)
    return f"{outcome}; memory outside the region untouched; still serves"

