"""vhost-user-blk driven by the Python front-end over a real socket: every request type,
config space, features, rings in all modes, multi-queue workers, reconnects."""

from __future__ import annotations

import errno
import json
import os
import select
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon import BLK_FEATURES, Daemon, Program, blk_session

from vhostuser.frontend.blk import T_GET_ID, BlkClient
from vhostuser.frontend.client import BackendError, Frontend
from vhostuser.protocol import FrontendReq, ProtocolFeature, VirtioFeature
from vhostuser.protocol import payloads as p
from vhostuser.virtq.guest_ram import GuestRam

OK, IOERR, UNSUPP = 0, 1, 2
F_RO, F_MQ = 1 << 5, 1 << 12


def sector_pattern(s: int) -> bytes:
    return s.to_bytes(4, "little") * 128


def test_read_write_flush_id(blk_daemon: Callable[..., Daemon], image: Path) -> None:
    d = blk_daemon("--serial", "SN-1234")
    fe, (blk,) = blk_session(d.sock)
    with fe:
        status, data = blk.read(10, 4096)
        assert status == OK and data == b"".join(sector_pattern(s) for s in range(10, 18))
        payload = os.urandom(64 << 10)
        assert blk.write(100, payload) == OK
        assert blk.flush() == OK
        assert blk.read(100, len(payload)) == (OK, payload)
        assert blk.get_id() == (OK, b"SN-1234".ljust(20, b"\0"))
    with open(image, "rb") as f:  # the image file holds what the guest wrote
        f.seek(100 * 512)
        assert f.read(len(payload)) == payload


def test_used_lengths(blk_daemon: Callable[..., Daemon]) -> None:
    fe, (blk,) = blk_session(blk_daemon().sock)
    with fe:
        h = blk.submit(0, 0, in_len=1024)
        assert blk.complete()[h][2] == 1024 + 1  # data + status byte
        h = blk.submit(1, 0, out=bytes(512))
        assert blk.complete()[h][2] == 1


def test_errors_and_unsupported(blk_daemon: Callable[..., Daemon]) -> None:
    fe, (blk,) = blk_session(blk_daemon().sock)
    capacity = 16 * 2048
    with fe:
        assert blk.read(capacity - 1, 512)[0] == OK
        assert blk.read(capacity - 1, 1024)[0] == IOERR  # crosses the end
        assert blk.read(capacity, 512)[0] == IOERR
        assert blk.write(capacity, bytes(512)) == IOERR
        assert blk.read((1 << 64) - 1, 512)[0] == IOERR
        assert blk.read(0, 100)[0] == IOERR  # not a whole sector
        assert blk.request(99)[0] == UNSUPP  # unknown request type
        assert blk.request(10)[0] == UNSUPP  # GET_LIFETIME: not offered
        assert blk.discard([(0, 8, 1)]) == UNSUPP  # unmap flag on DISCARD
        assert blk.write_zeroes([(0, 8, 2)]) == UNSUPP  # unknown segment flag
        assert blk.discard([(capacity - 4, 8, 0)]) == IOERR
        assert blk.discard([]) == IOERR
        assert blk.read(0, 512)[0] == OK  # and the queue still works


def test_discard_and_write_zeroes(blk_daemon: Callable[..., Daemon], image: Path) -> None:
    fe, (blk,) = blk_session(blk_daemon().sock)
    with fe:
        assert blk.discard([(0, 16, 0), (64, 8, 0)]) == OK
        assert blk.write_zeroes([(200, 8, 0)]) == OK
        assert blk.write_zeroes([(300, 16, 1)]) == OK  # with unmap: a hole
        assert blk.read(200, 4096) == (OK, bytes(4096))
        assert blk.read(300, 8192) == (OK, bytes(8192))
        assert blk.read(208, 512) == (OK, sector_pattern(208))
    data = image.read_bytes()
    assert data[200 * 512 : 208 * 512] == bytes(4096)
    assert data[300 * 512 : 316 * 512] == bytes(8192)
    assert data[316 * 512 : 317 * 512] == sector_pattern(316)
    assert data[0:512] == bytes(512)  # tmpfs punches holes: discarded reads as zeros


