"""vhost-user-scsi conformance, driven by the Python front-end over every command and error
path the back-end claims: answers are checked against SPC-4/SBC-3 (opcodes, sense keys and
additional sense codes are the standards' numbers, written out here) and against the image
files on the host. The guest's view is in test_qemu_scsi.py."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon

from vhostuser.frontend.client import Frontend
from vhostuser.frontend.scsi import Result, ScsiClient
from vhostuser.protocol import VirtioFeature

MiB = 1 << 20
GOOD, CHECK = 0, 2
ILLEGAL, UNIT_ATTENTION, DATA_PROTECT, MISCOMPARE = 0x05, 0x06, 0x07, 0x0E
FEATURES = VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX | (1 << 1) | (1 << 2)
WWN = 0x5000C500A1B2C3D4


class Target:
    def __init__(self, tmp_path: Path) -> None:
        self.rw, self.ro = tmp_path / "rw.img", tmp_path / "ro.img"
        self.pattern = os.urandom(MiB)
        self.rw.write_bytes(self.pattern)
        os.truncate(self.rw, 8 * MiB)
        self.ro.write_bytes(self.pattern[: 4 * 4096])
        os.truncate(self.ro, 4 * MiB)
        sock = tmp_path / "scsi.sock"
        self.d = Daemon(["vhostuser.cli.scsi", "--socket-path", str(sock), "--disk",
                         f"{self.rw},serial=SN-RW,wwn={WWN:x}", "--disk",
                         f"{self.ro},read-only"], sock, tmp_path / "scsi.log")
        self.fe = Frontend(self.d.sock)
        self.fe.negotiate(FEATURES)
        self.fe.set_mem_table()
        for q in range(3):
            self.fe.setup_queue(q, 64)
        self.c = ScsiClient(self.fe)

    def close(self) -> None:
        self.fe.close()
        assert self.d.stop() == 0, self.d.log()
        assert "Traceback" not in self.d.log(), self.d.log()


@pytest.fixture
def t(tmp_path: Path) -> Iterator[Target]:
    target = Target(tmp_path)
    yield target
    target.close()


def good(r: Result) -> Result:
    assert (r.response, r.status) == (0, GOOD), (r.response, r.status, r.sense.hex())
    return r


def check(r: Result, key: int, asc: int, ascq: int) -> None:
    assert (r.response, r.status) == (0, CHECK), (r.response, r.status)
    assert r.key_code == (key, asc, ascq), r.sense.hex()


def cdb10(op: int, lba: int, blocks: int, byte1: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, byte1, lba, 0, blocks, 0)


def cdb16(op: int, lba: int, blocks: int, byte1: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, byte1, lba, blocks, 0, 0)


def test_test_unit_ready_and_request_sense(t: Target) -> None:
    good(t.c.command(b"\x00"))
    r = good(t.c.command(bytes([0x03, 0, 0, 0, 18, 0]), data_in=18))
    assert r.data[0] == 0x70 and r.data[2] & 0x0F == 0 and r.data[12:14] == b"\0\0"


def test_standard_inquiry(t: Target) -> None:
    r = good(t.c.command(bytes([0x12, 0, 0, 0, 96, 0]), data_in=96))
    assert r.data[0] == 0x00 and r.data[2] == 0x06  # direct access, SPC-4
    assert r.data[8:16] == b"VHOSTUSR" and r.data[16:32] == b"Python SCSI disk"
    short = good(t.c.command(bytes([0x12, 0, 0, 0, 5, 0]), data_in=64))  # allocation length
    assert len(short.data) == 5 and short.residual == 59


def test_vpd_pages(t: Target) -> None:
    def vpd(page: int, lun: int = 0) -> bytes:
        r = good(t.c.command(bytes([0x12, 1, page, 1, 0, 0]), lun, data_in=256))
        assert r.data[1] == page
        return r.data[4 : 4 + int.from_bytes(r.data[2:4], "big")]

    assert set(vpd(0x00)) >= {0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2}
    assert vpd(0x80) == b"SN-RW"
    ids = vpd(0x83)
    assert ids[:4] == bytes([0x01, 0x03, 0x00, 0x08])  # binary, NAA, 8 bytes
    assert int.from_bytes(ids[4:12], "big") == WWN
    limits = vpd(0xB0)
    assert limits[0] & 0x01 and limits[1] > 0  # WSNZ; a compare-and-write length
    assert int.from_bytes(limits[2:4], "big") == 8  # transfer length granularity
    assert int.from_bytes(limits[4:8], "big") > 0  # maximum transfer length
    assert int.from_bytes(limits[8:12], "big") == 0  # no optimal length (Linux's max I/O)
    assert int.from_bytes(limits[16:20], "big") > 0  # maximum unmap LBA count
    assert vpd(0xB1)[:2] == b"\x00\x01"  # non-rotating medium
    assert vpd(0xB2)[1] & 0xE0 == 0xE0  # LBPU, LBPWS, LBPWS10
    assert vpd(0xB2, lun=1)[1] & 0xE0 == 0  # read-only: nothing to unmap
    check(t.c.command(bytes([0x12, 1, 0x99, 1, 0, 0]), data_in=256), ILLEGAL, 0x24, 0)


def test_report_luns_and_absent_luns(t: Target) -> None:
    r = good(t.c.command(struct.pack(">BxxxxxIxx", 0xA0, 64), data_in=64))
    assert int.from_bytes(r.data[:4], "big") == 16
    assert r.data[8:24] == bytes(8) + bytes([0, 1]) + bytes(6)
    check(t.c.command(struct.pack(">BxxxxxIxx", 0xA0, 8), data_in=64), ILLEGAL, 0x24, 0)
    absent = good(t.c.command(bytes([0x12, 0, 0, 0, 36, 0]), lun=5, data_in=36))
    assert absent.data[0] == 0x7F  # peripheral qualifier 3: no logical unit here
    assert absent.data[4] == 31  # and a whole standard INQUIRY answer
    check(t.c.command(b"\x00", lun=5), ILLEGAL, 0x25, 0)
    sense = good(t.c.command(bytes([0x03, 0, 0, 0, 18, 0]), lun=5, data_in=18)).data
    assert (sense[2] & 0x0F, sense[12]) == (ILLEGAL, 0x25)  # REQUEST SENSE says why
    assert t.c.command(b"\x00", target=1).response == 3  # VIRTIO_SCSI_S_BAD_TARGET
    assert t.c.command(b"\x00", field=b"\x02" + bytes(7)).response == 3


def test_read_capacity(t: Target) -> None:
    r = good(t.c.command(bytes(10)[:0] + bytes([0x25]) + bytes(9), data_in=8))
    assert struct.unpack(">II", r.data) == (8 * MiB // 512 - 1, 512)
    r16 = good(t.c.command(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), data_in=32))
    assert struct.unpack(">QI", r16.data[:12]) == (8 * MiB // 512 - 1, 512)
    assert r16.data[14] & 0x80  # LBPME: thin provisioned, UNMAP works


def test_reads_and_writes_of_every_size(t: Target) -> None:
    c = t.c
    assert good(c.command(bytes([0x08, 0, 0, 2, 1, 0]), data_in=512)).data == t.pattern[1024:1536]
    assert good(c.command(cdb10(0x28, 4, 8), data_in=4096)).data == t.pattern[2048:6144]
    assert good(c.command(struct.pack(">BBIIBB", 0xA8, 0, 16, 2, 0, 0),
                          data_in=1024)).data == t.pattern[8192:9216]
    assert good(c.command(cdb16(0x88, 32, 1), data_in=512)).data == t.pattern[16384:16896]
    writes = [(bytes([0x0A, 0, 0, 100, 1, 0]), 100, 1), (cdb10(0x2A, 200, 2, 0x08), 200, 2),
              (struct.pack(">BBIIBB", 0xAA, 0, 300, 3, 0, 0), 300, 3),
              (cdb16(0x8A, 400, 4), 400, 4)]
    for cdb, lba, n in writes:
        data = os.urandom(512 * n)
        good(c.command(cdb, data_out=data))
        assert good(c.command(cdb16(0x88, lba, n), data_in=512 * n)).data == data
        with open(t.rw, "rb") as f:
            f.seek(lba * 512)
            assert f.read(512 * n) == data


def test_out_of_range_read_only_and_unknown(t: Target) -> None:
    last = 8 * MiB // 512
    check(t.c.command(cdb10(0x28, last, 1), data_in=512), ILLEGAL, 0x21, 0)
    check(t.c.command(cdb16(0x88, 2**63, 1), data_in=512), ILLEGAL, 0x21, 0)
    check(t.c.command(cdb10(0x2A, 0, 1), lun=1, data_out=bytes(512)), DATA_PROTECT, 0x27, 0)
    check(t.c.command(bytes([0xC0]) + bytes(15)), ILLEGAL, 0x20, 0)
    check(t.c.command(bytes([0x5E]) + bytes(9)), ILLEGAL, 0x20, 0)  # PERSISTENT RESERVE IN


def test_verify_and_compare_and_write(t: Target) -> None:
    c = t.c
    good(c.command(cdb10(0x2F, 0, 2, byte1=0x02), data_out=t.pattern[:1024]))
    other = bytearray(t.pattern[:1024])
    other[700] ^= 0xFF
    r = c.command(cdb10(0x2F, 0, 2, byte1=0x02), data_out=bytes(other))
    check(r, MISCOMPARE, 0x1D, 0)
    assert r.sense[0] & 0x80 and int.from_bytes(r.sense[3:7], "big") == 700  # the offset
    good(c.command(cdb16(0x8F, 0, 4)))  # BYTCHK 0: a range check
    new = os.urandom(512)
    caw = struct.pack(">BBQxxxBxB", 0x89, 0, 10, 1, 0)
    good(c.command(caw, data_out=t.pattern[5120:5632] + new))
    assert good(c.command(cdb10(0x28, 10, 1), data_in=512)).data == new
    check(c.command(caw, data_out=t.pattern[5120:5632] + new), MISCOMPARE, 0x1D, 0)


def test_write_same_unmap_and_discards(t: Target) -> None:
    c = t.c
    block = os.urandom(512)
    good(c.command(cdb10(0x41, 64, 8), data_out=block))  # WRITE SAME (10): a pattern
    assert good(c.command(cdb10(0x28, 64, 8), data_in=4096)).data == block * 8
    good(c.command(cdb16(0x93, 1024, 256, byte1=0x08), data_out=bytes(512)))  # UNMAP bit
    params = struct.pack(">HHxxxx", 22, 16) + struct.pack(">QIxxxx", 2048, 128)
    good(c.command(struct.pack(">BBxxxxxHx", 0x42, 0, len(params)), data_out=params))
    fd = os.open(t.rw, os.O_RDONLY)
    try:
        assert os.lseek(fd, 1024 * 512, os.SEEK_HOLE) == 1024 * 512, "no hole punched"
        assert os.lseek(fd, 2048 * 512, os.SEEK_HOLE) == 2048 * 512, "no hole punched"
    finally:
        os.close(fd)
    for lba, n in ((1024, 256), (2048, 128)):
        assert good(c.command(cdb16(0x88, lba, n), data_in=512 * n)).data == bytes(512 * n)
    check(c.command(struct.pack(">BBxxxxxHx", 0x42, 0, 4), data_out=bytes(4)),
          ILLEGAL, 0x1A, 0)  # shorter than the parameter list header
    many = struct.pack(">HHxxxx", 6 + 32, 32) + struct.pack(">QIxxxx", 0, 1 << 22) * 2
    check(c.command(struct.pack(">BBxxxxxHx", 0x42, 0, len(many)), data_out=many),
          ILLEGAL, 0x26, 0)  # more than the maximum unmap LBA count, in one command
    beyond = struct.pack(">HHxxxx", 22, 16) + struct.pack(">QIxxxx", 8 * MiB // 512, 1)
    check(c.command(struct.pack(">BBxxxxxHx", 0x42, 0, len(beyond)), data_out=beyond),
          ILLEGAL, 0x21, 0)
    good(c.command(cdb10(0x35, 0, 0)))  # SYNCHRONIZE CACHE (10)
    good(c.command(cdb16(0x91, 0, 0)))  # (16)
    good(c.command(bytes([0x1B, 0, 0, 0, 1, 0])))  # START STOP UNIT


def test_mode_pages_and_write_cache(t: Target) -> None:
    c = t.c
    r = good(c.command(bytes([0x1A, 0, 0x08, 0, 64, 0]), data_in=64))  # MODE SENSE (6)
    bd = r.data[3]
    caching = r.data[4 + bd :]
    assert bd == 8 and caching[0] & 0x3F == 0x08 and caching[2] & 0x04  # WCE on
    assert r.data[2] & 0x80 == 0  # not write protected
    changeable = good(c.command(bytes([0x1A, 0x08, 0x48, 0, 64, 0]), data_in=64)).data
    assert changeable[4 + 2] == 0x04  # only WCE can change
    check(c.command(bytes([0x1A, 0, 0xC8, 0, 64, 0]), data_in=64), ILLEGAL, 0x39, 0)
    page = bytearray(caching[:20])
    page[0] &= 0x3F
    page[2] &= ~0x04  # write cache off
    good(c.command(bytes([0x15, 0x10, 0, 0, 4 + 20, 0]), data_out=bytes(4) + bytes(page)))
    after = good(c.command(bytes([0x5A, 0x08, 0x08, 0, 0, 0, 0, 0, 64, 0]), data_in=64)).data
    assert after[8] == 0x08 and after[8 + 2] & 0x04 == 0  # MODE SENSE (10), DBD: WCE off
    page[3] = 0xAA  # another field of the caching page: not changeable
    check(c.command(bytes([0x15, 0x10, 0, 0, 24, 0]), data_out=bytes(4) + bytes(page)),
          ILLEGAL, 0x26, 0)
    ro = good(c.command(bytes([0x1A, 0, 0x3F, 0, 255, 0]), lun=1, data_in=255)).data
    assert ro[2] & 0x80  # write protected
    control = ro[4 + ro[3] + 20 :]
    assert control[0] & 0x3F == 0x0A


def test_report_supported_operation_codes(t: Target) -> None:
    c = t.c
    r = good(c.command(struct.pack(">BBBBHIxx", 0xA3, 0x0C, 0, 0, 0, 4096), data_in=4096))
    n = int.from_bytes(r.data[:4], "big")
    ops = {r.data[4 + i] for i in range(0, n, 8)}
    assert {0x00, 0x12, 0x28, 0x2A, 0x42, 0x88, 0x8A, 0x93, 0x89, 0xA0} <= ops
    one = good(c.command(struct.pack(">BBBBHIxx", 0xA3, 0x0C, 1, 0x93, 0, 64), data_in=64))
    assert one.data[1] & 0x07 == 0x03 and int.from_bytes(one.data[2:4], "big") == 16
    none = good(c.command(struct.pack(">BBBBHIxx", 0xA3, 0x0C, 1, 0x5E, 0, 64), data_in=64))
    assert none.data[1] & 0x07 == 0x01  # not supported
    cap16 = good(c.command(struct.pack(">BBBBHIxx", 0xA3, 0x0C, 2, 0x9E, 0x10, 64),
                           data_in=64))  # a service action, asked with option 2...
    assert cap16.data[1] & 0x07 == 0x03
    three = good(c.command(struct.pack(">BBBBHIxx", 0xA3, 0x0C, 3, 0x28, 0, 64), data_in=64))
    assert three.data[1] & 0x07 == 0x03  # ...or 3, which takes any opcode
    check(c.command(struct.pack(">BBBBHIxx", 0xA3, 0x0C, 2, 0x28, 0, 64), data_in=64),
          ILLEGAL, 0x24, 0)  # option 2 on an opcode without service actions
    check(c.command(struct.pack(">BBBBHIxx", 0xA3, 0x0C, 1, 0x9E, 0, 64), data_in=64),
          ILLEGAL, 0x24, 0)  # option 1 on one with them


def test_resize_unit_attention_and_event(t: Target) -> None:
    ring = t.fe.queues[1].ring
    ev = t.fe.ram.alloc(16)
    ring.add([(ev, 16, True)])
    t.fe.kick(1)
    os.truncate(t.rw, 12 * MiB)
    t.fe.wait_used(1, timeout=10)
    event, lun, reason = struct.unpack("<I8sI", bytes(t.fe.ram.at(ev, 16)))
    assert (event, lun[:4], reason & 0xFF, reason >> 8) == (3, b"\x01\x00\x00\x00", 0x2A, 0x09)
    check(t.c.command(b"\x00"), UNIT_ATTENTION, 0x2A, 0x09)  # once...
    good(t.c.command(b"\x00"))  # ...then the new size
    r = good(t.c.command(bytes([0x25]) + bytes(9), data_in=8))
    assert struct.unpack(">II", r.data) == (12 * MiB // 512 - 1, 512)


def test_an_image_cut_below_one_block(t: Target) -> None:
    """No medium: NOT READY, MEDIUM NOT PRESENT (after the capacity unit attention), never
    a failed queue; growing it back brings the LUN back."""
    os.truncate(t.rw, 100)
    t.d.wait_log("image resized")
    check(t.c.command(b"\x00"), UNIT_ATTENTION, 0x2A, 0x09)
    check(t.c.command(bytes([0x25]) + bytes(9), data_in=8), 0x02, 0x3A, 0)
    os.truncate(t.rw, MiB)
    t.d.wait_log("image resized", count=2)
    check(t.c.command(b"\x00"), UNIT_ATTENTION, 0x2A, 0x09)
    good(t.c.command(b"\x00"))


def test_task_management_waits_for_requests_in_hand(t: Target) -> None:
    """A TMF is answered only once no request queue has requests in hand: once the first
    of 16 reads has completed (the request worker is at them), an ABORT TASK's answer comes
    after all of them."""
    ram, ring = t.fe.ram, t.fe.queues[2].ring
    data = ram.alloc(8 * MiB, 4096)  # shared by the reads: only their completion matters
    for i in range(16):  # 8 MiB each, from another process than the control queue's
        req = ram.alloc(51)
        ram.at(req, 51)[:] = struct.pack("<8sQBBB32s", bytes([1, 0, 0x40, 0]) + bytes(4), i,
                                         0, 0, 0, cdb10(0x28, 0, 16384))
        ring.add([(req, 51, False), (ram.alloc(108), 108, True), (data, 8 * MiB, True)])
    t.fe.kick(2)
    done = len(t.fe.wait_used(2, 1, timeout=20))
    assert t.c.tmf(0) == 0
    done += len(ring.take_used())
    assert done == 16, f"the TMF was answered with {16 - done} reads still in hand"


def test_task_management_and_notifications(t: Target) -> None:
    c = t.c
    assert c.tmf(0) == 0  # ABORT TASK: nothing in flight, complete
    assert c.tmf(6) == 0  # QUERY TASK: no such task
    assert c.tmf(5) == 0  # LOGICAL UNIT RESET...
    check(c.command(b"\x00"), UNIT_ATTENTION, 0x29, 0x03)  # ...leaves its unit attention
    good(c.command(b"\x00"))
    assert c.tmf(4) == 0  # I_T NEXUS RESET: every LUN
    check(c.command(b"\x00", lun=1), UNIT_ATTENTION, 0x29, 0x07)
    assert c.tmf(5, lun=9) == 12  # VIRTIO_SCSI_S_INCORRECT_LUN
    assert c.tmf(5, target=3) == 3  # BAD_TARGET
    assert c.tmf(42) == 11  # FUNCTION_REJECTED
    assert c.an_query(0xFFFF) == (0, 0)  # no asynchronous notifications


def test_bad_buffers_are_transport_errors_and_the_target_goes_on(t: Target) -> None:
    assert t.c.command(cdb10(0x28, 0, 8), data_in=512).response == 1  # OVERRUN: too small
    assert t.c.command(cdb10(0x2A, 0, 8), data_out=bytes(512)).response == 1
    ring = t.fe.queues[2].ring  # a request with no room for a response: unanswered
    gpa = t.fe.ram.alloc(64)
    ring.add([(gpa, 51, False)])
    t.fe.kick(2)
    assert t.fe.wait_used(2)[0][1] == 0
    good(t.c.command(b"\x00"))
    t.d.wait_log("no room for the request or the response header")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhostuser.cli.scsi", *args],
                          capture_output=True, text=True, timeout=30)


def test_print_capabilities() -> None:
    out = run_cli("--print-capabilities")
    assert out.returncode == 0 and json.loads(out.stdout) == {"type": "scsi", "features": []}


@pytest.mark.parametrize("args, message", [
    ([], "at least one --disk"),
    (["--disk", "x.img,wwn=zz"], "64-bit NAA identifier"),
    (["--disk", "x.img,colour=red"], "not read-only, serial=S or wwn=HEX"),
    (["--disk", "x.img", "--num-queues", "0"], "--num-queues must be between"),
])
def test_bad_arguments_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    out = run_cli("--socket-path", str(tmp_path / "s"), *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_a_missing_image_is_a_clear_error(tmp_path: Path) -> None:
    out = run_cli("--socket-path", str(tmp_path / "s"), "--disk", str(tmp_path / "none.img"))
    assert out.returncode == 1 and out.stderr.startswith("error: ") and "No such file" in \
        out.stderr, out.stderr



def test_task_management_after_a_request_queue_stopped_mid_traffic(t: Target) -> None:
    """A request queue stopped with requests still in its ring (GET_VRING_BASE) holds
    nothing any more: a TMF is answered (it used to wait for ever)."""
    ram, ring = t.fe.ram, t.fe.queues[2].ring
    data = ram.alloc(8 * MiB, 4096)
    for i in range(21):
        req = ram.alloc(51)
        ram.at(req, 51)[:] = struct.pack("<8sQBBB32s", bytes([1, 0, 0x40, 0]) + bytes(4), i,
                                         0, 0, 0, cdb10(0x28, 0, 16384))
        ring.add([(req, 51, False), (ram.alloc(108), 108, True), (data, 8 * MiB, True)])
    t.fe.kick(2)
    t.fe.wait_used(2, 1, timeout=20)
    t.fe.get_vring_base(2)
    assert t.c.tmf(5) == 0  # LOGICAL UNIT RESET, answered
