"""Run inside a network namespace by test_switch_dpdk.py: send frames out of a TAP device
with AF_PACKET (UDP datagrams to this namespace's own address, and one TCP segment to a
closed port, each with a wrong checksum on purpose), then wait for what comes back in
through the TAP: the datagrams, delivered only if their checksums are right, and the TCP
RSTs the kernel sends for segments whose checksums are right. Prints one JSON line.

    python tap_checksum_probe.py IFNAME LOCAL_IP PEER_IP COUNT TCP_PAYLOAD MSS
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

UDP_PORT, TCP_PORT = 4001, 5999  # (nothing listens on the TCP port: RSTs answer)
SRC_MAC, DST_MAC = bytes.fromhex("020000000077"), b"\xff" * 6


def snmp() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/net/snmp") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        proto, *keys = names.split()
        for k, v in zip(keys, values.split()[1:], strict=True):
            out[proto.rstrip(":") + k] = int(v)
    return out


def ip_header(proto: int, length: int, src: bytes, dst: bytes) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 1, 0x4000, 64, proto,
                                0, src, dst))
    s = sum(struct.unpack("!10H", hdr))
    s = (s & 0xFFFF) + (s >> 16)
    hdr[10:12] = struct.pack("!H", ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF)
    return bytes(hdr)


def main() -> None:
    ifname, local, peer, count, tcp_payload, mss = sys.argv[1:7]
    segments = -(-int(tcp_payload) // int(mss))
    src, dst = socket.inet_aton(peer), socket.inet_aton(local)
    before = snmp()
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind((local, UDP_PORT))
    rx.settimeout(10)
    out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    out.bind((ifname, 0))
    eth = DST_MAC + SRC_MAC + b"\x08\x00"
    sent = []
    for i in range(int(count)):
        data = f"datagram {i} ".encode().ljust(200, b".")
        udp = struct.pack("!HHHH", 4000, UDP_PORT, 8 + len(data), 0x1234) + data
        out.send(eth + ip_header(17, len(udp), src, dst) + udp)
        sent.append(data.decode())
    payload = bytes(range(256)) * (int(tcp_payload) // 256 + 1)
    tcp = struct.pack("!HHIIBBHHH", 40000, TCP_PORT, 1, 0, 5 << 4, 0x18, 500, 0x1234, 0)
    tcp += payload[: int(tcp_payload)]
    out.send(eth + ip_header(6, len(tcp), src, dst) + tcp)
    got = []
    try:
        while len(got) < len(sent):
            got.append(rx.recv(2048).decode())
    except TimeoutError:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the RSTs for the segments
        now = snmp()
        if now["TcpOutRsts"] - before["TcpOutRsts"] + now["TcpInCsumErrors"] \
                - before["TcpInCsumErrors"] >= segments:
            break
        time.sleep(0.05)
    after = snmp()
    print(json.dumps({
        "sent": sent, "received": got,
        **{k: after[k] - before[k] for k in ("UdpInDatagrams", "UdpInCsumErrors",
                                              "TcpInSegs", "TcpInCsumErrors", "TcpOutRsts")},
    }))


if __name__ == "__main__":
    main()
