"""vhost-user-switch driven by Python front-ends over real sockets: forwarding rules,
bad frames, virtio-net header and MRG_RXBUF handling, control messages, reconnects."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from daemon import Daemon, Program
from test_net_offload import check_tcp_segment, tcp_frame

from vhostuser.devices.net import F_MRG_RXBUF
from vhostuser.devices.net_frames import Frames
from vhostuser.devices.net_offload import (
    F_CSUM,
    F_GUEST_CSUM,
    F_GUEST_TSO4,
    F_HOST_TSO4,
    GSO_NONE,
    GSO_TCPV4,
    HDR,
    NEEDS_CSUM,
)
from vhostuser.frontend.client import Frontend
from vhostuser.frontend.net import NetClient
from vhostuser.protocol import FrontendReq, ProtocolFeature, VirtioFeature
from vhostuser.protocol import payloads as p
from vhostuser.switch.port import Port

VF = VirtioFeature
NET = VF.VERSION_1 | VF.RING_EVENT_IDX | VF.RING_INDIRECT_DESC | F_MRG_RXBUF
MAC = [bytes([2, 0, 0, 0, 0, i]) for i in range(8)]
BCAST = b"\xff" * 6


def frame(dst: bytes, src: bytes, payload: bytes = b"x" * 46, etype: bytes = b"\x08\x00") -> bytes:
    return dst + src + etype + payload


class Sw:
    def __init__(self, d: Daemon, paths: list[str], ctl: str) -> None:
        self.d, self.paths, self.ctl = d, paths, ctl

    def port(self, i: int, features: int = NET, pairs: int = 1, **kw: int) -> NetClient:
        fe = Frontend(self.paths[i])
        fe.negotiate(features)
        fe.set_mem_table()
        for q in range(2 * pairs):
            fe.setup_queue(q, 256)
        return NetClient(fe, **kw)

    def stats(self) -> dict:
        out = subprocess.run([sys.executable, "-m", "vhostuser.cli.switch", "stats",
                              "--control", self.ctl], capture_output=True, text=True,
                             check=True, timeout=30).stdout
        return json.loads(out)

    def port_stats(self, i: int) -> dict:
        return self.stats()["ports"][i]


COMPILED = "frames taken, switched and delivered by the compiled kernels"  # its log says


@pytest.fixture(params=["python", "compiled"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The switch daemons a test starts run pure Python or with the compiled kernels
    (VHOSTUSER_JIT=1; numba is a test dependency)."""
    monkeypatch.setenv("VHOSTUSER_JIT", "1" if request.param == "compiled" else "0")
    return str(request.param)


@pytest.fixture
def switch(tmp_path: Path, mode: str) -> Iterator[Callable[..., Sw]]:
    started: list[Daemon] = []

    def start(nports: int = 3, *extra: str, port_opts: str = "") -> Sw:
        paths = [str(tmp_path / f"p{i}.sock") for i in range(nports)]
        ctl = str(tmp_path / "ctl")
        args = ["vhostuser.cli.switch", "--control", ctl, *extra]
        for path in paths:
            args += ["--port", path + port_opts]
        d = Daemon(args, Path(paths[-1]), tmp_path / "switch.log")
        started.append(d)
        return Sw(d, paths, ctl)

    yield start
    for d in started:
        assert d.stop() == 0, d.log()
        assert "Traceback" not in d.log(), d.log()
        assert (COMPILED in d.log()) == (mode == "compiled"), d.log()


def nothing(n: NetClient, timeout: float = 0.3) -> bool:
    try:
        n.recv(1, timeout)
    except TimeoutError:
        return True
    return False


