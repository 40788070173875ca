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
    def __init__(self, tmp_path: Path, event_buffers: int = 4) -> None:
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
        for gpa in self.events[:event_buffers]:
            self.post(gpa)

    def post(self, gpa: int) -> None:
        self.posted[self.fe.queues[1].ring.add([(gpa, EVENT.size, True)])] = gpa
        self.fe.kick(1)

    def event(self) -> tuple[int, bytes, int]:
        (ev,) = self.take_events(1)
        return ev

    def take_events(self, n: int) -> list[tuple[int, bytes, int]]:
        out, free = [], []
        for head, written in self.fe.wait_used(1, n, timeout=10):
            gpa = self.posted.pop(head)
            assert written == EVENT.size
            out.append(EVENT.unpack(bytes(self.fe.ram.at(gpa, EVENT.size))))
            free.append(gpa)
        for gpa in free:  # only once all are read: their heads are free again
            self.post(gpa)
        return out

    def lun(self, *args: str, cwd: Path | None = None) -> tuple[int, dict[str, object], str]:
        out = subprocess.run([sys.executable, "-m", "vhostuser.cli.scsi", "lun", "--control",
                              self.control, *args], capture_output=True, text=True,
                             timeout=30, cwd=cwd)
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
    # a new unit: its first command gets POWER ON, RESET OR BUS DEVICE RESET OCCURRED,
    # the others REPORTED LUNS DATA HAS CHANGED (SAM-5; INQUIRY and REPORT LUNS are exempt)
    tur = bytes(6)
    assert t.c.command(tur, lun=1).key_code == (0x06, 0x29, 0x00)
    assert t.c.command(tur, lun=0).key_code == (0x06, 0x3F, 0x0E)
    assert t.c.command(tur, lun=1).status == 0
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
    # the next LUN added takes the lowest free number again (its REMOVED is delivered)
    rc, reply, _ = t.lun("add", "b.img", cwd=t.tmp)  # relative to the client's directory
    assert rc == 0 and reply == {"lun": 1}
    assert t.event() == (TRANSPORT_RESET, EVENT_LUN1, RESCAN)


def test_a_number_is_not_reused_before_its_removal_reaches_the_guest(tmp_path: Path) -> None:
    """Added, removed, and another image added while the guest has posted no event
    buffer: the new LUN must not take the number whose REMOVED the guest has not seen (it
    would keep the old disk's device, page cache and mounts over the new image)."""
    t = Target(tmp_path, event_buffers=0)
    try:
        assert t.lun("add", str(t.tmp / "b.img"))[1] == {"lun": 1}
        assert t.lun("remove", "1")[1] == {"removed": 1}
        assert t.lun("add", str(t.tmp / "b.img"))[1] == {"lun": 2}
        for gpa in t.events:
            t.post(gpa)
        assert t.take_events(2) == [(TRANSPORT_RESET, EVENT_LUN1, REMOVED),
                                          (TRANSPORT_RESET, bytes([1, 0, 0, 2]) + bytes(4),
                                           RESCAN)]
    finally:
        t.close()


def test_an_image_that_would_block_is_refused_at_once(target: Target) -> None:
    """A FIFO (or a tty) is never opened: the daemon's main process must not wait for a
    writer (the front-end's next message would go unanswered)."""
    import os

    fifo = target.tmp / "fifo"
    os.mkfifo(fifo)
    rc, _, err = target.lun("add", f"{fifo},read-only")
    assert rc == 1 and "not a regular file or a block device" in err, err
    assert target.luns() == [0]


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

    for payload in (b"not json\n", b"[1, 2]\n", b'{"cmd": "explode"}\n', b"\xff" * 5000,
                    b"[" * 3000 + b"\n"):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(target.control)
            s.sendall(payload)
            reply = s.recv(65536)
        assert b'"error"' in reply, (payload, reply)
    assert target.c.command(INQUIRY, data_in=36).status == 0


def test_a_request_whose_client_gave_up_is_not_carried_out(tmp_path: Path) -> None:
    """No front-end connected: the control socket is not looked at, a client gives up.
    When a front-end comes, that request must not take effect behind the client's back."""
    import socket

    img = tmp_path / "a.img"
    with open(img, "wb") as f:
        f.truncate(4 << 20)
    sock, control = tmp_path / "scsi.sock", tmp_path / "ctl.sock"
    d = Daemon(["vhostuser.cli.scsi", "--socket-path", str(sock), "--disk", str(img),
                "--control", str(control)], sock, tmp_path / "scsi.log")
    try:
        with socket.socket(socket.AF_UNIX) as s:  # sends its request, then gives up
            s.connect(str(control))
            s.sendall(json.dumps({"cmd": "add", "disk": str(img)}).encode() + b"\n")
        with Frontend(d.sock) as fe:
            fe.negotiate(FEATURES)
            out = subprocess.run([sys.executable, "-m", "vhostuser.cli.scsi", "lun",
                                  "--control", str(control), "list"], capture_output=True,
                                 text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            assert [x["lun"] for x in json.loads(out.stdout)["luns"]] == [0]
    finally:
        assert d.stop() == 0, d.log()
