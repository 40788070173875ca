"""No peer can crash, freeze or starve a daemon (issue 8). Every test drives the real
programs over their sockets: a front-end that sets up a ring outside its memory, one that
sends half a message and waits, one that never reads our replies, and a seeded random
sequence of messages; after each, the daemon is alive and serves a fresh front-end, and
what other connections were doing went on meanwhile."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import BLK_FEATURES, Daemon, blk_session
from test_switch import MAC, NET, Sw, frame

from vhostuser.frontend.client import Frontend
from vhostuser.frontend.net import NetClient
from vhostuser.protocol import FRONTEND_SPECS, FrontendReq, encode, request
from vhostuser.protocol import payloads as p
from vhostuser.vfio_user.client import VfioUserClient

F = FrontendReq
TIMEOUT = "1"  # --message-timeout for these tests, in seconds
BCAST = b"\xff" * 6


def evil_ring(path: str, addr: tuple[int, int, int]) -> Frontend:
    """The issue's sequence: negotiate, a memory table, then a ring whose (desc, avail,
    used) lie outside guest memory or misaligned, kick and call fds, and enable."""
    fe = Frontend(path, reply_timeout=10)
    fe.negotiate(NET)
    fe.set_mem_table()
    desc, avail, used = addr
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    fe.call(F.SET_VRING_NUM, p.VringState(0, 16), ack=False)
    fe.call(F.SET_VRING_BASE, p.VringState(0, 0), ack=False)
    fe.call(F.SET_VRING_ADDR, p.VringAddr(0, 0, desc, used, avail, 0), ack=False)
    fe.call(F.SET_VRING_KICK, p.VringFile.make(0), fds=(kick,), ack=False)
    fe.call(F.SET_VRING_CALL, p.VringFile.make(0), fds=(call,), ack=False)
    fe.call(F.SET_VRING_ENABLE, p.VringState(0, 1), ack=False)
    os.close(kick)  # the daemon has its own copies
    os.close(call)
    return fe


def _evil_addresses(fe: Frontend) -> list[tuple[int, int, int]]:
    """Ring addresses (user addresses, as QEMU sends them) outside the front-end's memory,
    or misaligned."""
    base, size = fe.ram.user_addr, fe.ram.size
    return [(base - 0x10000, base, base + 0x1000),  # desc before the region
            (base + 0x1000, base + size + 0x1000, base + 0x3000),  # avail past its end
            (base + 0x1008, base + 0x2000, base + 0x3000),  # desc misaligned by 8
            (base + 0x1000, base + 0x2000, base + size - 2)]  # used crosses the end


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Daemon]:
    sock = tmp_path / "net.sock"
    d = Daemon(["vhostuser.cli.net", "--socket-path", str(sock), "--message-timeout", TIMEOUT],
               sock, tmp_path / "net.log")
    yield d
    assert d.stop() == 0, d.log()
    assert "Traceback" not in d.log(), d.log()


@pytest.fixture
def sw3(tmp_path: Path) -> Iterator[Sw]:
    paths = [str(tmp_path / f"p{i}.sock") for i in range(3)]
    ctl = str(tmp_path / "ctl")
    args = ["vhostuser.cli.switch", "--control", ctl, "--message-timeout", TIMEOUT]
    for path in paths:
        args += ["--port", path]
    d = Daemon(args, Path(paths[-1]), tmp_path / "switch.log")
    yield Sw(d, paths, ctl)
    assert d.stop() == 0, d.log()
    log = d.log()
    assert "Traceback" not in log, log


def test_ring_outside_memory_does_not_end_vhost_user_net(net: Daemon) -> None:
    probe = Frontend(net.sock)
    addrs = _evil_addresses(probe)
    probe.close()
    for addr in addrs:
        fe = evil_ring(net.sock, addr)
        fe.close()
        net.wait_log("front-end disconnected", count=addrs.index(addr) + 2)  # + the probe
        assert net.alive(), net.log()
    assert net.log().count("cannot start") == len(addrs), net.log()
    good = NetClient(_net_port(net.sock))  # the same socket serves a good front-end
    good.send([frame(BCAST, MAC[1])])
    good.fe.close()
    assert net.alive(), net.log()


def _net_port(path: str) -> Frontend:
    fe = Frontend(path)
    fe.negotiate(NET)
    fe.set_mem_table()
    for q in range(2):
        fe.setup_queue(q, 256)
    return fe


def test_bad_port_does_not_disturb_traffic_on_the_others(sw3: Sw) -> None:
    a, b = sw3.port(0), sw3.port(1)
    probe = Frontend(sw3.paths[2])
    addrs = _evil_addresses(probe)
    probe.close()
    for i, addr in enumerate(addrs):
        a.send([frame(MAC[2], MAC[1], bytes([i]) * 46)])
        bad = evil_ring(sw3.paths[2], addr)
        got = b.recv()  # flooded (MAC 2 is unknown) while port 2 is broken
        assert got[0][1][14] == i
        b.send([frame(MAC[1], MAC[2])])
        assert len(a.recv()) == 1
        bad.close()
        sw3.d.wait_log("port2: front-end disconnected", count=i + 1)
    c = sw3.port(2)  # the bad port's socket serves a good front-end afterwards
    c.send([frame(MAC[1], MAC[3])])
    assert len(a.recv()) == 1
    assert sw3.d.alive(), sw3.d.log()


def half_message(path: str) -> socket.socket:
    """A peer that sends a 12-byte SET_FEATURES header and holds the body back."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(encode(request(F.SET_FEATURES, p.U64(0)))[:12])
    return s


