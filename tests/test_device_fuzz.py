"""The guest is untrusted: every device type gets well-formed rings full of random requests
(random buffer counts, sizes, directions and bytes, with enough structure to reach deep:
real SCSI opcodes, vsock headers with the right CID, input status events) and must answer
every request it has to answer, log no traceback, and still serve a correct request after.
VHOSTUSER_FUZZ_SEED=N replays a run (the seed is in the failure message)."""

from __future__ import annotations

import json
import os
import random
import socket
import struct
from pathlib import Path

import pytest
from daemon import Daemon

from vhostuser.frontend.client import Frontend
from vhostuser.frontend.input import InputClient
from vhostuser.frontend.rng import RngClient
from vhostuser.frontend.scsi import ScsiClient, lun_field
from vhostuser.frontend.vsock import VsockClient
from vhostuser.protocol import ProtocolFeature, VirtioFeature
from vhostuser.virtq.split_driver import DriverRing

ROUNDS = 800  # random requests per device
FEATURES = (VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX | VirtioFeature.PROTOCOL_FEATURES
            | VirtioFeature.RING_INDIRECT_DESC)
SCSI_OPS = [0x00, 0x03, 0x12, 0xA0, 0x25, 0x9E, 0x08, 0x28, 0xA8, 0x88, 0x0A, 0x2A, 0xAA,
            0x8A, 0x2F, 0x8F, 0x41, 0x93, 0x42, 0x35, 0x91, 0x1A, 0x5A, 0x15, 0x55, 0x1B,
            0xA3, 0x89]  # the opcodes SBC-3/SPC-4 define that the target implements


