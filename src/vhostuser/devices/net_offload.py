"""virtio-net checksum and segmentation offloads (virtio 1.x §5.1.6.2, §5.1.6.4), the
device side: what a transmitted header may ask for, and what to do with such a frame when
the port it goes to did not negotiate the same offload.

A driver that negotiated CSUM may leave a frame's TCP/UDP checksum to the device
(NEEDS_CSUM: the checksum of everything from `csum_start` on, stored at `csum_start +
csum_offset`); one that negotiated HOST_TSO4/6 (HOST_UFO) may hand over a TCP (UDP) packet
of up to 64 KiB for the device to cut into `gso_size` pieces. A frame the switch carries
keeps its header as far as the port it goes to: a port that negotiated GUEST_CSUM and the
matching GUEST_TSO4/6, GUEST_UFO (GUEST_ECN for ECN) gets it as it came; for any other
port (and the TAP uplink) it is finished here, in software: the checksum filled in, the
packet segmented (TCP) or fragmented (UDP) into frames with complete headers and checksums.

Every header a guest writes is untrusted: a GSO frame must parse as the packet its header
says (Ethernet, an optional VLAN tag, IPv4 without fragments or IPv6 without extension
headers, TCP or UDP whose checksum field is where `csum_start`/`csum_offset` point), with
an MSS of at least `MIN_MSS`; the switch cuts a frame into at most `MAX_SEGMENTS` pieces
(a frame that would take more is dropped for a port that cannot take it whole), so no
frame makes it cut thousands; a checksum alone must lie past the Ethernet header (the
switch has checked and learned the addresses by the time it is filled in).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

# feature bits (virtio 1.x §5.1.3)
F_CSUM = 1 << 0
F_GUEST_CSUM = 1 << 1
F_GUEST_TSO4 = 1 << 7
F_GUEST_TSO6 = 1 << 8
F_GUEST_ECN = 1 << 9
F_GUEST_UFO = 1 << 10
F_HOST_TSO4 = 1 << 11
F_HOST_TSO6 = 1 << 12
F_HOST_ECN = 1 << 13
F_HOST_UFO = 1 << 14
F_GUEST_ANNOUNCE = 1 << 21

TX_OFFLOADS = F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_ECN | F_HOST_UFO
RX_OFFLOADS = F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN | F_GUEST_UFO
OFFLOADS = TX_OFFLOADS | RX_OFFLOADS
TAP_OFFLOADS = OFFLOADS & ~(F_HOST_UFO | F_GUEST_UFO)  # what a TAP takes and gives

# header flags and GSO types
NEEDS_CSUM = 1
DATA_VALID = 2
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6 = 0, 1, 3, 4
GSO_ECN = 0x80

MIN_MSS = 48  # Linux's lowest TCP MSS (tcp_min_snd_mss); UDP fragments are 8-aligned
MAX_SEGMENTS = 256  # pieces one GSO frame may be cut into (64 KiB at an MSS of 256)
MAX_GSO_FRAME = 14 + 4 + 65535  # Ethernet, a VLAN tag and the largest IP packet

HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
HDR_SIZE = HDR.size  # 10: num_buffers (with MRG_RXBUF or VERSION_1) is the receive path's
PLAIN = bytes(HDR_SIZE)

_ETH_VLAN = (0x8100, 0x88A8)
_TCP, _UDP = 6, 17
_FIN, _PSH, _CWR = 0x01, 0x08, 0x80


class OffloadError(ValueError):
    """A transmitted header asks for what its frame cannot be, or for what was not
    negotiated."""


@dataclass(frozen=True)
class Packet:
    """Where the headers of a TCP or UDP packet in a frame are."""

    l3: int  # offset of the IP header
    ipv6: bool
    l4: int  # offset of the TCP/UDP header
    proto: int
    l4len: int  # TCP header with its options, or 8 for UDP
    end: int  # end of the IP packet in the frame

    @property
    def payload(self) -> int:
        return self.l4 + self.l4len


def parse(frame: bytes) -> Packet | None:
    """The TCP or UDP packet `frame` carries, or None if it is anything else, or not
    whole (an IPv4 fragment, IPv6 extension headers, lengths past the frame)."""
    n = len(frame)
    if n < 14:
        return None
    l3, etype = 14, int.from_bytes(frame[12:14], "big")
    if etype in _ETH_VLAN:
        if n < 18:
            return None
        l3, etype = 18, int.from_bytes(frame[16:18], "big")
    if etype == 0x0800:
        if n < l3 + 20 or frame[l3] >> 4 != 4:
            return None
        ihl = (frame[l3] & 0xF) * 4
        total = int.from_bytes(frame[l3 + 2 : l3 + 4], "big")
        frag = int.from_bytes(frame[l3 + 6 : l3 + 8], "big")
        if ihl < 20 or total < ihl or l3 + total > n or frag & 0x3FFF:
            return None
        l4, proto, end, ipv6 = l3 + ihl, frame[l3 + 9], l3 + total, False
    elif etype == 0x86DD:
        if n < l3 + 40 or frame[l3] >> 4 != 6:
            return None
        end = l3 + 40 + int.from_bytes(frame[l3 + 4 : l3 + 6], "big")
        if end > n:
            return None
        l4, proto, ipv6 = l3 + 40, frame[l3 + 6], True
    else:
        return None
    if proto == _TCP:
        if end < l4 + 20:
            return None
        l4len = (frame[l4 + 12] >> 4) * 4
        if l4len < 20 or l4 + l4len > end:
            return None
    elif proto == _UDP:
        l4len = 8
        if end < l4 + 8:
            return None
    else:
        return None
    return Packet(l3, ipv6, l4, proto, l4len, end)


# -- checksums -------------------------------------------------------------------------------


def _sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit big-endian words of `data` (an odd byte padded) as one integer whose
    value mod 0xffff is their ones' complement sum (2^16 = 1 mod 0xffff)."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    return int.from_bytes(data, "big")


def _fold(total: int) -> int:
    """The checksum of words summed to `total`: never 0 (0xffff stands for it, as UDP
    needs; for TCP the two are the same)."""
    return 0xFFFF - total % 0xFFFF


def finish_checksum(frame: bytearray, start: int, offset: int) -> None:
    """NEEDS_CSUM done: the checksum of `frame[start:]` (whose checksum field holds the
    sender's pseudo-header sum) stored at `start + offset`."""
    struct.pack_into("!H", frame, start + offset, _fold(_sum(memoryview(frame)[start:])))


def _pseudo(frame: bytes | bytearray, p: Packet) -> int:
    """The pseudo-header's sum, less the L4 length (each segment adds its own)."""
    if p.ipv6:
        return _sum(frame[p.l3 + 8 : p.l3 + 40]) + p.proto
    return _sum(frame[p.l3 + 12 : p.l3 + 20]) + p.proto


def _ipv4_checksum(h: bytearray, l3: int) -> None:
    ihl = (h[l3] & 0xF) * 4
    h[l3 + 10 : l3 + 12] = b"\0\0"
    struct.pack_into("!H", h, l3 + 10, _fold(_sum(h[l3 : l3 + ihl])))


# -- a transmitted header --------------------------------------------------------------------


def check_tx(hdr: bytes | memoryview, frame: bytes, negotiated: int) -> bytes:
    """The header of a frame a driver transmitted, as the switch carries it: PLAIN for a
    complete frame, else the header, normalised (flags it may not set cleared). Raises
    OffloadError for a header that asks for an offload not negotiated, or one its frame
    does not fit."""
    flags, gso, _, gso_size, start, offset = HDR.unpack(bytes(hdr[:HDR_SIZE]))
    if not flags & NEEDS_CSUM and gso == GSO_NONE:
        return PLAIN  # (DATA_VALID and RSC_INFO are the device's to set: ignored)
    if not flags & NEEDS_CSUM or not negotiated & F_CSUM:
        raise OffloadError("checksum offload (NEEDS_CSUM) not negotiated" if
                           not negotiated & F_CSUM else "segmentation without NEEDS_CSUM")
    if start + offset + 2 > len(frame):
        raise OffloadError(f"checksum at {start}+{offset} past the frame's {len(frame)} "
                           "bytes")
    l2 = 18 if len(frame) >= 14 and int.from_bytes(frame[12:14], "big") in _ETH_VLAN else 14
    if start < l2:
        raise OffloadError(f"checksum start {start} inside the Ethernet header")
    if gso == GSO_NONE:
        return HDR.pack(NEEDS_CSUM, GSO_NONE, 0, 0, start, offset)
    kind, ecn = gso & ~GSO_ECN, gso & GSO_ECN
    need = {GSO_TCPV4: F_HOST_TSO4, GSO_TCPV6: F_HOST_TSO6, GSO_UDP: F_HOST_UFO}.get(kind)
    if need is None:
        raise OffloadError(f"unknown GSO type {gso:#x}")
    if not negotiated & need or (ecn and not negotiated & F_HOST_ECN):
        raise OffloadError(f"GSO type {gso:#x} not negotiated")
    p = _gso_packet(frame, gso, gso_size)
    if offset != (6 if kind == GSO_UDP else 16):
        raise OffloadError(f"checksum offset {offset}: not the "
                           f"{'UDP' if kind == GSO_UDP else 'TCP'} checksum's")
    if kind != GSO_UDP and frame[p.l4 + 13] & _CWR:  # congestion window reduced: an ECN
        gso |= GSO_ECN  # frame, segmented for a port without GUEST_ECN (CWR on the first)
    if start != p.l4:
        raise OffloadError(f"checksum start {start}, not the L4 header at {p.l4}")
    return HDR.pack(NEEDS_CSUM, gso, p.payload, gso_size, start, offset)


def _gso_packet(frame: bytes, gso: int, gso_size: int) -> Packet:
    """The packet of a GSO frame, which must be one whole TCP or UDP packet of its GSO type:
    TCP over the IP version the type names; UDP fragments not of an IPv4 packet with
    options (they go in the first fragment alone); a GSO size Linux would take. Raises
    OffloadError."""
    kind = gso & ~GSO_ECN
    if kind not in (GSO_TCPV4, GSO_TCPV6, GSO_UDP):
        raise OffloadError(f"unknown GSO type {gso:#x}")
    p = parse(frame)
    if p is None or p.end != len(frame):
        raise OffloadError("a GSO frame that is not one whole TCP/UDP packet")
    if kind == GSO_UDP:
        if p.proto != _UDP:
            raise OffloadError("a UDP GSO header that does not match its packet")
        if not p.ipv6 and p.l4 - p.l3 != 20:
            raise OffloadError("UDP fragmentation of an IPv4 packet with options")
    elif p.proto != _TCP or p.ipv6 != (kind == GSO_TCPV6):
        raise OffloadError("a TCP GSO header that does not match its packet")
    if gso_size < (8 if kind == GSO_UDP else MIN_MSS):
        raise OffloadError(f"a GSO size of {gso_size}")
    return p


# -- delivery --------------------------------------------------------------------------------


def accepts(hdr: bytes, negotiated: int) -> bool:
    """Whether a port that negotiated `negotiated` takes a frame with header `hdr` as is."""
    flags, gso = hdr[0], hdr[1]
    if not flags & NEEDS_CSUM:
        return True
    if not negotiated & F_GUEST_CSUM:
        return False
    if gso == GSO_NONE:
        return True
    if gso & GSO_ECN and not negotiated & F_GUEST_ECN:
        return False
    need = {GSO_TCPV4: F_GUEST_TSO4, GSO_TCPV6: F_GUEST_TSO6, GSO_UDP: F_GUEST_UFO}
    return bool(negotiated & need.get(gso & ~GSO_ECN, 0))


def from_host(hdr: bytes, negotiated: int) -> bytes:
    """The header of a frame a TAP handed us (with IFF_VNET_HDR), as the switch's frames
    carry one: flags the driver may not get cleared (DATA_VALID without GUEST_CSUM), and
    nothing but flags unless it asks for a checksum."""
    flags = hdr[0] & (NEEDS_CSUM | DATA_VALID)
    if not negotiated & F_GUEST_CSUM:
        flags &= NEEDS_CSUM  # (and finished before it goes to the guest: `accepts`)
    if not flags & NEEDS_CSUM:
        return bytes([flags]) + bytes(HDR_SIZE - 1)
    return bytes([flags]) + bytes(hdr[1:HDR_SIZE])


def finish(frame: bytes, hdr: bytes) -> list[bytes]:
    """`frame` as complete frames: its checksum filled in, or the packet cut into
    `gso_size` segments (TCP) or fragments (UDP). Raises OffloadError for a GSO frame
    that is not one whole TCP/UDP packet (`check_tx` passes none such)."""
    flags, gso, _, gso_size, start, offset = HDR.unpack(hdr)
    if gso == GSO_NONE:
        out = bytearray(frame)
        if flags & NEEDS_CSUM:
            if start + offset + 2 > len(out):
                raise OffloadError(f"checksum at {start}+{offset} past the frame")
            finish_checksum(out, start, offset)
        return [bytes(out)]
    p, kind = _gso_packet(frame, gso, gso_size), gso & ~GSO_ECN
    if kind == GSO_UDP:
        pieces = -(-(p.end - p.l4) // (gso_size & ~7))
    else:
        pieces = -(-(p.end - p.payload) // gso_size)
    if pieces > MAX_SEGMENTS:
        raise OffloadError(f"{pieces} segments of {gso_size} bytes (at most {MAX_SEGMENTS})")
    if kind == GSO_UDP:
        return _fragment(frame, p, gso_size)
    return _segment(frame, p, gso_size)


def _segment(frame: bytes, p: Packet, mss: int) -> list[bytes]:
    """TCP segmentation: each segment the headers with its sequence number, lengths, IPv4
    ID and checksums; FIN and PSH on the last only, CWR on the first only."""
    head, body = frame[: p.payload], memoryview(frame)[p.payload : p.end]
    if len(body) <= mss:
        out = bytearray(frame)
        finish_checksum(out, p.l4, 16)
        return [bytes(out)]
    seq0 = int.from_bytes(head[p.l4 + 4 : p.l4 + 8], "big")
    ip_id = int.from_bytes(head[p.l3 + 4 : p.l3 + 6], "big")
    tcp_flags = head[p.l4 + 13]
    header_sum = None
    segs = []
    for i, off in enumerate(range(0, len(body), mss)):
        chunk = body[off : off + mss]
        last = off + mss >= len(body)
        h = bytearray(head)
        seg_len = p.l4len + len(chunk)
        if p.ipv6:
            struct.pack_into("!H", h, p.l3 + 4, seg_len)
        else:
            struct.pack_into("!HH", h, p.l3 + 2, p.l4 - p.l3 + seg_len, (ip_id + i) & 0xFFFF)
            _ipv4_checksum(h, p.l3)
        struct.pack_into("!I", h, p.l4 + 4, (seq0 + off) & 0xFFFFFFFF)
        h[p.l4 + 13] = tcp_flags & ~((_FIN | _PSH) if not last else 0) & ~(_CWR if i else 0)
        h[p.l4 + 16 : p.l4 + 18] = b"\0\0"
        if header_sum is None:
            header_sum = _pseudo(h, p)
        total = header_sum + seg_len + _sum(h[p.l4 :]) + _sum(chunk)
        struct.pack_into("!H", h, p.l4 + 16, _fold(total))
        segs.append(bytes(h) + chunk)
    return segs


def _fragment(frame: bytes, p: Packet, size: int) -> list[bytes]:
    """UDP fragmentation offload: the datagram's checksum filled in, then IP fragments of
    at most `size` bytes of it each (8-byte multiples but the last)."""
    whole = bytearray(frame)
    finish_checksum(whole, p.l4, 6)
    data = memoryview(whole)[p.l4 : p.end]
    step = size & ~7
    if len(data) <= size:
        return [bytes(whole)]
    l2 = bytes(whole[: p.l3])
    out = []
    if p.ipv6:
        ident = os.urandom(4)
        ip = bytearray(whole[p.l3 : p.l4])
        ip[6] = 44  # next header: a fragment header, then UDP
        for off in range(0, len(data), step):
            chunk = data[off : off + step]
            more = off + step < len(data)
            struct.pack_into("!H", ip, 4, 8 + len(chunk))
            frag = struct.pack("!BBH4s", _UDP, 0, off | more, ident)
            out.append(l2 + bytes(ip) + frag + bytes(chunk))
        return out
    ip = bytearray(whole[p.l3 : p.l4])
    for off in range(0, len(data), step):
        chunk = data[off : off + step]
        more = off + step < len(data)
        struct.pack_into("!H", ip, 2, len(ip) + len(chunk))
        struct.pack_into("!H", ip, 6, (more << 13) | (off >> 3))  # (DF cleared)
        _ipv4_checksum(ip, 0)
        out.append(l2 + bytes(ip) + bytes(chunk))
    return out
