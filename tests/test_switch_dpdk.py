"""DPDK testpmd (virtio_user front-ends) on ports of our switch: flowgen on one, macswap
on the other, every packet accounted for on both sides and in the switch; and testpmd's
csum engine asking for checksum and TCP segmentation offloads on frames the switch then
hands to a TAP device, whose kernel checks them."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon import Daemon
from dpdk import Testpmd
from qemu_net_helpers import Netns, SwitchDaemon
from test_switch import COMPILED, Sw

RUN_SECONDS = 2.0


@pytest.fixture
def running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            ) -> Iterator[Callable[[str, bool], tuple[Sw, Testpmd, Testpmd]]]:
    made: list[object] = []

    def start(devargs: str, compiled: bool) -> tuple[Sw, Testpmd, Testpmd]:
        monkeypatch.setenv("VHOSTUSER_JIT", "1" if compiled else "0")
        paths = [str(tmp_path / f"p{i}.sock") for i in range(2)]
        ctl = str(tmp_path / "ctl")
        d = Daemon(["vhostuser.cli.switch", "--control", ctl, "--port", paths[0],
                    "--port", paths[1]], Path(paths[1]), tmp_path / "switch.log")
        made.append(d)
        sw = Sw(d, paths, ctl)
        b = Testpmd.virtio_user(paths[1], devargs=devargs, forward_mode="macswap", cpu=1,
                                name="macswap", log_path=tmp_path / "macswap.log")
        made.append(b)
        a = Testpmd.virtio_user(paths[0], devargs=devargs, forward_mode="flowgen", cpu=1,
                                name="flowgen", testpmd_args=["--txpkts=64"],
                                log_path=tmp_path / "flowgen.log")
        made.append(a)
        return sw, a, b

    yield start
    for m in reversed(made):
        if isinstance(m, Testpmd):
            m.close()
    for m in made:
        if isinstance(m, Daemon):
            assert m.stop() == 0, m.log()
            assert "Traceback" not in m.log(), m.log()
            compiled = os.environ["VHOSTUSER_JIT"] == "1"
            assert (COMPILED in m.log()) == compiled, m.log()


def settled(sw: Sw) -> dict:
    """Switch counters once they stop moving."""
    last = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        st = sw.stats()
        counts = [(p["rx_packets"], p["tx_packets"], sorted(p["drops"].items()))
                  for p in st["ports"]]
        if counts == last:
            return st
        last = counts
        time.sleep(0.3)
    raise AssertionError("switch counters never settled")


IN_ORDER, RING_PACKED = 1 << 35, 1 << 34


@pytest.mark.parametrize(("devargs", "compiled"), [
    ("", False), ("mrg_rxbuf=0,in_order=0", False), ("queue_size=256", False),
    ("packed_vq=1", False), ("packed_vq=1,in_order=0,mrg_rxbuf=0", False),
    # the compiled kernels, on either ring layout
    ("", True), ("mrg_rxbuf=0,in_order=0", True), ("queue_size=256", True),
    ("packed_vq=1", True), ("packed_vq=1,in_order=0,mrg_rxbuf=0", True)])
def test_flowgen_macswap_through_the_switch(
        running: Callable[[str, bool], tuple[Sw, Testpmd, Testpmd]], devargs: str,
        compiled: bool) -> None:
    sw, a, b = running(devargs, compiled)
    a.wait_link_up()
    b.wait_link_up()
    b.start()
    a.start()
    time.sleep(RUN_SECONDS)
    a.stop()  # flowgen stops sending...
    a.set_forward_mode("rxonly")  # ...and keeps receiving until everything has arrived
    a.start()
    settled(sw)
    b.wait_settled()
    a.wait_settled()
    b.stop()
    a.stop()
    st = settled(sw)
    for port in st["ports"]:  # what virtio_user negotiated (IN_ORDER is its default)
        features = int(port["features"], 16)
        assert bool(features & RING_PACKED) == ("packed_vq=1" in devargs), port
        assert bool(features & IN_ORDER) == ("in_order=0" not in devargs), port
    pa, pb = a.port_stats()[0], b.port_stats()[0]
    s0, s1 = st["ports"][0], st["ports"][1]
    assert pa.tx_packets > 1000 and pb.rx_packets > 0 and pa.rx_packets > 0, (pa, pb, st)

    def lost(port: dict) -> int:  # frames the switch could not hand to this port
        return sum(n for why, n in port["drops"].items() if why != "to_ingress_port")

    # flowgen -> switch port 0 -> switch port 1 -> macswap
    assert s0["rx_packets"] == pa.tx_packets, (s0, pa)
    assert s1["tx_packets"] + lost(s1) == s0["rx_packets"] - s0["drops"].get("to_ingress_port", 0)
    assert pb.rx_packets == s1["tx_packets"], (pb, s1)
    # macswap -> switch port 1 -> switch port 0 -> flowgen
    assert s1["rx_packets"] == pb.tx_packets, (s1, pb)
    assert s0["tx_packets"] + lost(s0) == s1["rx_packets"] - s1["drops"].get("to_ingress_port", 0)
    assert pa.rx_packets == s0["tx_packets"], (pa, s0)
    # bytes agree too (the switch counts frames without the virtio-net header)
    assert s0["rx_bytes"] == pa.tx_bytes and s1["tx_bytes"] == pb.rx_bytes
    # the switch learned flowgen's and macswap's addresses on the right ports
    assert {m["port"] for m in st["macs"]} == {"port0", "port1"}


TAP, TAP_IP, PEER_IP = "vuc0", "192.0.2.1", "192.0.2.30"
DATAGRAMS, TCP_PAYLOAD, MSS = 50, 1400, 500
PROBE = Path(__file__).with_name("tap_checksum_probe.py")


def test_testpmd_csum_engine_offloads_reach_the_tap_finished(tmp_path: Path) -> None:
    """Frames from the namespace go out of the TAP with wrong UDP/TCP checksums; testpmd's
    csum engine (UDP and TCP checksums in "hw", TSO at 500) sends them back through the
    switch with NEEDS_CSUM (and GSO for the 1400-byte segment), which the switch finishes
    in software for the TAP. The namespace's kernel delivers a datagram only if its
    checksum is right, and answers each TCP segment with a RST only if its checksum is."""
    sock = tmp_path / "p0.sock"
    with Netns("-csum") as ns:
        for key in ("all", "default"):
            ns.run("sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
        ns.run("ip", "tuntap", "add", "dev", TAP, "mode", "tap")
        ns.run("ip", "addr", "add", f"{TAP_IP}/24", "dev", TAP)
        ns.run("ip", "link", "set", TAP, "up")
        tap_mac = ns.run("cat", f"/sys/class/net/{TAP}/address").stdout.strip()
        with SwitchDaemon(tmp_path, [str(sock)], tap=TAP, netns=ns.name) as switch:
            with Testpmd.virtio_user(sock, forward_mode="csum", cpu=1, name="csum",
                                     testpmd_args=[f"--eth-peer=0,{tap_mac}",
                                                   "--tx-offloads=0x2c"],
                                     log_path=tmp_path / "csum.log") as tp:
                for cmd in ("port stop 0", "csum set ip sw 0", "csum set udp hw 0",
                            "csum set tcp hw 0", f"tso set {MSS} 0", "port start 0"):
                    tp.command(cmd)
                tp.wait_link_up()
                tp.start()
                probe = ns.run(sys.executable, str(PROBE), TAP, TAP_IP, PEER_IP,
                               str(DATAGRAMS), str(TCP_PAYLOAD), str(MSS), timeout=60)
                fwd = tp.stop()
                stats = switch.stats()
            assert switch.stop() == 0, switch.describe()
    got = json.loads(probe.stdout)
    counts = {k: v if isinstance(v, int) else len(v) for k, v in got.items()}
    ctx = f"\n{counts}\n{json.dumps(stats, indent=1)}\n{fwd}"
    port, tap = stats["ports"][0], stats["ports"][1]
    assert int(port["features"], 16) & 0x801 == 0x801, ctx  # CSUM, HOST_TSO4 negotiated
    assert sorted(got["received"]) == sorted(got["sent"]), ctx
    assert got["UdpInCsumErrors"] == 0 and got["UdpInDatagrams"] == DATAGRAMS, ctx
    segments = -(-TCP_PAYLOAD // MSS)
    assert got["TcpInCsumErrors"] == 0 and got["TcpOutRsts"] == segments, ctx
    assert port["offloads"] == {"rx_csum": DATAGRAMS, "rx_gso": 1}, ctx
    assert tap["offloads"] == {"checksummed": DATAGRAMS, "segmented": 1,
                               "segments": segments}, ctx