def test_config_space(blk_daemon: Callable[..., Daemon]) -> None:
    fe, _ = blk_session(blk_daemon("--num-queues", "3").sock, queues=1)
    with fe:
        cfg = fe.get_config(60)
        capacity, size_max, seg_max = struct.unpack_from("<QII", cfg, 0)
        assert capacity == 16 * 2048 and size_max >= 4096 and seg_max >= 1
        assert struct.unpack_from("<I", cfg, 20)[0] == 512  # blk_size
        assert cfg[32] == 1  # writeback
        assert struct.unpack_from("<H", cfg, 34)[0] == 3  # num_queues
        max_discard, discard_seg, _align, max_wz, wz_seg = struct.unpack_from("<5I", cfg, 36)
        assert max_discard > 0 and discard_seg > 0 and max_wz > 0 and wz_seg > 0
        assert cfg[56] == 1  # write_zeroes_may_unmap
        assert fe.get_config(4, offset=32)[0] == 1
        assert fe.get_u64(FrontendReq.GET_QUEUE_NUM) == 3
        fe.call(FrontendReq.SET_CONFIG, p.Config(32, 1, 0, b"\0"))  # writethrough
        assert fe.get_config(1, offset=32) == b"\0"
        with pytest.raises(BackendError):  # capacity is read-only
            fe.call(FrontendReq.SET_CONFIG, p.Config(0, 8, 0, bytes(8)))
        with pytest.raises(BackendError, match="answered 0 bytes"):  # beyond the space
            fe.get_config(16, offset=96)


def test_resize_without_a_backend_channel(blk_daemon: Callable[..., Daemon],
                                         image: Path) -> None:
    """A front-end that gave no back-end channel still reads the new size from the config
    (GET_CONFIG looks at the file), and I/O beyond the old end works at once."""
    fe, (blk,) = blk_session(blk_daemon().sock)
    with fe:
        assert struct.unpack_from("<Q", fe.get_config(8))[0] == 16 * 2048
        with open(image, "r+b") as f:
            f.truncate(20 << 20)
            f.seek(18 << 20)
            f.write(b"NEW!" * 128)
        assert struct.unpack_from("<Q", fe.get_config(8))[0] == 20 * 2048
        assert blk.read(18 * 2048, 512) == (0, b"NEW!" * 128)  # status OK


def test_writethrough_still_correct(blk_daemon: Callable[..., Daemon], image: Path) -> None:
    fe, (blk,) = blk_session(blk_daemon().sock)
    with fe:
        fe.call(FrontendReq.SET_CONFIG, p.Config(32, 1, 0, b"\0"))
        assert blk.write(8, b"W" * 512) == OK
    assert image.read_bytes()[8 * 512 : 9 * 512] == b"W" * 512


def test_read_only(blk_daemon: Callable[..., Daemon], image: Path) -> None:
    before = image.read_bytes()
    fe, (blk,) = blk_session(blk_daemon("--read-only").sock)
    with fe:
        assert fe.features & F_RO
        assert blk.read(5, 512) == (OK, sector_pattern(5))
        assert blk.write(5, bytes(512)) == IOERR
        assert blk.write_zeroes([(5, 1, 0)]) == IOERR
        assert blk.discard([(5, 1, 0)]) == IOERR
        assert blk.flush() == OK
    assert image.read_bytes() == before


@pytest.mark.parametrize("features", [
    BLK_FEATURES,
    BLK_FEATURES & ~VirtioFeature.RING_EVENT_IDX,
    BLK_FEATURES & ~VirtioFeature.RING_INDIRECT_DESC,
    BLK_FEATURES & ~VirtioFeature.PROTOCOL_FEATURES,  # rings enabled without SET_VRING_ENABLE
], ids=["all", "no-event-idx", "no-indirect", "no-protocol-features"])
def test_batches_in_every_ring_mode(blk_daemon: Callable[..., Daemon], features: int) -> None:
    fe, (blk,) = blk_session(blk_daemon().sock, features=features)
    with fe:
        indirect = bool(fe.features & VirtioFeature.RING_INDIRECT_DESC)
        for rnd in range(3):  # rounds wrap the 128-entry ring several times
            heads = {}
            for i in range(40):
                sector = (rnd * 40 + i) * 8
                heads[blk.submit(0, sector, in_len=4096, indirect=indirect and i % 2 == 0,
                                 kick=False)] = sector
            fe.kick(0)
            done = blk.complete(40)
            for head, sector in heads.items():
                status, data, _ = done[head]
                assert status == OK
                assert data == b"".join(sector_pattern(s) for s in range(sector, sector + 8))