def seed() -> int:
    env = os.environ.get("VHOSTUSER_FUZZ_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "little")


class Fuzzer:
    def __init__(self, fe: Frontend, rng: random.Random) -> None:
        self.fe, self.rng = fe, rng
        self.arena = fe.ram.alloc(8 << 20, 4096)
        self.pos = 0

    def buf(self, data: bytes | int) -> int:
        n = data if isinstance(data, int) else len(data)
        if self.pos + n + 64 > 8 << 20:
            self.pos = 0  # reuse: the device is done with what we wait for
        gpa = self.arena + self.pos
        self.pos += (n + 63) // 64 * 64
        if not isinstance(data, int):
            self.fe.ram.at(gpa, n)[:] = data
        return gpa

    def noise(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def chain(self, q: int, readable: list[bytes], writable: list[int],
              held: bool = False) -> None:
        """A random request on `q`; `held`: a queue of buffers the device may keep (rx,
        events): when it is full, nothing is added."""
        bufs = [(self.buf(d), len(d), False) for d in readable if d]
        bufs += [(self.buf(n), n, True) for n in writable if n]
        if not bufs:
            bufs = [(self.buf(1), 1, self.rng.random() < 0.5)]
        ring: DriverRing = self.fe.queues[q].ring
        ring.take_used()
        if len(ring.free) < len(bufs) + 1:
            if held:
                return
            self.settle(q)
        ring.add(bufs, indirect=self.rng.random() < 0.3)
        self.fe.kick(q)

    def settle(self, q: int) -> None:
        """Wait until the device has answered everything on `q`."""
        ring = self.fe.queues[q].ring
        ring.take_used()
        while ring.avail_idx != ring.last_used:
            self.fe.wait_used(q, 1, timeout=20)

    def sizes(self, most: int = 3) -> list[int]:
        return [self.rng.choice([0, 1, 7, 8, 44, 51, 108, 512, 600, 4096])
                for _ in range(self.rng.randrange(0, most + 1))]


def connect(d: Daemon, queues: int, size: int = 64,
            protocol: int = ProtocolFeature.REPLY_ACK) -> Frontend:
    fe = Frontend(d.sock)
    fe.negotiate(FEATURES, protocol)
    fe.set_mem_table()
    for q in range(queues):
        fe.setup_queue(q, size)
    return fe


def finish(d: Daemon, s: int) -> None:
    log = d.log()
    assert d.alive(), f"seed {s}: the daemon died\n{log[-3000:]}"
    assert "Traceback" not in log and "device failed" not in log, f"seed {s}\n{log[-3000:]}"


def test_fuzz_rng(tmp_path: Path) -> None:
    s = seed()
    sock = tmp_path / "rng.sock"
    d = Daemon(["vhostuser.cli.rng", "--socket-path", str(sock)], sock, tmp_path / "rng.log")
    try:
        with connect(d, 1) as fe:
            fz = Fuzzer(fe, random.Random(s))
            for _ in range(ROUNDS):
                fz.chain(0, [fz.noise(n) for n in fz.sizes(2)], fz.sizes())
            fz.settle(0)
        with connect(d, 1) as fe:
            assert len(RngClient(fe).read(32)) == 32, f"seed {s}"
        finish(d, s)
    finally:
        d.stop()


def test_fuzz_input(tmp_path: Path) -> None:
    s = seed()
    rng = random.Random(s)
    sock, events = tmp_path / "in.sock", str(tmp_path / "ev.sock")
    d = Daemon(["vhostuser.cli.input", "--socket-path", str(sock), "--events", events],
               sock, tmp_path / "in.log")
    client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with connect(d, 2, protocol=ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG) as fe:
            fz = Fuzzer(fe, rng)
            for i in range(ROUNDS):
                if i % 4 == 0:
                    fz.chain(0, [], fz.sizes(2), held=True)  # event buffers, any size
                status = struct.pack("<HHI", rng.choice([0, 1, 2, 0x11, 0x12, 0xFFFF]),
                                     rng.randrange(0x300), rng.randrange(1 << 32))
                fz.chain(1, [status[: rng.choice([8, 8, 3])], fz.noise(rng.randrange(9))],
                         fz.sizes(1))
                junk = rng.choice([fz.noise(rng.randrange(200)),
                                   json.dumps({"type": rng.randrange(-5, 70000),
                                               "code": rng.choice(["KEY_A", -1, 2**40, None]),
                                               "value": rng.choice([1, 1.5, "x", 2**31])}
                                              ).encode(),
                                   b"[" * 2000, json.dumps([{"type": 1, "code": 30}] * 3000
                                                           ).encode()])
                client.sendto(junk, events)
            fz.settle(1)
        with connect(d, 2, protocol=ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG) as fe:
            inp = InputClient(fe)
            assert inp.config(0x01) == b"vhost-user keyboard", f"seed {s}"
            inp.post(2)
            client.sendto(b'{"type": "EV_KEY", "code": "KEY_Z", "value": 1}', events)
            assert inp.events(2) == [(1, 44, 1), (0, 0, 0)], f"seed {s}"  # KEY_Z is 44
        finish(d, s)
    finally:
        client.close()
        d.stop()


def test_fuzz_vsock(tmp_path: Path) -> None:
    s = seed()
    rng = random.Random(s)
    sock, uds = tmp_path / "vs.sock", str(tmp_path / "vm.vsock")
    d = Daemon(["vhostuser.cli.vsock", "--socket-path", str(sock), "--guest-cid", "3",
                "--uds-path", uds], sock, tmp_path / "vs.log")
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(f"{uds}_77")
    lst.listen(1024)
    lst.setblocking(False)
    try:
        with connect(d, 2, protocol=ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG) as fe:
            fz = Fuzzer(fe, rng)
            for i in range(ROUNDS):
                if i % 3 == 0:
                    fz.chain(0, [], fz.sizes(2), held=True)  # rx buffers, any size
                op = rng.choice([1, 1, 2, 3, 4, 5, 5, 6, 7, 0, 99])
                length = rng.choice([0, 0, 10, 4096, 70000, 2**32 - 1])
                hdr = struct.pack("<QQIIIHHIII", rng.choice([3, 3, 3, 2, 4]),
                                  rng.choice([2, 2, 2, 3]), rng.randrange(5000, 5010),
                                  rng.choice([77, 77, 78]), length, rng.choice([1, 1, 2]), op,
                                  rng.randrange(4), rng.choice([0, 4096, 2**32 - 1]),
                                  rng.randrange(1 << 32))
                payload = fz.noise(min(length, rng.choice([0, 10, 4096])))
                fz.chain(1, [hdr[: rng.choice([44, 44, 44, 20])], payload], fz.sizes(1))
                try:
                    while True:
                        lst.accept()[0].close()
                except BlockingIOError:
                    pass
            fz.settle(1)
        with connect(d, 2, protocol=ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG) as fe:
            g = VsockClient(fe, 3, rx_buffers=16)
            g.send(6000, 77, 1)  # REQUEST
            assert g.recv()[0].op == 2, f"seed {s}"  # RESPONSE
        finish(d, s)
    finally:
        lst.close()
        d.stop()


@pytest.mark.parametrize("queues", [1])
def test_fuzz_scsi(tmp_path: Path, queues: int) -> None:
    s = seed()
    rng = random.Random(s)
    img = tmp_path / "lun0.img"
    img.write_bytes(bytes(4 << 20))
    sock = tmp_path / "sc.sock"
    d = Daemon(["vhostuser.cli.scsi", "--socket-path", str(sock), "--disk", str(img),
                "--disk", f"{img},read-only"], sock, tmp_path / "sc.log")
    try:
        with connect(d, 3) as fe:
            fz = Fuzzer(fe, rng)
            for _ in range(ROUNDS):
                op = rng.choice([*SCSI_OPS, rng.randrange(256)])
                cdb = bytes([op]) + fz.noise(31)
                if rng.random() < 0.5:  # plausible lengths reach the data paths
                    cdb = cdb[:2] + bytes(6) + bytes([0, rng.randrange(4), 0]) + cdb[11:]
                field = rng.choice([lun_field(0), lun_field(1), lun_field(9), fz.noise(8)])
                req = struct.pack("<8sQBBB32s", field, 0, 0, 0, 0, cdb)
                fz.chain(2, [req[: rng.choice([51, 51, 51, 30])],
                             *[fz.noise(n) for n in fz.sizes(2)]],
                         [rng.choice([108, 108, 50]), *fz.sizes(2)])
                ctrl = struct.pack("<II8sQ", rng.choice([0, 0, 1, 2, 7]), rng.randrange(10),
                                   rng.choice([lun_field(0), fz.noise(8)]), 0)
                fz.chain(0, [ctrl[: rng.choice([24, 24, 16, 3])]], fz.sizes(1))
            fz.settle(2)
            fz.settle(0)
        with connect(d, 3) as fe:
            c = ScsiClient(fe)
            data = os.urandom(4096)
            write = struct.pack(">BBIBHB", 0x2A, 0, 8, 0, 8, 0)
            r = c.command(write, data_out=data)
            if r.status == 2 and r.key_code[0] == 6:  # a unit attention the fuzz left
                r = c.command(write, data_out=data)
            assert (r.response, r.status) == (0, 0), f"seed {s}: {r}"
            read = struct.pack(">BBIBHB", 0x28, 0, 8, 0, 8, 0)
            assert c.command(read, data_in=4096).data == data, f"seed {s}"
        finish(d, s)
    finally:
        d.stop()