def test_learning_flooding_and_no_hairpin(switch: Callable[..., Sw]) -> None:
    sw = switch(3)
    a, b, c = (sw.port(i) for i in range(3))
    a.send([frame(MAC[2], MAC[1], b"first".ljust(46))])  # unknown destination: flooded
    assert b.recv()[0][1][14:19] == b"first"
    assert c.recv()[0][1][14:19] == b"first"
    b.send([frame(MAC[1], MAC[2], b"answer".ljust(46))])  # MAC[1] learned at port 0
    hdr, f = a.recv()[0]
    assert f[14:20] == b"answer" and hdr == bytes(12)[:10] + b"\x01\x00"  # num_buffers 1
    assert nothing(c)  # known unicast goes to its port only
    a.send([frame(MAC[2], MAC[1])])
    assert len(b.recv()) == 1 and nothing(c)
    a.send([frame(BCAST, MAC[1]), frame(b"\x01\x00\x5e\x00\x00\x01", MAC[1])])
    assert len(b.recv(2)) == 2 and len(c.recv(2)) == 2
    assert nothing(a)  # never back out of the ingress port
    a.send([frame(MAC[1], MAC[1])])  # destination lives on the ingress port
    assert nothing(b) and nothing(c)
    st = sw.stats()
    assert st["ports"][0]["drops"] == {"to_ingress_port": 1}
    assert st["ports"][0]["rx_packets"] == 5 and st["ports"][1]["tx_packets"] == 4
    assert {m["mac"]: m["port"] for m in st["macs"]} == {
        "02:00:00:00:00:01": "port0", "02:00:00:00:00:02": "port1"}


def test_aging(switch: Callable[..., Sw]) -> None:
    sw = switch(3, "--aging", "0.5")
    a, b, c = (sw.port(i) for i in range(3))
    b.send([frame(BCAST, MAC[2])])
    a.recv(), c.recv()
    a.send([frame(MAC[2], MAC[1])])
    assert len(b.recv()) == 1 and nothing(c)
    time.sleep(1.2)  # MAC[2] forgotten: flooded again
    a.send([frame(MAC[2], MAC[1])])
    assert len(b.recv()) == 1 and len(c.recv()) == 1


def test_bad_frames_are_dropped_and_counted(switch: Callable[..., Sw]) -> None:
    sw = switch(2)
    a, b = sw.port(0), sw.port(1)
    a.send([frame(BCAST, MAC[1])[:13]])  # runt
    a.send([frame(BCAST, MAC[1], b"y" * 1600)])  # over the 1500 MTU
    a.send([frame(BCAST, b"\x01" + MAC[1][1:])])  # multicast source
    a.send([frame(BCAST, MAC[1])], header=b"\x01" + bytes(11))  # NEEDS_CSUM: not offered
    a.send([frame(BCAST, MAC[1])], header=b"\x00\x01" + bytes(10))  # GSO TCPv4: not offered
    a.send([frame(BCAST, MAC[1], b"ok".ljust(1486))])  # a full-size frame passes
    (_, f), = b.recv()
    assert f[14:16] == b"ok" and len(f) == 1500
    assert nothing(b)
    st = sw.port_stats(0)
    assert st["drops"] == {"runt": 1, "oversize": 1, "bad_source_mac": 1, "bad_header": 2}
    assert st["rx_packets"] == 1


def test_mergeable_rx_buffers(switch: Callable[..., Sw]) -> None:
    sw = switch(2, port_opts=",mtu=9000")
    a, b = sw.port(0), sw.port(1, buf_size=1024)
    big = frame(BCAST, MAC[1], bytes(range(256)) * 20)  # 5134 bytes: 6 buffers of 1 KiB
    a.send([big, frame(BCAST, MAC[1])])
    got = b.recv(2)
    assert got[0][1] == big
    assert struct.unpack_from("<H", got[0][0], 10)[0] == 6  # num_buffers
    assert got[1][1] == frame(BCAST, MAC[1])


def test_small_buffers_without_mrg_rxbuf(switch: Callable[..., Sw]) -> None:
    sw = switch(2, port_opts=",mtu=9000")
    a = sw.port(0)
    b = sw.port(1, features=NET & ~F_MRG_RXBUF, buf_size=1024)
    a.send([frame(BCAST, MAC[1], bytes(3000)), frame(BCAST, MAC[1])])
    (hdr, f), = b.recv()
    assert len(hdr) == 12 and f == frame(BCAST, MAC[1])  # VERSION_1: 12-byte header
    assert nothing(b)
    assert sw.port_stats(1)["drops"] == {"rx_buffer_too_small": 1}


