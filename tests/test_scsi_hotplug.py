"""vhost-user-scsi LUNs added and removed at run time (`--control`, `vhost-user-scsi lun`),
driven by the Python front-end: the guest is told with a transport-reset event (rescan,
or removed), the new LUN answers, a removed one is gone from REPORT LUNS and says LOGICAL
UNIT NOT SUPPORTED; bad commands get a clear error and the target keeps serving."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon

from vhostuser.frontend.client import Frontend
from vhostuser.frontend.scsi import ScsiClient
from vhostuser.protocol import VirtioFeature

FEATURES = VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX | (1 << 1) | (1 << 2)
EVENT = struct.Struct("<I8sI")
TRANSPORT_RESET, RESCAN, REMOVED = 1, 1, 2
INQUIRY = bytes([0x12, 0, 0, 0, 36, 0])
# an event's LUN as Linux reads it (bytes 2-3 as the number, no addressing flag below 256)
EVENT_LUN1 = bytes([1, 0, 0, 1]) + bytes(4)
REPORT_LUNS = bytes([0xA0, 0, 0, 0, 0, 0]) + (4096).to_bytes(4, "big") + bytes(2)


class Target:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        for name in ("a.img", "b.img"):
            with open(tmp_path / name, "wb") as f:
                f.truncate(4 << 20)
        sock, self.control = tmp_path / "scsi.sock", str(tmp_path / "ctl.sock")
        self.d = Daemon(["vhostuser.cli.scsi", "--socket-path", str(sock), "--disk",
                         str(tmp_path / "a.img"), "--control", self.control], sock,
                        tmp_path / "scsi.log")
        self.fe = Frontend(self.d.sock)
        self.fe.negotiate(FEATURES)
        self.fe.set_mem_table()
        for q in range(3):
            self.fe.setup_queue(q, 64)
        self.c = ScsiClient(self.fe)
        self.events = [self.fe.ram.alloc(EVENT.size) for _ in range(4)]
        self.posted: dict[int, int] = {}
        for gpa in self.events:
            self.post(gpa)

    def post(self, gpa: int) -> None:
        self.posted[self.fe.queues[1].ring.add([(gpa, EVENT.size, True)])] = gpa
        self.fe.kick(1)

    def event(self) -> tuple[int, bytes, int]:
        [(head, written)] = self.fe.wait_used(1, 1, timeout=10)
        gpa = self.posted.pop(head)
        assert written == EVENT.size
        ev = EVENT.unpack(bytes(self.fe.ram.at(gpa, EVENT.size)))
        self.post(gpa)
        return ev

    def lun(self, *args: str) -> tuple[int, dict[str, object], str]:
        out = subprocess.run([sys.executable, "-m", "vhostuser.cli.scsi", "lun", "--control",
                              self.control, *args], capture_output=True, text=True,
                             timeout=30)
        return out.returncode, json.loads(out.stdout) if out.returncode == 0 else {}, out.stderr

    def luns(self) -> list[int]:
        r = self.c.command(REPORT_LUNS, data_in=4096)
        n = int.from_bytes(r.data[:4], "big") // 8
        return [r.data[8 + 8 * i + 1] for i in range(n)]

    def close(self) -> None:
        self.fe.close()
        assert self.d.stop() == 0, self.d.log()
        assert "Traceback" not in self.d.log(), self.d.log()


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    t = Target(tmp_path)
    yield t
    t.close()


def test_a_lun_added_and_removed_at_run_time(target: Target) -> None:
    t = target
    assert t.luns() == [0]
    assert t.c.command(INQUIRY, lun=1, data_in=36).data[0] == 0x7F  # nothing there yet
    rc, reply, err = t.lun("add", f"{t.tmp / 'b.img'},serial=HOT-1")
    assert rc == 0 and reply == {"lun": 1}, err
    assert t.event() == (TRANSPORT_RESET, EVENT_LUN1, RESCAN)
    inq = t.c.command(INQUIRY, lun=1, data_in=36)
    assert inq.status == 0 and inq.data[0] == 0x00 and inq.data[8:16] == b"VHOSTUSR"
    assert t.luns() == [0, 1]
    data = bytes(range(256)) * 16
    write = struct.pack(">BBIBHB", 0x2A, 0, 8, 0, 8, 0)  # WRITE (10): 8 blocks at 8
    assert t.c.command(write, lun=1, data_out=data).status == 0
    rc, reply, err = t.lun("list")
    assert rc == 0 and [x["lun"] for x in reply["luns"]] == [0, 1], reply  # type: ignore[union-attr]
    rc, reply, err = t.lun("remove", "1")
    assert rc == 0 and reply == {"removed": 1}, err
    assert t.event() == (TRANSPORT_RESET, EVENT_LUN1, REMOVED)
    gone = t.c.command(bytes([0, 0, 0, 0, 0, 0]), lun=1)  # TEST UNIT READY
    assert gone.status == 2 and gone.key_code == (0x05, 0x25, 0x00)  # LUN NOT SUPPORTED
    assert t.luns() == [0]
    assert (t.tmp / "b.img").read_bytes()[8 * 512 : 16 * 512] == data
    # the next LUN added takes the lowest free number again
    rc, reply, _ = t.lun("add", str(t.tmp / "b.img"))
    assert rc == 0 and reply == {"lun": 1}
    assert t.event() == (TRANSPORT_RESET, EVENT_LUN1, RESCAN)


@pytest.mark.parametrize(("args", "message"), [
    (["add", "/nonexistent.img"], "No such file"),
    (["remove", "7"], "no LUN 7"),
    (["add", "x.img,bogus"], "not read-only, serial=S or wwn=HEX"),
])
def test_bad_lun_commands_are_refused_and_the_target_serves_on(
        target: Target, args: list[str], message: str) -> None:
    rc, _, err = target.lun(*args)
    assert rc in (1, 2) and message in err, err
    assert target.luns() == [0]
    assert target.c.command(INQUIRY, data_in=36).status == 0


def test_garbage_on_the_control_socket(target: Target) -> None:
    import socket

    for payload in (b"not json\n", b"[1, 2]\n", b'{"cmd": "explode"}\n', b"\xff" * 5000):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(target.control)
            s.sendall(payload)
            reply = s.recv(65536)
        assert b'"error"' in reply, (payload, reply)
    assert target.c.command(INQUIRY, data_in=36).status == 0
