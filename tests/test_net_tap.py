"""vhost-user-net --tap: each queue pair in a worker process of its own, on a queue of a
multi-queue TAP in a network namespace. The Python front-end plays the guest: it pings
the namespace's address from both pairs, and the kernel's echo replies come back on the
pair each request went out on (a multi-queue TAP sends a flow back on the queue it came
from). A RARP announcement goes straight out of the TAP."""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon
from qemu_net_helpers import Netns

from vhostuser.devices.net import F_MQ, F_MRG_RXBUF, parse_mac
from vhostuser.frontend.client import Frontend
from vhostuser.frontend.net import NetClient
from vhostuser.protocol import FrontendReq, ProtocolFeature, VirtioFeature
from vhostuser.protocol import payloads as p

TAP, TAP_IP = "vutap0", "192.0.2.1"
GUEST_MAC = "52:54:00:00:00:31"
GUEST_IPS = ["192.0.2.2", "192.0.2.3"]  # one per pair: two flows
FEATURES = (VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX | F_MRG_RXBUF | F_MQ)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def echo_request(dst_mac: bytes, src_ip: str, ident: int) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"vhost-user-net --tap"
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), ident, 0, 64, 1, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(TAP_IP))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return dst_mac + parse_mac(GUEST_MAC) + b"\x08\x00" + ip + icmp


@pytest.fixture
def netns() -> Iterator[tuple[Netns, bytes]]:
    with Netns("-tap") as ns:
        for key in ("all", "default"):
            ns.run("sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
        ns.run("ip", "tuntap", "add", "dev", TAP, "mode", "tap", "multi_queue")
        ns.run("ip", "addr", "add", f"{TAP_IP}/24", "dev", TAP)
        ns.run("ip", "link", "set", TAP, "up")
        for ip in GUEST_IPS:  # no ARP needed: the replies go straight out
            ns.run("ip", "neigh", "add", ip, "lladdr", GUEST_MAC, "dev", TAP)
        tap_mac = parse_mac(ns.run("cat", f"/sys/class/net/{TAP}/address").stdout.strip())
        yield ns, tap_mac


def test_each_pair_in_its_worker_on_its_tap_queue(netns: tuple[Netns, bytes],
                                                  tmp_path: Path) -> None:
    ns, tap_mac = netns
    sock = tmp_path / "net.sock"
    d = Daemon(["vhostuser.cli.net", "--socket-path", str(sock), "--tap", TAP, "--queues",
                "2", "--mac", GUEST_MAC], sock, tmp_path / "net.log",
               prefix=("ip", "netns", "exec", ns.name))
    try:
        with Frontend(d.sock) as fe:
            fe.negotiate(FEATURES, ProtocolFeature.MQ | ProtocolFeature.RARP
                         | ProtocolFeature.REPLY_ACK)
            assert fe.get_u64(FrontendReq.GET_QUEUE_NUM) == 2
            fe.set_mem_table()
            for q in range(4):
                fe.setup_queue(q, 64)
            pairs = [NetClient(fe, 0), NetClient(fe, 1)]
            assert len(d.children()) == 2, "not one worker per queue pair"
            for k, nic in enumerate(pairs):
                nic.send([echo_request(tap_mac, GUEST_IPS[k], 100 + k)])
            for k, nic in enumerate(pairs):
                (_, frame), = nic.recv(1, timeout=10)
                assert frame[:6] == parse_mac(GUEST_MAC) and frame[6:12] == tap_mac
                ip = frame[14:34]
                assert socket.inet_ntoa(ip[16:20]) == GUEST_IPS[k], f"pair {k}: {frame!r}"
                assert frame[34] == 0 and struct.unpack("!H", frame[38:40])[0] == 100 + k
            stats = ns.run("cat", f"/sys/class/net/{TAP}/statistics/rx_packets")
            assert int(stats.stdout) >= 2
            before = int(ns.run("cat", f"/sys/class/net/{TAP}/statistics/rx_packets").stdout)
            fe.call(FrontendReq.SEND_RARP, p.U64(int.from_bytes(parse_mac(GUEST_MAC),
                                                                "little")))
            after = int(ns.run("cat", f"/sys/class/net/{TAP}/statistics/rx_packets").stdout)
            assert after == before + 1, "the RARP announcement did not go out of the TAP"
    finally:
        assert d.stop() == 0, d.log()
        assert "Traceback" not in d.log(), d.log()


def test_a_single_queue_tap_refuses_pairs_clearly(netns: tuple[Netns, bytes],
                                                  tmp_path: Path) -> None:
    ns, _ = netns
    ns.run("ip", "tuntap", "add", "dev", "vutap1", "mode", "tap")
    out = ns.run(sys.executable, "-m",
                 "vhostuser.cli.net", "--socket-path", str(tmp_path / "x.sock"), "--tap",
                 "vutap1", "--queues", "2", check=False)
    assert out.returncode == 1, out
    assert "cannot attach TAP vutap1" in out.stderr and "multi_queue" in out.stderr, out.stderr


SEND_FLOWS = """
import socket, sys
for port in range(40000, 40000 + int(sys.argv[1])):
    t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    t.bind(("192.0.2.1", port))
    t.sendto(b"flow %d" % port, ("192.0.2.2", 9))
    t.close()
"""


def test_flows_to_a_guest_using_one_pair_of_two_all_arrive(netns: tuple[Netns, bytes],
                                                           tmp_path: Path) -> None:
    """--queues 2, but the guest runs only pair 0 (a one-vCPU Linux guest does): the host's
    flows must not land on the TAP queue nobody reads (it stays detached)."""
    ns, _ = netns
    sock = tmp_path / "net.sock"
    d = Daemon(["vhostuser.cli.net", "--socket-path", str(sock), "--tap", TAP, "--queues",
                "2", "--mac", GUEST_MAC], sock, tmp_path / "net.log",
               prefix=("ip", "netns", "exec", ns.name))
    try:
        with Frontend(d.sock) as fe:
            fe.negotiate(FEATURES, ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK)
            fe.set_mem_table()
            for q in range(2):
                fe.setup_queue(q, 256)
            nic = NetClient(fe, 0, rx_buffers=128)
            ns.run(sys.executable, "-c", SEND_FLOWS, "64")
            got = {frame[42:] for _, frame in nic.recv(64, timeout=10)}
            assert got == {b"flow %d" % p for p in range(40000, 40064)}
    finally:
        assert d.stop() == 0, d.log()
        assert "Traceback" not in d.log(), d.log()
