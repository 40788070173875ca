"""The switch's software offloads (devices/net_offload.py) against RFC 1071's checksum as
written here, independently, byte pair by byte pair, and against the packet rules they
must keep: TCP segmentation (RFC 793/9293 sequence numbers and flags, IPv4 IDs and
lengths) and IP fragmentation (RFC 791, RFC 8200's fragment header) of what Linux guests
send. Every guest header is hostile too: seeded random headers and frames either pass
`check_tx` and then finish into valid frames, or raise OffloadError, never anything else.
The end-to-end proof, Linux checking every checksum, is test_qemu_net_offload.py."""

from __future__ import annotations

import random
import struct

import pytest
from fuzz_memory import seed

from vhostuser.devices.net_offload import (
    DATA_VALID,
    F_CSUM,
    F_GUEST_CSUM,
    F_GUEST_ECN,
    F_GUEST_TSO4,
    F_HOST_ECN,
    F_HOST_TSO4,
    F_HOST_TSO6,
    F_HOST_UFO,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    HDR,
    NEEDS_CSUM,
    OffloadError,
    accepts,
    check_tx,
    finish,
    from_host,
)

ALL_TX = F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_ECN | F_HOST_UFO
ETH = bytes.fromhex("525400000002525400000001")
SRC4, DST4 = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
SRC6 = bytes.fromhex("20010db8" + "00" * 11 + "01")
DST6 = bytes.fromhex("20010db8" + "00" * 11 + "02")


def rfc1071(data: bytes) -> int:
    """The ones' complement of the ones' complement sum of 16-bit words (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + bytes([0, proto]) + length.to_bytes(2, "big")
    return src + dst + length.to_bytes(4, "big") + bytes([0, 0, 0, proto])


def partial_seed(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    """What a Linux guest leaves in the checksum field for NEEDS_CSUM: the pseudo-header's
    sum, not complemented."""
    return (~rfc1071(pseudo(src, dst, proto, length)) & 0xFFFF).to_bytes(2, "big")


def tcp_frame(v6: bool, payload: bytes, flags: int = 0x18, options: bytes = b"",
              vlan: bool = False, seq: int = 1000, ip_id: int = 7) -> bytes:
    """A frame as Linux hands one to a NIC with TSO: lengths of the whole, the TCP checksum
    field seeded with the pseudo-header sum."""
    proto = 6
    doff = (20 + len(options)) // 4
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 5000, seq, 77, doff << 4, flags, 502,
                                0, 0) + options)
    l4len = len(tcp) + len(payload)
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    tcp[16:18] = partial_seed(src, dst, proto, l4len)
    if v6:
        ip = struct.pack("!IHBB", 6 << 28, l4len, proto, 64) + src + dst
        etype = b"\x86\xdd"
    else:
        ip4 = bytearray(struct.pack("!BBHHHBBH", 0x45, 0, 20 + l4len, ip_id, 0x4000, 64,
                                    proto, 0) + src + dst)
        ip4[10:12] = rfc1071(bytes(ip4)).to_bytes(2, "big")
        ip, etype = bytes(ip4), b"\x08\x00"
    tag = b"\x81\x00\x00\x05" if vlan else b""
    return ETH + tag + etype + ip + bytes(tcp) + payload


def udp_frame(v6: bool, payload: bytes) -> bytes:
    length = 8 + len(payload)
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    udp = bytearray(struct.pack("!HHHH", 4000, 4001, length, 0))
    udp[6:8] = partial_seed(src, dst, 17, length)
    if v6:
        ip = struct.pack("!IHBB", 6 << 28, length, 17, 64) + src + dst
        return ETH + b"\x86\xdd" + ip + bytes(udp) + payload
    ip4 = bytearray(struct.pack("!BBHHHBBH", 0x45, 0, 20 + length, 99, 0, 64, 17, 0)
                    + src + dst)
    ip4[10:12] = rfc1071(bytes(ip4)).to_bytes(2, "big")
    return ETH + b"\x08\x00" + bytes(ip4) + bytes(udp) + payload


def l3_at(frame: bytes) -> int:
    return 18 if frame[12:14] == b"\x81\x00" else 14


def check_tcp_segment(seg: bytes, v6: bool) -> tuple[int, int, bytes]:
    """The segment's checksums verified from scratch; returns (seq, flags, payload)."""
    l3 = l3_at(seg)
    if v6:
        plen = int.from_bytes(seg[l3 + 4 : l3 + 6], "big")
        assert l3 + 40 + plen == len(seg)
        l4, src, dst = l3 + 40, seg[l3 + 8 : l3 + 24], seg[l3 + 24 : l3 + 40]
    else:
        ihl = (seg[l3] & 15) * 4
        assert int.from_bytes(seg[l3 + 2 : l3 + 4], "big") == len(seg) - l3
        assert rfc1071(seg[l3 : l3 + ihl]) == 0, "bad IPv4 header checksum"
        l4, src, dst = l3 + ihl, seg[l3 + 12 : l3 + 16], seg[l3 + 16 : l3 + 20]
    tcp = seg[l4:]
    assert rfc1071(pseudo(src, dst, 6, len(tcp)) + tcp) == 0, "bad TCP checksum"
    doff = (tcp[12] >> 4) * 4
    return int.from_bytes(tcp[4:8], "big"), tcp[13], tcp[doff:]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("vlan", [False, True], ids=["untagged", "vlan"])