def never_reading(path: str) -> socket.socket:
    """A peer that sends requests with replies and never reads them, until its socket
    buffer is full."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.setblocking(False)
    burst = encode(request(F.GET_FEATURES)) * 5000  # few large writes: many requests
    try:
        for _ in range(200):
            s.send(burst)
    except BlockingIOError:
        pass
    return s


def _dropped(s: socket.socket, within: float = 10.0) -> bool:
    """Whether the daemon closed `s` within `within` seconds."""
    s.setblocking(True)
    s.settimeout(within)
    try:
        while s.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("peer", [half_message, never_reading], ids=["half", "no-read"])
def test_slow_peer_on_a_switch_port_stalls_only_itself(sw3: Sw, peer) -> None:
    a, b = sw3.port(0), sw3.port(1)
    slow = peer(sw3.paths[2])
    t0 = time.monotonic()
    for i in range(5):  # the other ports forward meanwhile, at once
        a.send([frame(BCAST, MAC[1], bytes([i]) * 46)])
        assert b.recv(timeout=2)[0][1][14] == i
    assert time.monotonic() - t0 < 2.5
    st = sw3.stats()  # and the control socket answers
    assert [q["connected"] for q in st["ports"]][:2] == [True, True]
    assert _dropped(slow), sw3.d.log()
    assert "port2: dropping the front-end" in sw3.d.log()
    slow.close()
    c = sw3.port(2)
    c.send([frame(MAC[1], MAC[3])])
    assert len(a.recv()) == 1


@pytest.mark.parametrize("peer", [half_message, never_reading], ids=["half", "no-read"])
def test_slow_peer_on_vhost_user_net(net: Daemon, peer) -> None:
    slow = peer(net.sock)
    assert _dropped(slow), net.log()
    slow.close()
    good = NetClient(_net_port(net.sock))
    good.send([frame(BCAST, MAC[1])])
    good.fe.close()
    assert net.alive()


@pytest.mark.parametrize("peer", [half_message, never_reading], ids=["half", "no-read"])
def test_slow_peer_on_vhost_user_blk(tmp_path: Path, image: Path, peer) -> None:
    sock = tmp_path / "blk.sock"
    d = Daemon(["vhostuser.cli.blk", "--socket-path", str(sock), "--blk-file", str(image),
                "--message-timeout", TIMEOUT], sock, tmp_path / "blk.log")
    try:
        slow = peer(str(sock))
        # a second front-end queues behind it (one front-end at a time), and is served
        # once the slow one is dropped
        t0 = time.monotonic()
        fe, (blk,) = blk_session(str(sock), features=BLK_FEATURES)
        assert time.monotonic() - t0 < 8, d.log()
        with fe:
            assert blk.read(0, 512) == (0, (0).to_bytes(4, "little") * 128)
        assert _dropped(slow, 1.0)
        slow.close()
        assert d.alive()
        sigterm_while_stalled = peer(str(sock))  # SIGTERM is honoured mid-message too
    finally:
        rc = d.stop()
    sigterm_while_stalled.close()
    assert rc == 0, d.log()
    assert "Traceback" not in d.log(), d.log()


@contextlib.contextmanager
def vvu_with_appliance(tmp_path: Path, image: Path) -> Iterator[object]:
    """The virtio-vhost-user device with vhost-user-blk driving it as a process appliance."""
    from test_vvu_device import Device

    dev = Device(tmp_path, "--max-queues", "8", "--message-timeout", TIMEOUT)
    app = Daemon(["vhostuser.cli.blk", "--vvu", dev.vfu, "--blk-file", str(image)],
                 Path(dev.vfu), tmp_path / "appliance.log")
    try:
        deadline = time.monotonic() + 15
        while "driver set BACKEND_UP" not in dev.log():
            assert time.monotonic() < deadline and app.alive(), dev.log() + app.log()
            time.sleep(0.05)
        yield dev
    finally:
        rc = app.stop()
        dev.stop()
    assert rc == 0, app.log()


def _blk_probe(path: str) -> None:
    fe, (c,) = blk_session(path)
    with fe:
        assert c.read(1, 512) == (0, (1).to_bytes(4, "little") * 128)


@pytest.mark.parametrize("peer", [half_message, never_reading], ids=["half", "no-read"])
def test_slow_consumer_on_the_vvu_device(tmp_path: Path, image: Path, peer) -> None:
    with vvu_with_appliance(tmp_path, image) as dev:
        slow = peer(dev.vhost)  # type: ignore[attr-defined]
        assert _dropped(slow), dev.log()  # type: ignore[attr-defined]
        slow.close()
        _blk_probe(dev.vhost)  # type: ignore[attr-defined]
        assert "the consumer stalled" in dev.log()  # type: ignore[attr-defined]


def _random_message(rng: random.Random, fe_ram_fd: int) -> tuple[bytes, tuple[int, ...]]:
    """One vhost-user message, valid in framing more often than not, with random fields,
    sometimes with fds of the wrong kind."""
    codes = [int(c) for c in F] + [0, 99, 0xFFFF]
    code = rng.choice(codes)
    size = rng.choice([0, 8, 12, 16, 24, 40, rng.randrange(0, 300)])
    spec = FRONTEND_SPECS.get(code)
    fmt = getattr(spec.payload, "FMT", None) if spec is not None else None
    if fmt is not None and rng.random() < 0.7:  # the right size: the handler sees it
        size = fmt.size
    flags = rng.choice([1, 1, 1, 1 | 8, 1 | 8, 0, 2, 1 | 4, rng.randrange(0, 1 << 32)])
    body = bytes(rng.randrange(256) for _ in range(size))
    if rng.random() < 0.5 and size >= 8:  # small plausible numbers: indices, sizes
        body = struct.pack("<Q", rng.choice([0, 1, 2, 16, 256, 1 << 32])) + body[8:]
    data = struct.pack("<III", code, flags, size) + body
    if rng.random() < 0.1:
        data = data[: rng.randrange(len(data) + 1)]  # cut short: the peer then hangs up
    fds: tuple[int, ...] = ()
    if rng.random() < 0.2:
        kind = rng.randrange(3)
        fds = (fe_ram_fd if kind == 0 else os.eventfd(0) if kind == 1
               else os.open("/dev/null", os.O_RDONLY),)
    return data, fds


def _seed() -> int:
    env = os.environ.get("VHOSTUSER_FUZZ_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "little")


def _good_prefix(rng: random.Random, ram: int) -> list[tuple[bytes, tuple[int, ...]]]:
    """A valid start (owner, features, a memory table, part of a ring), cut anywhere, so
    the random messages after it reach the deeper handlers."""
    region = p.MemRegion(0, 1 << 20, 0x7F00_0000_0000, 0)
    ring = 0x7F00_0000_0000
    msgs = [(request(F.SET_OWNER), ()),
            (request(F.GET_FEATURES), ()),
            (request(F.SET_FEATURES, p.U64(1 << 32 | 1 << 28 | 1 << 29)), ()),
            (request(F.SET_MEM_TABLE, p.MemTable((region,))), (ram,)),
            (request(F.SET_VRING_NUM, p.VringState(rng.randrange(3), 16)), ()),
            (request(F.SET_VRING_ADDR, p.VringAddr(0, 0, ring, ring + 0x200, ring + 0x100,
                                                   0)), ()),
            (request(F.SET_VRING_BASE, p.VringState(0, rng.choice([0, 5, 0xFFFF]))), ()),
            (request(F.SET_VRING_KICK, p.VringFile.make(0)), (os.eventfd(0),)),
            (request(F.SET_VRING_CALL, p.VringFile.make(0)), (os.eventfd(0),))]
    if rng.random() < 0.5:  # scribble over the ring the back-end is about to serve
        os.pwrite(ram, os.urandom(0x300), 0)
    cut = rng.randrange(2, len(msgs) + 1)
    for _, fds in msgs[cut:]:
        for fd in fds:
            if fd != ram:
                os.close(fd)
    return [(encode(m), fds) for m, fds in msgs[:cut]]


def _fuzz(d: Daemon, path: str, seed: int, rounds: int, probe) -> None:
    rng = random.Random(seed)
    ram = os.memfd_create("fuzz-ram")
    os.ftruncate(ram, 1 << 20)
    try:
        for r in range(rounds):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.settimeout(2)
            script: list[tuple[bytes, tuple[int, ...]]] = []
            try:
                script = [_random_message(rng, ram) for _ in range(rng.randrange(1, 12))]
                if rng.random() < 0.6:  # most sequences start as a real front-end would
                    script = _good_prefix(rng, ram) + script
                for data, fds in script:
                    try:
                        s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            struct.pack(f"{len(fds)}i", *fds))] if fds else [])
                    except OSError:
                        break  # the daemon dropped us: fine
            finally:
                s.close()
                for _, fds in script:
                    for fd in fds:
                        if fd != ram:
                            os.close(fd)
            assert d.alive(), f"seed {seed} round {r}\n{d.log()[-3000:]}"
            if r % 10 == 9:
                probe()  # a fresh, good front-end is served
    finally:
        os.close(ram)


FUZZ_ROUNDS = 150  # per program: a few seconds; VHOSTUSER_FUZZ_SEED=N replays a run


def test_fuzz_vhost_user_net_and_blk(tmp_path: Path, image: Path, net: Daemon) -> None:
    seed = _seed()

    def net_probe() -> None:
        good = NetClient(_net_port(net.sock))
        good.send([frame(BCAST, MAC[1])])
        good.fe.close()

    _fuzz(net, net.sock, seed, FUZZ_ROUNDS, net_probe)
    sock = tmp_path / "fz.sock"
    blk = Daemon(["vhostuser.cli.blk", "--socket-path", str(sock), "--blk-file", str(image),
                  "--message-timeout", TIMEOUT], sock, tmp_path / "fz.log")

    def blk_probe() -> None:
        fe, (c,) = blk_session(str(sock))
        with fe:
            assert c.read(1, 512) == (0, (1).to_bytes(4, "little") * 128)

    try:
        _fuzz(blk, str(sock), seed, FUZZ_ROUNDS, blk_probe)
    finally:
        rc = blk.stop()
    assert rc == 0, f"seed {seed}\n{blk.log()}"
    assert "Traceback" not in blk.log(), f"seed {seed}\n{blk.log()}"


def test_fuzz_switch_port_and_vvu_device(tmp_path: Path, sw3: Sw) -> None:
    seed = _seed()
    a, b = sw3.port(0), sw3.port(1)

    def sw_probe() -> None:
        a.send([frame(BCAST, MAC[1])])
        assert len(b.recv()) == 1

    _fuzz(sw3.d, sw3.paths[2], seed, FUZZ_ROUNDS, sw_probe)


def test_fuzz_vvu_device_consumer_socket(tmp_path: Path, image: Path) -> None:
    seed = _seed()
    with vvu_with_appliance(tmp_path, image) as dev:
        _fuzz(_ProcAlive(dev), dev.vhost, seed, FUZZ_ROUNDS,  # type: ignore[attr-defined]
              lambda: _blk_probe(dev.vhost))  # type: ignore[attr-defined]


class _ProcAlive:
    """`_fuzz`'s view of the device (alive, log)."""

    def __init__(self, dev: object) -> None:
        self.dev = dev

    def alive(self) -> bool:
        return self.dev.proc.poll() is None  # type: ignore[attr-defined]

    def log(self) -> str:
        return self.dev.log()  # type: ignore[attr-defined]