def test_legacy_ten_byte_header(switch: Callable[..., Sw]) -> None:
    sw = switch(2)
    legacy = VF.RING_EVENT_IDX | VF.RING_INDIRECT_DESC  # no VERSION_1, no MRG_RXBUF
    a, b = sw.port(0, features=legacy), sw.port(1, features=legacy)
    assert a.hdr_len == 10
    a.send([frame(BCAST, MAC[1], b"ten".ljust(46))])
    (hdr, f), = b.recv()
    assert len(hdr) == 10 and f[14:17] == b"ten"


def test_no_rx_buffers_counts_drops(switch: Callable[..., Sw]) -> None:
    sw = switch(2)
    a, b = sw.port(0), sw.port(1, rx_buffers=2)
    a.send([frame(BCAST, MAC[1]) for _ in range(5)])
    assert len(b.recv(2)) == 2
    deadline = time.monotonic() + 5
    while sw.port_stats(1)["drops"].get("no_rx_buffer", 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sw.port_stats(1)["drops"] == {"no_rx_buffer": 3}


def test_rarp_mtu_queue_num(switch: Callable[..., Sw]) -> None:
    sw = switch(2)
    a, b = sw.port(0), sw.port(1)
    fe = a.fe
    assert fe.protocol_features & ProtocolFeature.RARP
    assert fe.get_u64(FrontendReq.GET_QUEUE_NUM) == 1  # queue pairs
    fe.call(FrontendReq.SEND_RARP, p.U64(int.from_bytes(MAC[5] + b"\0\0", "little")))
    (_, f), = b.recv()
    assert f[:14] == BCAST + MAC[5] + b"\x80\x35" and f[14:22] == bytes.fromhex("0001080006040003")
    fe.call(FrontendReq.NET_SET_MTU, p.U64(1000))
    a.send([frame(BCAST, MAC[1], bytes(1010))])  # 1024 bytes > 1000 + 14 + 4
    assert nothing(b)
    assert sw.port_stats(0)["drops"] == {"oversize": 1}
    with pytest.raises(Exception, match="NACK"):
        fe.call(FrontendReq.NET_SET_MTU, p.U64(40))
    cfg = fe.get_config(12)
    assert cfg[:6] == bytes([0x52, 0x54, 0, 0x5C, 0, 1]) and cfg[6] == 1  # mac, link up


def test_reconnect_does_not_disturb_other_ports(switch: Callable[..., Sw]) -> None:
    sw = switch(3)
    a, b = sw.port(0), sw.port(1)
    for rnd in range(3):
        c = sw.port(2)
        c.send([frame(BCAST, MAC[3])])
        assert len(a.recv()) == 1 and len(b.recv()) == 1
        a.send([frame(MAC[2], MAC[1], bytes([rnd]) * 46)])
        assert b.recv()[0][1][14] == rnd
        c.fe.close()  # port 2 goes away; 0 and 1 keep talking
        sw.d.wait_log("port2: front-end disconnected", count=rnd + 1)
        b.send([frame(MAC[1], MAC[2])])
        assert len(a.recv()) == 1
    st = sw.stats()
    assert st["ports"][2]["connected"] is False and st["ports"][0]["connected"] is True


def test_multiqueue_pairs(switch: Callable[..., Sw]) -> None:
    sw = switch(2, port_opts=",queues=2")
    a = sw.port(0, pairs=2)
    b0 = sw.port(1, pairs=2)
    b1 = NetClient(b0.fe, pair=1)
    assert a.fe.get_u64(FrontendReq.GET_QUEUE_NUM) == 2
    a1 = NetClient(a.fe, pair=1)
    a1.send([frame(BCAST, MAC[1], bytes([i]) * 46) for i in range(40)])  # tx on pair 1
    got = []
    deadline = time.monotonic() + 5
    while len(got) < 40 and time.monotonic() < deadline:
        for n in (b0, b1):
            try:
                got += n.recv(1, 0.2)
            except TimeoutError:
                pass
    assert len(got) == 40
    assert sw.port_stats(1)["tx_packets"] == 40


def test_offloads_carried_or_finished(switch: Callable[..., Sw]) -> None:
    """A GSO frame and a checksum left to the device, flooded: the port that negotiated
    the offloads gets them as sent, header and all; the one that did not gets complete
    frames (checked against RFC 1071 by test_net_offload's helpers); a header that lies is
    dropped and counted."""
    sw = switch(3)
    tso = NET | F_CSUM | F_GUEST_CSUM | F_HOST_TSO4 | F_GUEST_TSO4
    a, b, c = sw.port(0, features=tso, buf_size=8192), sw.port(1, features=tso), sw.port(2)
    payload = bytes(range(256)) * 16  # 4096 bytes: 3 segments of 1448 at most
    gso = tcp_frame(False, payload)
    gso_hdr = HDR.pack(NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16) + b"\1\0"
    a.send([gso], header=gso_hdr)
    hdr, f = b.recv()[0]
    assert f == gso and hdr[:10] == gso_hdr[:10]
    assert hdr[10:] == b"\3\0"  # num_buffers: 4150 bytes in 2 KiB buffers
    segs = [f for _, f in c.recv(3)]
    assert b"".join(check_tcp_segment(s, False)[2] for s in segs) == payload
    small = tcp_frame(False, b"checksum me")
    csum_hdr = HDR.pack(NEEDS_CSUM, GSO_NONE, 0, 0, 34, 16) + b"\1\0"
    a.send([small], header=csum_hdr)
    hdr, f = b.recv()[0]
    assert f == small and hdr == csum_hdr
    (_, f), = c.recv()
    check_tcp_segment(f, False)
    assert f[:50] == small[:50] and f[52:] == small[52:]
    a.send([gso], header=HDR.pack(NEEDS_CSUM, GSO_TCPV4, 54, 1448, 38, 16) + b"\1\0")
    a.send([frame(BCAST, MAC[1])])  # (after the dropped one: it was taken)
    assert b.recv()[0][1] == frame(BCAST, MAC[1]) and c.recv()[0][1] == frame(BCAST, MAC[1])
    st = sw.stats()["ports"]
    assert st[0]["drops"] == {"bad_offload": 1}
    assert st[0]["offloads"] == {"rx_gso": 1, "rx_csum": 1}
    assert st[1]["offloads"] == {"tx_gso": 1, "tx_csum": 1}
    assert st[2]["offloads"] == {"segmented": 1, "segments": 3, "checksummed": 1}
    assert not st[1]["drops"] and not st[2]["drops"]


def test_a_gso_frame_that_finds_too_few_buffers_leaves_them_to_the_next(
        switch: Callable[..., Sw]) -> None:
    """A 20 KiB GSO frame for a port with four 2 KiB buffers posted is dropped (counted)
    and the buffers stay posted: the small frame behind it gets one."""
    sw = switch(2)
    tso = NET | F_CSUM | F_GUEST_CSUM | F_HOST_TSO4 | F_GUEST_TSO4
    a, b = sw.port(0, features=tso, buf_size=32768), sw.port(1, features=tso, rx_buffers=4)
    gso = tcp_frame(False, bytes(20000))
    a.send([gso], header=HDR.pack(NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16) + b"\1\0")
    a.send([frame(BCAST, MAC[1])])
    (hdr, f), = b.recv()
    assert f == frame(BCAST, MAC[1]) and hdr == bytes(10) + b"\1\0"
    st = sw.port_stats(1)
    assert st["drops"] == {"no_rx_buffer": 1} and st["tx_packets"] == 1


def test_malicious_ring_stops_one_port_only(switch: Callable[..., Sw]) -> None:
    sw = switch(3)
    a, b, c = (sw.port(i) for i in range(3))
    ring = a.fe.queues[1].ring
    gpa = a.fe.ram.alloc(16)
    ring.write_desc(0, gpa, 16, 1, 1)
    ring.write_desc(1, gpa, 16, 1, 0)  # a loop
    ring.publish(0)
    a.fe.kick(1)
    sw.d.wait_log("port0 queue 1: stopped")
    b.send([frame(MAC[3], MAC[2])])
    assert len(c.recv()) == 1  # the other ports carry on


def test_bad_command_lines(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vhostuser.cli.switch", *args],
                              capture_output=True, text=True, timeout=30, cwd=tmp_path)
    for args, msg in ((["--aging", "5"], "at least one --port"),
                      (["--port", "a,bogus"], "unknown option"),
                      (["--port", "a,mac=zz"], "bad MAC"),
                      (["--port", "a,queues=0"], "queue pairs"),
                      (["--port", "a", "--port", "a"], "share a socket path"),
                      (["--port", "fd=x"], "fd= needs a number"),
                      (["--port", "p.sock", "--port", "fd=999"], "port1: fd 999"),
                      (["--port", "fd=0,client"], "unknown option"),
                      (["--port", "a", "--tap", "x" * 20], "bad interface name")):
        r = run(*args)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "p.sock").exists()  # port0's, removed when port1 failed
    r = run("stats", "--control", str(tmp_path / "none"))
    assert r.returncode == 1 and "cannot read" in r.stderr
    out = subprocess.run([sys.executable, "-m", "vhostuser.cli.net", "--print-capabilities"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == {"type": "net", "features": []}


class Sink(Port):
    """A switch port that keeps what it is given."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.got: list[bytes] = []

    def deliver(self, frames: Frames) -> None:
        self.got += frames


@pytest.fixture(params=[False, True], ids=["arrays", "compiled"])
def compiled(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Switch.forward with the compiled kernel (switch/route.py) or the array version."""
    from vhostuser.switch import route

    if request.param:
        monkeypatch.setenv("VHOSTUSER_JIT", "1")
        assert route.available()  # numba is a test dependency
    else:
        monkeypatch.setattr(route, "available", lambda: False)
    return bool(request.param)


def station(sw: object, mac: bytes) -> Port | None:
    entry = sw.table.get(mac)  # type: ignore[attr-defined]
    return None if entry is None else sw.ports[entry[0]]  # type: ignore[attr-defined]


def test_forwarding_a_mixed_burst_matches_frame_by_frame_rules(compiled: bool) -> None:
    """One burst with known, unknown, broadcast and hairpin destinations: each frame goes
    exactly where the rules say, in burst order per port."""
    from vhostuser.switch.core import Switch
    from vhostuser.switch.vhost_port import VhostPort

    a, b, c = Sink("a"), Sink("b"), Sink("c")
    sw = Switch([VhostPort("v", "/nonexistent", bytes([2, 0, 0, 0, 0, 9]))])
    sw.ports = [a, b, c]
    mb, mc, ma, unknown = (bytes([2, 0, 0, 0, 0, k]) for k in (0xB, 0xC, 0xA, 0xD))
    sw.forward(b, Frames.of([frame(BCAST, mb)]))
    sw.forward(c, Frames.of([frame(BCAST, mc)]))
    assert a.got == [frame(BCAST, mb), frame(BCAST, mc)] and not b.got[1:]
    a.got.clear(), b.got.clear(), c.got.clear()
    burst = [frame(mb, ma, b"1" * 46), frame(unknown, ma, b"2" * 46),
             frame(mc, ma, b"3" * 46), frame(BCAST, ma, b"4" * 46),
             frame(ma, ma, b"5" * 46),  # to itself: learned at a just now, so a hairpin
             frame(mb, ma, b"6" * 46)]
    sw.forward(a, Frames.of(burst))
    assert b.got == [burst[0], burst[1], burst[3], burst[5]]
    assert c.got == [burst[1], burst[2], burst[3]]
    assert a.got == [] and a.counters.drops == {"to_ingress_port": 1}
    assert station(sw, ma) is a and station(sw, mb) is b and station(sw, unknown) is None


def test_forward_equals_frame_by_frame_on_random_bursts(compiled: bool) -> None:
    """On random bursts over a small MAC pool and random starting tables (entries at the
    ingress, elsewhere, expired; a table that is full) forward() delivers exactly what
    the frame-by-frame rules do, in the same order, with the same hairpin drops, and
    learns the same stations."""
    import random

    from vhostuser.switch.core import Switch
    from vhostuser.switch.mac_table import MacTable
    from vhostuser.switch.vhost_port import VhostPort

    def reference(macs: dict, limit: int, ports: list, ingress: Port, frames: list[bytes],
                  now: float, aging: float) -> tuple[dict, int]:
        out: dict = {p: [] for p in ports}
        drops = 0
        for f in frames:
            src = f[6:12]
            if not src[0] & 1 and (len(macs) < limit or src in macs):
                macs[src] = (ingress, now + aging)  # multicast sources are never learned
            dst = f[:6]
            entry = None if dst[0] & 1 else macs.get(dst)
            if entry is not None and entry[1] >= now:
                if entry[0] is ingress:
                    drops += 1
                else:
                    out[entry[0]].append(f)
            else:
                for port in ports:
                    if port is not ingress:
                        out[port].append(f)
        return out, drops

    rng = random.Random(7)
    pool = [bytes([2, 0, 0, 0, 0, k]) for k in range(6)] + [BCAST, bytes([3, 0, 0, 0, 0, 1])]
    for trial in range(300):
        ports = [Sink(f"p{i}") for i in range(3)]
        sw = Switch([VhostPort("v", "/nonexistent", bytes([2, 0, 0, 0, 0, 9]))])
        sw.ports = list(ports)
        limit = rng.choice([3, 5, 100])
        sw.table = MacTable(limit)
        table: dict = {}
        t = time.monotonic()
        for m in pool[:6]:
            if rng.random() < 0.6 and len(table) < limit:
                port, until = rng.choice(ports), t + rng.choice((-5.0, 100.0))
                sw.table.learn(m, ports.index(port), until)
                table[m] = (port, until)
        ingress = rng.choice(ports)
        frames = [frame(rng.choice(pool), rng.choice(pool), bytes([i]) * 46)
                  for i in range(rng.randint(1, 12))]
        sw.forward(ingress, Frames.of(frames))
        want, drops = reference(table, limit, ports, ingress, frames, time.monotonic(),
                                sw.aging)
        for port in ports:
            assert port.got == want[port], (trial, port.name)
        assert ingress.counters.drops.get("to_ingress_port", 0) == drops, trial
        learned = {m: (sw.ports[p], round(x - t)) for m, p, x in sw.table.items()}
        assert learned == {m: (p, round(x - t)) for m, (p, x) in table.items()}, trial


def test_the_mac_table_keeps_what_a_dict_keeps() -> None:
    """Many stations (long probe runs), then aging in steps: after each step every station
    left is found with its port, every one aged out is gone, and the count is right."""
    import random

    from vhostuser.switch.mac_table import AGE_AT_ONCE, MacTable

    rng = random.Random(3)
    table, model = MacTable(), {}
    for _ in range(60000):  # 46 % of the slots: long clusters
        mac = bytes([2]) + rng.randbytes(5)
        port, until = rng.randrange(8), rng.uniform(0, 100)
        table.learn(mac, port, until)
        model[mac] = (port, until)
    full = MacTable(limit=2)
    assert full.learn(b"\x02" * 6, 0, 1.0) and full.learn(b"\x04" * 6, 1, 1.0)
    assert not full.learn(b"\x06" * 6, 0, 1.0) and full.get(b"\x06" * 6) is None
    assert full.learn(b"\x02" * 6, 3, 2.0) and full.get(b"\x02" * 6) == (3, 2.0)
    for now in (10.0, 50.0, 90.0, 101.0):
        gone = [m for m, (_, x) in model.items() if x < now]
        removed = []  # a bounded number per call (the switch ages once a second)
        while n := table.age(now):
            assert n <= AGE_AT_ONCE
            removed.append(n)
        assert sum(removed) == len(gone) and len(removed) > len(gone) // AGE_AT_ONCE
        for m in gone:
            del model[m]
        assert len(table) == len(model)
        for m in rng.sample(gone, min(len(gone), 2000)):
            assert table.get(m) is None
        for m, (port, until) in model.items():
            assert table.get(m) == (port, until)
    assert len(table) == 0 and not table.keys.any()


def test_vvu_port_serves_a_message_that_arrives_before_the_status_says_so() -> None:
    """Without interrupts a switch port reads the device's status at most every 50 ms; a
    consumer that connects and sends its first request within that window must be served,
    not have the request dropped (QEMU then fails with a protocol error)."""
    from vhostuser.protocol import decode_header, encode, request
    from vhostuser.switch.vhost_port import VhostPort
    from vhostuser.vvu.abi import S_BACKEND_UP, S_FRONTEND_UP

    class PolledLink:  # what VhostPort uses of VvuLink, with a status read every 50 ms
        interrupts = False

        class access:  # as VvuLink.access: not an appliance VM's PCI function
            shared_log = True  # the dirty log may be offered

        def __init__(self) -> None:
            self.real = S_BACKEND_UP | S_FRONTEND_UP  # the consumer has just connected
            self.cached = S_BACKEND_UP  # as read a few ms earlier
            self.rx = [encode(request(FrontendReq.GET_FEATURES))]
            self.sent: list[bytes] = []

        def status(self, fresh: bool = False) -> int:
            return self.real if fresh else self.cached

        def in_session(self, fresh: bool = False) -> bool:
            return self.status(fresh) == S_BACKEND_UP | S_FRONTEND_UP

        def take_messages(self) -> list[bytes]:
            out, self.rx = self.rx, []
            return out

        def send(self, data: bytes) -> None:
            self.sent.append(data)

        def begin_session(self) -> None:
            raise AssertionError("the session was not over")

    port = VhostPort("port0", None, MAC[1], vvu="pci:0000:00:04.0")
    link = PolledLink()
    port.link = link  # type: ignore[assignment]
    port.on_vvu_event()
    assert port.backend is not None
    assert len(link.sent) == 1
    assert decode_header(link.sent[0][:12]).request == FrontendReq.GET_FEATURES


def test_a_guest_cannot_pile_its_addresses_into_one_run_of_slots() -> None:
    """MACs spaced by a step chosen against a fixed multiplicative hash (a continued-
    fraction approximation of the golden ratio's: with 0x9E3779B97F4A7C15 these 8000
    addresses land in 6 slots) spread over the table like any others: each table draws
    its own multiplier."""

    from vhostuser.switch.mac_table import PRESENT, SLOTS_LOG2, MacTable

    step = 0x43A53F82
    macs = [m.to_bytes(6, "big") for m in (j * step % (1 << 48) for j in range(1, 20000))
            if not m >> 40 & 1][:8000]
    keys = np.array([int.from_bytes(m, "big") | PRESENT for m in macs], np.uint64)
    golden = (keys * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - SLOTS_LOG2)
    assert len(np.unique(golden)) <= 6  # the attack, against a fixed multiplier
    table = MacTable()
    for i, mac in enumerate(macs):
        assert table.learn(mac, i % 4, 1.0)
    occupied = np.flatnonzero(table.keys)
    runs = np.split(occupied, np.flatnonzero(np.diff(occupied) != 1) + 1)
    assert max(map(len, runs)) < 64, max(map(len, runs))
    assert all(table.get(m) == (i % 4, 1.0) for i, m in enumerate(macs))


def test_a_port_on_an_inherited_listening_socket(tmp_path: Path) -> None:
    """`--port fd=N`: a listening socket made by whoever starts the switch (a service
    manager, as QEMU's --fd) is a port like any other, accepted on again after its
    front-end goes; the switch leaves its socket file alone."""
    inherited = socket.socket(socket.AF_UNIX)
    inherited.bind(str(tmp_path / "p1.sock"))
    inherited.listen()
    paths, ctl = [str(tmp_path / "p0.sock"), str(tmp_path / "p1.sock")], str(tmp_path / "ctl")
    proc = Program.python(["vhostuser.cli.switch", "--control", ctl, "--port", paths[0],
                           "--port", f"fd={inherited.fileno()}"], tmp_path / "switch.log",
                          ready=[paths[0], ctl], pass_fds=[inherited.fileno()])
    inherited.close()
    try:
        sw = Sw(None, paths, ctl)  # type: ignore[arg-type]
        a = sw.port(0)
        for rnd in range(2):  # the inherited port's front-end comes, goes, comes back
            b = sw.port(1)
            a.send([frame(BCAST, MAC[1], bytes([rnd]) * 46)])
            assert b.recv()[0][1][14:15] == bytes([rnd])
            b.fe.close()
        assert sw.port_stats(1)["tx_packets"] == 2
    finally:
        assert proc.stop() == 0, proc.log()
    assert os.path.exists(paths[1]) and "Traceback" not in proc.log()