@pytest.mark.parametrize("size", [1, 1448, 1449, 65000 - 32])
def test_tcp_segmentation(v6: bool, vlan: bool, size: int) -> None:
    rng = random.Random(seed() + size)
    payload = rng.randbytes(size)
    options = bytes.fromhex("0101080a0000000100000002")  # NOP NOP timestamps, as Linux
    frame = tcp_frame(v6, payload, flags=0x80 | 0x18 | 0x01, options=options, vlan=vlan,
                      seq=0xFFFFF000)  # CWR PSH ACK FIN; the sequence wraps
    l3 = l3_at(frame)
    l4 = l3 + (40 if v6 else 20)
    hdr = HDR.pack(NEEDS_CSUM, (GSO_TCPV6 if v6 else GSO_TCPV4) | GSO_ECN, 0, 1448, l4, 16)
    segs = finish(frame, check_tx(hdr, frame, ALL_TX))
    assert len(segs) == -(-size // 1448)
    got = b""
    for i, seg in enumerate(segs):
        seq, flags, data = check_tcp_segment(seg, v6)
        assert seq == (0xFFFFF000 + len(got)) & 0xFFFFFFFF
        last = i == len(segs) - 1
        assert flags == (0x10 | (0x80 if i == 0 else 0) | (0x09 if last else 0)), hex(flags)
        assert len(data) == (1448 if not last else size - 1448 * i)
        assert seg[: l3] == frame[: l3]  # Ethernet (and the tag) as they were
        if not v6:  # IDs count up from the frame's, DF kept
            assert int.from_bytes(seg[l3 + 4 : l3 + 6], "big") == 7 + i
            assert seg[l3 + 6] & 0x40
        got += data
    assert got == payload


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_checksum_only(v6: bool) -> None:
    for size in (0, 1, 2, 3, 1000, 1459):
        frame = tcp_frame(v6, random.Random(size).randbytes(size))
        l4 = 14 + (40 if v6 else 20)
        (done,) = finish(frame, check_tx(HDR.pack(NEEDS_CSUM, GSO_NONE, 0, 0, l4, 16),
                                         frame, F_CSUM))
        check_tcp_segment(done, v6)
        assert done[:l4 + 16] == frame[:l4 + 16] and done[l4 + 18:] == frame[l4 + 18:]


def test_udp_checksum_is_never_zero() -> None:
    """RFC 768: a computed 0 goes out as 0xffff (0 says "no checksum")."""
    base = udp_frame(False, b"\0\0")
    for x in range(0x10000):  # two payload bytes that make the sum come out at 0
        frame = base[:-2] + x.to_bytes(2, "big")
        (done,) = finish(frame, check_tx(HDR.pack(NEEDS_CSUM, 0, 0, 0, 34, 6), frame,
                                         F_CSUM))
        if rfc1071(pseudo(SRC4, DST4, 17, 10) + done[34:40] [:6] + bytes(2) + done[42:]) == 0:
            assert done[40:42] == b"\xff\xff"
            return
    pytest.fail("no payload made the sum 0")


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_udp_fragmentation(v6: bool) -> None:
    payload = random.Random(5).randbytes(4000)
    frame = udp_frame(v6, payload)
    l4 = 14 + (40 if v6 else 20)
    hdr = HDR.pack(NEEDS_CSUM, GSO_UDP, 0, 1476, l4, 6)
    frags = finish(frame, check_tx(hdr, frame, ALL_TX))
    datagram = b""
    ids = set()
    for i, f in enumerate(frags):
        more = i < len(frags) - 1
        if v6:
            assert f[20] == 44  # a fragment header follows the IPv6 header
            nh, _, offm, ident = struct.unpack("!BBH4s", f[54:62])
            assert nh == 17 and offm & 1 == more and offm & ~7 == len(datagram)
            assert int.from_bytes(f[18:20], "big") == len(f) - 54
            ids.add(ident)
            part = f[62:]
        else:
            assert rfc1071(f[14:34]) == 0
            fo = int.from_bytes(f[20:22], "big")
            assert bool(fo & 0x2000) == more and (fo & 0x1FFF) * 8 == len(datagram)
            assert int.from_bytes(f[16:18], "big") == len(f) - 14
            ids.add(f[18:20])
            part = f[34:]
        assert len(part) <= 1476 and (not more or len(part) % 8 == 0)
        datagram += part
    assert len(ids) == 1
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    assert rfc1071(pseudo(src, dst, 17, len(datagram)) + datagram) == 0
    assert datagram[8:] == payload


def test_headers_that_lie_are_refused() -> None:
    frame = tcp_frame(False, bytes(3000))
    tso = GSO_TCPV4
    cases = {
        "not negotiated": (HDR.pack(NEEDS_CSUM, tso, 0, 1448, 34, 16), F_CSUM),
        "no checksum offload": (HDR.pack(NEEDS_CSUM, 0, 0, 0, 34, 16), 0),
        "GSO without NEEDS_CSUM": (HDR.pack(0, tso, 0, 1448, 34, 16), ALL_TX),
        "ECN not negotiated": (HDR.pack(NEEDS_CSUM, tso | GSO_ECN, 0, 1448, 34, 16),
                               F_CSUM | F_HOST_TSO4),
        "checksum past the end": (HDR.pack(NEEDS_CSUM, 0, 0, 0, len(frame) - 1, 0), ALL_TX),
        "TCPv6 on IPv4": (HDR.pack(NEEDS_CSUM, GSO_TCPV6, 0, 1448, 34, 16), ALL_TX),
        "UDP on TCP": (HDR.pack(NEEDS_CSUM, GSO_UDP, 0, 1448, 34, 6), ALL_TX),
        "MSS 1": (HDR.pack(NEEDS_CSUM, tso, 0, 1, 34, 16), ALL_TX),
        "MSS 0": (HDR.pack(NEEDS_CSUM, tso, 0, 0, 34, 16), ALL_TX),
        "checksum not at TCP's": (HDR.pack(NEEDS_CSUM, tso, 0, 1448, 34, 6), ALL_TX),
        "start not at L4": (HDR.pack(NEEDS_CSUM, tso, 0, 1448, 30, 16), ALL_TX),
        "unknown GSO type": (HDR.pack(NEEDS_CSUM, 2, 0, 1448, 34, 16), ALL_TX),
    }
    for what, (hdr, features) in cases.items():
        with pytest.raises(OffloadError):
            check_tx(hdr, frame, features)
            pytest.fail(what)
    hdr = HDR.pack(NEEDS_CSUM, tso, 0, 1448, 34, 16)
    for what, bad in {"truncated": frame[:-1], "trailing bytes": frame + b"\0",
                      "IPv4 fragment": frame[:20] + b"\x20\x00" + frame[22:],
                      "not IP": frame[:12] + b"\x08\x06" + frame[14:],
                      "TCP header under 20 bytes": frame[:46] + b"\x40" + frame[47:]}.items():
        with pytest.raises(OffloadError):
            check_tx(hdr, bad, ALL_TX)
            pytest.fail(what)
    big = tcp_frame(False, bytes(60000))  # carried whole at any MSS, cut at 256 at most:
    vnet = check_tx(HDR.pack(NEEDS_CSUM, tso, 0, 48, 34, 16), big, ALL_TX)
    with pytest.raises(OffloadError, match="segments"):  # 1250 segments of 48 bytes
        finish(big, vnet)
    assert len(finish(big, check_tx(HDR.pack(NEEDS_CSUM, tso, 0, 536, 34, 16), big,
                                    ALL_TX))) == 112
    with pytest.raises(OffloadError, match="Ethernet header"):  # would rewrite the MACs
        check_tx(HDR.pack(NEEDS_CSUM, GSO_NONE, 0, 0, 6, 0), frame, ALL_TX)
    with_options = bytearray(udp_frame(False, bytes(3000)))
    with_options[14] = 0x46  # an IPv4 header of 24 bytes: options copied to no fragment
    with_options[34:34] = bytes(4)
    with_options[16:18] = (int.from_bytes(with_options[16:18], "big") + 4).to_bytes(2, "big")
    with pytest.raises(OffloadError, match="options"):
        check_tx(HDR.pack(NEEDS_CSUM, GSO_UDP, 0, 1472, 38, 6), bytes(with_options), ALL_TX)
    short = tcp_frame(False, bytes(10))
    with pytest.raises(OffloadError):  # a 60-byte TCP header in 30 bytes
        check_tx(hdr, short[:46] + b"\xf0" + short[47:], ALL_TX)


def test_random_headers_and_frames() -> None:
    """Hostile guests: whatever the header and frame, OffloadError or complete frames,
    each no longer than the original's headers plus an MSS."""
    rng = random.Random(seed())
    good = [tcp_frame(False, bytes(3000)), tcp_frame(True, bytes(3000)),
            udp_frame(False, bytes(3000)), udp_frame(True, bytes(2000))]
    accepted = 0
    for _ in range(20000):
        frame = bytearray(rng.choice(good))
        for _ in range(rng.randrange(4)):  # a few bytes changed, or cut short
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        if rng.random() < 0.2:
            frame = frame[: rng.randrange(len(frame))]
        gso = rng.choice([GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP, 2, 5, 0x81, 0x84, 0xFF])
        start = rng.choice([34, 54, 38, rng.randrange(65536)])
        hdr = HDR.pack(rng.choice([0, 1, 2, 3, 0xFF]), gso, rng.randrange(65536),
                       rng.choice([0, 1, 47, 48, 536, 1448, rng.randrange(65536)]),
                       start, rng.choice([6, 16, rng.randrange(65536)]))
        try:
            vnet = check_tx(hdr, bytes(frame), ALL_TX)
        except OffloadError:
            continue
        accepted += 1
        try:
            done = finish(bytes(frame), vnet)
        except OffloadError as e:  # only for too many pieces
            assert "segments" in str(e), e
            continue
        for out in done:
            assert len(out) <= max(len(frame), 18 + 60 + 60 + 65535)
    assert accepted > 1000


def test_a_segment_with_cwr_is_an_ecn_frame() -> None:
    """CWR in a GSO frame's TCP header makes it an ECN frame whatever the header says: a
    receiver without GUEST_ECN must not get it whole."""
    frame = tcp_frame(False, bytes(3000), flags=0x80 | 0x10)
    hdr = HDR.pack(NEEDS_CSUM, GSO_TCPV4, 0, 1448, 34, 16)
    for features in (ALL_TX, F_CSUM | F_HOST_TSO4):  # (a driver without HOST_ECN too)
        vnet = check_tx(hdr, frame, features)
        assert vnet[1] == GSO_TCPV4 | GSO_ECN
        assert not accepts(vnet, F_GUEST_CSUM | F_GUEST_TSO4)
        assert accepts(vnet, F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_ECN)


def test_what_a_tap_hands_over_is_kept_to_what_the_guest_takes() -> None:
    """From a TAP (IFF_VNET_HDR): DATA_VALID only for a guest with GUEST_CSUM; a header
    without NEEDS_CSUM carries nothing else; a TCP GSO header on a UDP packet, or a packet
    the switch would cut into more than 256 pieces, is refused, not cut."""
    valid = HDR.pack(DATA_VALID, GSO_TCPV4, 54, 1448, 0, 0)
    assert from_host(valid, F_GUEST_CSUM) == HDR.pack(DATA_VALID, 0, 0, 0, 0, 0)
    assert from_host(valid, 0) == bytes(10)
    udp = udp_frame(False, bytes(3000))
    with pytest.raises(OffloadError):
        finish(udp, HDR.pack(NEEDS_CSUM, GSO_TCPV4, 0, 1448, 34, 16))
    with pytest.raises(OffloadError):
        finish(tcp_frame(False, bytes(60000)), HDR.pack(NEEDS_CSUM, GSO_TCPV4, 0, 48, 34, 16))