def test_poll_mode_no_kick_fd(blk_daemon: Callable[..., Daemon]) -> None:
    """SET_VRING_KICK with NOFD: the back-end polls the ring; nobody kicks."""
    fe, (blk,) = blk_session(blk_daemon().sock)
    with fe:
        fe.call(FrontendReq.SET_VRING_KICK, p.VringFile.make(0, nofd=True))
        for i in range(5):
            h = blk.submit(0, i, in_len=512, kick=False)
            assert blk.complete()[h][:2] == (OK, sector_pattern(i))


def test_call_nofd_front_end_polls(blk_daemon: Callable[..., Daemon]) -> None:
    fe, (blk,) = blk_session(blk_daemon().sock)
    with fe:
        fe.call(FrontendReq.SET_VRING_CALL, p.VringFile.make(0, nofd=True))
        blk.submit(0, 3, in_len=512)
        deadline = time.monotonic() + 10
        while not (used := blk.ring.take_used()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(used) == 1


def test_multiqueue_runs_one_worker_per_queue(blk_daemon: Callable[..., Daemon]) -> None:
    d = blk_daemon("--num-queues", "2")
    fe, blks = blk_session(d.sock, queues=2)
    with fe:
        assert fe.features & F_MQ
        assert len(d.children()) == 2  # two worker processes: queues run in parallel
        heads = [(b, b.submit(0, 8 * i, in_len=4096, kick=False)) for i, b in enumerate(blks)]
        for i in range(2):
            fe.kick(i)
        for i, (b, h) in enumerate(heads):
            status, data, _ = b.complete()[h]
            assert status == OK and data[:512] == sector_pattern(8 * i)


def test_vring_base_stop_and_resume(blk_daemon: Callable[..., Daemon]) -> None:
    fe, (blk,) = blk_session(blk_daemon().sock)
    with fe:
        for i in range(7):
            assert blk.read(i, 512)[0] == OK
        assert fe.get_vring_base(0) == 7  # stops the ring, drained
        blk.submit(0, 0, in_len=512)  # not served while stopped
        with pytest.raises(TimeoutError):
            fe.wait_used(0, timeout=0.5)
        # restart the ring where it stopped (QEMU's start sequence)
        q = fe.queues[0]
        lay = q.ring.layout()
        fe.call(FrontendReq.SET_VRING_BASE, p.VringState(0, 7))
        fe.call(FrontendReq.SET_VRING_ADDR, p.VringAddr(0, 0, lay.desc, lay.used, lay.avail, 0))
        fe.call(FrontendReq.SET_VRING_KICK, p.VringFile.make(0), fds=(q.kick,))
        fe.call(FrontendReq.SET_VRING_CALL, p.VringFile.make(0), fds=(q.call,))
        fe.call(FrontendReq.SET_VRING_ENABLE, p.VringState(0, 1))
        fe.kick(0)
        assert len(fe.wait_used(0)) == 1


def test_disabled_ring_is_not_served(blk_daemon: Callable[..., Daemon]) -> None:
    fe, (blk,) = blk_session(blk_daemon().sock)
    with fe:
        fe.call(FrontendReq.SET_VRING_ENABLE, p.VringState(0, 0))
        head = blk.submit(0, 1, in_len=512)
        with pytest.raises(TimeoutError):
            fe.wait_used(0, timeout=0.5)
        fe.call(FrontendReq.SET_VRING_ENABLE, p.VringState(0, 1))
        fe.kick(0)
        assert blk.complete()[head][:2] == (OK, sector_pattern(1))


def test_a_restarted_queue_serves_what_waits_without_a_kick(
        blk_daemon: Callable[..., Daemon]) -> None:
    """Chains made available while no worker ran (their kick taken by a worker stopped
    before it served them, or never sent) are served by the next worker at once."""
    fe, (blk,) = blk_session(blk_daemon().sock)
    with fe:
        fe.call(FrontendReq.SET_VRING_ENABLE, p.VringState(0, 0))
        head = blk.submit(0, 1, in_len=512, kick=False)
        fe.call(FrontendReq.SET_VRING_ENABLE, p.VringState(0, 1))  # and no kick
        assert blk.complete()[head][:2] == (OK, sector_pattern(1))


def test_a_new_call_fd_is_signalled_at_once(blk_daemon: Callable[..., Daemon]) -> None:
    """A completion signalled on a call fd that the front-end then replaces would be lost
    (QEMU swaps its masked notifier for the guest's irqfd, unacked, just after starting):
    the new call fd is signalled as it comes, and the driver looks at the used ring."""
    fe, _ = blk_session(blk_daemon().sock)
    with fe:
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            fe.call(FrontendReq.SET_VRING_CALL, p.VringFile.make(0), fds=(call,))
            assert select.select([call], [], [], 5)[0], "the new call fd was not signalled"
            assert os.eventfd_read(call) == 1
        finally:
            os.close(call)


def test_repeated_messages_are_idempotent(blk_daemon: Callable[..., Daemon]) -> None:
    fe, (blk,) = blk_session(blk_daemon().sock)
    with fe:
        for _ in range(3):  # as QEMU repeats them per queue pair
            fe.call(FrontendReq.SET_FEATURES, p.U64(fe.features))
            fe.call(FrontendReq.SET_OWNER)
            fe.set_mem_table()
        assert blk.read(2, 512) == (OK, sector_pattern(2))


def test_status_and_reset_device(blk_daemon: Callable[..., Daemon]) -> None:
    fe, _ = blk_session(blk_daemon().sock)
    with fe:
        assert fe.protocol_features & ProtocolFeature.STATUS
        fe.call(FrontendReq.SET_STATUS, p.U64(0xF))
        assert fe.get_u64(FrontendReq.GET_STATUS) == 0xF
        fe.call(FrontendReq.RESET_DEVICE)
        assert fe.get_u64(FrontendReq.GET_STATUS) == 0
        # the device works again after a full re-setup on the same connection
        fe.call(FrontendReq.SET_FEATURES, p.U64(fe.features))
        fe.drop_queues()
        fe.setup_queue(0)
        assert BlkClient(fe, 0, arena=1 << 20).read(4, 512) == (OK, sector_pattern(4))


def test_memory_slots_add_and_remove(blk_daemon: Callable[..., Daemon]) -> None:
    fe, (blk,) = blk_session(blk_daemon().sock)
    with fe:
        assert fe.get_u64(FrontendReq.GET_MAX_MEM_SLOTS) >= 8
        extra = GuestRam(1 << 20, guest_addr=0x1_0000_0000, user_addr=0x7E00_0000_0000)
        region = extra.region()
        fe.call(FrontendReq.ADD_MEM_REG, p.SingleMemRegion(region), fds=(extra.fd,))
        # a request whose data buffer lives in the hot-added region
        hdr, status = fe.ram.alloc(16), fe.ram.alloc(1)
        fe.ram.at(hdr, 16)[:] = struct.pack("<IIQ", 0, 0, 9)
        fe.queues[0].ring.add([(hdr, 16, False), (region.guest_addr, 512, True), (status, 1, True)])
        fe.kick(0)
        fe.wait_used(0)
        assert fe.ram.at(status, 1)[0] == OK
        assert bytes(extra.at(region.guest_addr, 512)) == sector_pattern(9)
        fe.call(FrontendReq.REM_MEM_REG, p.SingleMemRegion(region))
        with pytest.raises(BackendError):  # removing it twice
            fe.call(FrontendReq.REM_MEM_REG, p.SingleMemRegion(region))
        assert blk.read(3, 512) == (OK, sector_pattern(3))
        extra.close()


def _open_flags(pid: int, path: Path) -> list[int]:
    """The open flags of every fd process `pid` has on `path`."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != str(path):
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        out += [int(ln.split()[1], 8) for ln in info.splitlines() if ln.startswith("flags:")]
    return out


@pytest.mark.parametrize("threads", ["0", "4"])
@pytest.mark.parametrize("align", [4096, 64])
def test_direct_io_with_and_without_io_threads(blk_daemon: Callable[..., Daemon],
                                               image: Path, threads: str, align: int) -> None:
    """--direct opens the image with O_DIRECT. Page-aligned guest buffers go straight to
    the disk; others (64-byte aligned) bounce through an aligned buffer of the back-end's;
    with --io-threads (and the in-flight area it needs) 32 requests at a time, all
    completed."""
    d = blk_daemon("--direct", "--io-threads", threads)
    fe = Frontend(d.sock)
    with fe:
        fe.negotiate(BLK_FEATURES)
        fe.set_mem_table()
        _, area = fe.get_inflight_fd(1, 128)
        assert area is not None
        fe.call(FrontendReq.SET_INFLIGHT_FD, p.Inflight(2176, 0, 1, 128), fds=(area,))
        os.close(area)
        fe.setup_queue(0, 128)
        blk = BlkClient(fe, 0, arena=4 << 20, align=align)
        datas = {s: os.urandom(4096) for s in range(0, 32 * 16, 16)}
        heads = {blk.submit(1, s, out=x, kick=False): s for s, x in datas.items()}
        fe.kick(0)
        done = blk.complete(len(heads))
        assert sorted(done) == sorted(heads)
        assert all(status == OK for status, _, _ in done.values())
        reads = {blk.submit(0, s, in_len=4096, kick=False): s for s in datas}
        fe.kick(0)
        got = blk.complete(len(reads))
        assert {reads[h]: data for h, (status, data, _) in got.items() if status == OK} == datas
        assert blk.write_zeroes([(2000, 8, 0)]) == OK
        assert blk.flush() == OK
        flags = _open_flags(d.proc.pid, image)
        assert any(f & os.O_DIRECT for f in flags), flags
    disk = image.read_bytes()
    for s, x in datas.items():
        assert disk[s * 512 : s * 512 + 4096] == x
    assert disk[2000 * 512 : 2008 * 512] == bytes(4096)
    assert "served in order" not in d.log()


def test_io_threads_without_an_in_flight_area_serve_in_order(
        blk_daemon: Callable[..., Daemon]) -> None:
    """Out of order, a request in flight when the back-end dies would be lost for good: a
    front-end that gives no in-flight area gets its requests served in order."""
    d = blk_daemon("--io-threads", "4")
    fe, (blk,) = blk_session(d.sock)
    with fe:
        assert blk.read(0, 512) == (OK, sector_pattern(0))
    assert "queues [0]: no in-flight area from the front-end: served in order" in d.log()


def test_reconnect_serves_the_next_front_end(blk_daemon: Callable[..., Daemon]) -> None:
    d = blk_daemon()
    for rnd in range(3):
        fe, (blk,) = blk_session(d.sock)
        with fe:
            if rnd:
                assert blk.read(50, 512) == (OK, bytes([rnd - 1]) * 512)
            assert blk.write(50, bytes([rnd]) * 512) == OK
        d.wait_log("front-end disconnected" if rnd == 0 else "front-end connected")
    deadline = time.monotonic() + 5
    while d.children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.children() == []  # the last front-end left: its worker is gone


def test_inherited_listening_fd(tmp_path: Path, image: Path) -> None:
    import socket

    path = str(tmp_path / "inherited.sock")
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen(1)
    proc = Program.python(["vhostuser.cli.blk", "--fd", str(lsock.fileno()), "--blk-file",
                           str(image)], tmp_path / "blk.log", pass_fds=[lsock.fileno()])
    lsock.close()
    try:
        fe, (blk,) = blk_session(path)
        with fe:
            assert blk.read(1, 512) == (OK, sector_pattern(1))
    finally:
        assert proc.stop(10) == 0, proc.log()


def test_client_mode_connects_to_a_listening_front_end(tmp_path: Path, image: Path) -> None:
    import socket

    path = str(tmp_path / "fe.sock")
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen(1)
    proc = Program.python(["vhostuser.cli.blk", "--client", "--socket-path", path,
                           "--blk-file", str(image)], tmp_path / "blk.log")
    try:
        for _ in range(2):  # it reconnects after we hang up
            lsock.settimeout(10)
            conn, _ = lsock.accept()
            fe = Frontend(path, conn=conn)
            fe.negotiate(BLK_FEATURES)
            fe.set_mem_table()
            fe.setup_queue(0)
            with fe:
                assert BlkClient(fe).request(T_GET_ID, in_len=20)[0] == OK
    finally:
        assert proc.stop(10) == 0, proc.log()


def test_print_capabilities() -> None:
    out = subprocess.run([sys.executable, "-m", "vhostuser.cli.blk", "--print-capabilities"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == {"type": "block", "features": ["read-only", "blk-file"]}


@pytest.mark.parametrize(("args", "message"), [
    (["--blk-file", "x.img"], "exactly one of --socket-path, --fd and --vvu"),
    (["--blk-file", "x.img", "--socket-path", "s", "--poll"], "--poll goes with --vvu"),
    (["--socket-path", "s"], "--blk-file is required"),
    (["--socket-path", "s", "--fd", "3", "--blk-file", "x"], "exactly one of"),
    (["--socket-path", "s", "--blk-file", "x", "--num-queues", "0"], "--num-queues"),
    (["--socket-path", "s", "--blk-file", "x", "--serial", "a" * 21], "--serial"),
    (["--socket-path", "s", "--blk-file", "/nonexistent/disk.img"], "No such file"),
    (["--bogus"], "unrecognized arguments"),
    (["--vvu", "pci:00:04.0", "--blk-file", "x.img"], "is not a PCI address"),
    (["--vvu", "pci:0000:7f:1f.7", "--blk-file", "x.img"], "no PCI device 0000:7f:1f.7"),
])
def test_bad_command_lines(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "x.img").write_bytes(bytes(1 << 20))
    r = subprocess.run([sys.executable, "-m", "vhostuser.cli.blk", *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_err_fd_signalled_when_a_ring_breaks(blk_daemon: Callable[..., Daemon]) -> None:
    d = blk_daemon()
    fe, _ = blk_session(d.sock)
    with fe:
        err = os.eventfd(0, os.EFD_NONBLOCK)
        fe.call(FrontendReq.SET_VRING_ERR, p.VringFile.make(0), fds=(err,))
        ring = fe.queues[0].ring
        ring.publish(1000)  # head beyond the queue size
        fe.kick(0)
        assert select.select([err], [], [], 10)[0] == [err]
        d.wait_log("available head 1000 >= queue size")
        os.close(err)


@pytest.mark.parametrize(("sock", "message"), [
    ("regular-file", "{path} exists and is not a socket"),
    ("no/such/dir/s.sock", "cannot listen on {path}: No such file or directory"),
    ("", "the socket path is empty"),
    ("x" * 100 + ".sock", "cannot listen on {path}: the path is too long for a socket"),
])
def test_unusable_socket_path(tmp_path: Path, image: Path, sock: str, message: str) -> None:
    (tmp_path / "regular-file").write_text("keep me")
    path = str(tmp_path / sock) if sock else ""
    r = subprocess.run([sys.executable, "-m", "vhostuser.cli.blk", "--socket-path", path,
                        "--blk-file", str(image)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert message.format(path=path) in r.stderr
    assert (tmp_path / "regular-file").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img", "regular-file"]


def test_file_io_bounces_on_efault_and_resumes_short_transfers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guest memory the kernel cannot pin (a device BAR inside an appliance VM, read from a
    9p file: EFAULT) goes through a bounce buffer; short reads and writes are resumed."""
    from vhostuser import fileio as blkmod

    path = tmp_path / "f"
    content = os.urandom(3 * 4096)
    path.write_bytes(content)
    fd = os.open(path, os.O_RDWR)
    try:
        real_preadv, real_pwritev = os.preadv, os.pwritev
        calls = []

        def efault_preadv(f: int, bufs: list, off: int) -> int:
            calls.append(("preadv", off))
            raise OSError(errno.EFAULT, "Bad address")

        monkeypatch.setattr(os, "preadv", efault_preadv)
        bufs = [memoryview(bytearray(5000)), memoryview(bytearray(3 * 4096 - 5000))]
        assert blkmod.read_into(fd, bufs, 0, 3 * 4096) == 3 * 4096
        assert b"".join(bytes(b) for b in bufs) == content and calls == [("preadv", 0)]

        def short_preadv(f: int, bufs: list, off: int) -> int:  # at most 4 KiB per call
            return real_preadv(f, blkmod.iov_slice(bufs, 0, 4096), off)

        monkeypatch.setattr(os, "preadv", short_preadv)
        bufs = [memoryview(bytearray(3 * 4096))]
        assert blkmod.read_into(fd, bufs, 0, 3 * 4096) == 3 * 4096
        assert bytes(bufs[0]) == content
        assert blkmod.read_into(fd, [memoryview(bytearray(8192))], 2 * 4096, 8192) == 4096  # EOF

        def efault_pwritev(f: int, bufs: list, off: int) -> int:
            raise OSError(errno.EFAULT, "Bad address")

        monkeypatch.setattr(os, "pwritev", efault_pwritev)
        blkmod.write_from(fd, [memoryview(b"A" * 100), memoryview(b"B" * 100)], 10, 200)
        monkeypatch.setattr(os, "pwritev",
                            lambda f, bufs, off: real_pwritev(f, blkmod.iov_slice(bufs, 0, 7), off))
        blkmod.write_from(fd, [memoryview(b"C" * 50)], 300, 50)
        assert path.read_bytes()[10:350] == b"A" * 100 + b"B" * 100 + content[210:300] + b"C" * 50
        monkeypatch.setattr(os, "pwritev", lambda f, bufs, off: 0)
        with pytest.raises(OSError, match="short write"):
            blkmod.write_from(fd, [memoryview(b"D")], 0, 1)
    finally:
        os.close(fd)