def test_driver_gives_up_on_a_device_that_never_resets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The appliance's driver waits for a reset to complete (status reads 0) for a bounded
    time, then fails clearly, instead of spinning forever on a device that never does."""
    from vhostuser.appliance import virtio_pci as vpci
    from vhostuser.protocol.virtio_pci import VirtioCfgType

    class StuckDevice:  # status stays DRIVER_OK whatever is written
        def read_u(self, bar: int, offset: int, size: int) -> int:
            return 0x0F

        def write_u(self, bar: int, offset: int, size: int, value: int) -> None:
            pass

    monkeypatch.setattr(vpci, "RESET_TIMEOUT", 0.2)
    drv = vpci.VirtioPciDriver.__new__(vpci.VirtioPciDriver)
    drv.dev = StuckDevice()  # type: ignore[assignment]
    common = VirtioCfgType.COMMON
    drv.caps = {common: vpci.Cap(common, 0, 0, 0x38, b"")}
    t0 = time.monotonic()
    with pytest.raises(vpci.DriverError, match="did not complete its reset"):
        drv.init(0)
    assert 0.2 <= time.monotonic() - t0 < 5


def _random_vfio_user(rng: random.Random, seq: int) -> bytes:
    """One vfio-user message: a plausible header (command, size) over random payloads,
    aimed at the region and irq handlers of the device."""
    cmd = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 15, 16, 0, 99])
    if cmd in (9, 10) and rng.random() < 0.7:  # REGION_READ/WRITE of a real region
        count = rng.choice([1, 2, 4, 8, 3, 4096, 1 << 20])
        body = struct.pack("<QII", rng.choice([0, 4, 0x14, 0x1000, 0x3FFE, 1 << 40]),
                           rng.randrange(10), count)
        if cmd == 10:
            body += os.urandom(min(count, 64))
    else:
        body = os.urandom(rng.choice([0, 4, 8, 16, 24, 32, rng.randrange(200)]))
    size = 16 + len(body)
    if rng.random() < 0.1:
        size = rng.choice([0, 8, 15, 1 << 31, size + 100])
    flags = rng.choice([0, 0, 0, 1, 0x10, rng.randrange(1 << 32)])
    return struct.pack("<HHIII", seq & 0xFFFF, cmd, size, flags, 0) + body


def test_fuzz_vvu_device_vfio_user_socket(tmp_path: Path) -> None:
    from test_vvu_device import Device

    seed = _seed()
    rng = random.Random(seed)
    dev = Device(tmp_path, "--max-queues", "8", "--message-timeout", TIMEOUT)
    try:
        for r in range(FUZZ_ROUNDS):
            s = socket.socket(socket.AF_UNIX)
            s.connect(dev.vfu)
            s.settimeout(2)
            try:
                for i in range(rng.randrange(1, 10)):
                    s.sendall(_random_vfio_user(rng, i))
            except OSError:
                pass  # dropped: fine
            finally:
                s.close()
            assert dev.proc.poll() is None, f"seed {seed} round {r}\n{dev.log()[-3000:]}"
            if r % 10 == 9:  # a well-behaved client is served
                c = VfioUserClient(dev.vfu)
                assert c.read(7, 0, 4) == bytes.fromhex("f41a7f10"), f"seed {seed}"
                c.close()
    finally:
        dev.stop()


def test_appliance_config_reads_are_answered_while_a_consumer_holds_back(
        tmp_path: Path) -> None:
    """The appliance's driver (in-process here) is up, so the device reads the consumer's
    socket: a consumer that sends half a message must not hold up the device's answers to
    the appliance's register reads (in an appliance VM those are vCPU MMIO traps)."""
    from test_vvu_device import Device

    from vhostuser.appliance.vvu_link import VvuLink

    dev = Device(tmp_path, "--max-queues", "8", "--message-timeout", TIMEOUT)
    link = None
    try:
        link = VvuLink(dev.vfu)
        link.begin_session()
        slow = half_message(dev.vhost)
        deadline = time.monotonic() + 10
        while "consumer connected" not in dev.log():
            assert time.monotonic() < deadline, dev.log()
            time.sleep(0.02)
        worst = 0.0
        for _ in range(20):  # while the device holds the consumer's half message
            t0 = time.monotonic()
            assert link.status(fresh=True) == 3  # BACKEND_UP | FRONTEND_UP
            worst = max(worst, time.monotonic() - t0)
        assert worst < 0.5, f"a register read took {worst:.3f} s\n{dev.log()}"
        assert _dropped(slow), dev.log()  # and the consumer is dropped after the timeout
        assert "the consumer stalled" in dev.log()
        slow.close()
    finally:
        if link is not None:
            link.close()
        dev.stop()
