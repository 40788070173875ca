"""vhost-user-blk's in-flight area (INFLIGHT_SHMFD) over a real socket, with the Python
front-end playing QEMU: the area GET_INFLIGHT_FD hands out, requests a dead back-end left
in flight served again by the next one (and a completed one not), malformed
GET/SET_INFLIGHT_FD refused with the daemon serving on, nothing written outside the area.

The area a dead back-end leaves is written here by hand, with the spec's layout (QEMU
docs/interop/vhost-user.rst, "Inflight I/O tracking"); the QEMU kill storms in
test_blk_kill.py prove the same against QEMU with real deaths."""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon import BLK_FEATURES, Daemon

from vhostuser.frontend.blk import BlkClient
from vhostuser.frontend.client import BackendError, Frontend, QueueState
from vhostuser.protocol import FrontendReq, ProtocolFeature, VirtioFeature
from vhostuser.protocol import payloads as p
from vhostuser.virtq.split_driver import DriverRing

F = FrontendReq
QSIZE = 128
REGION = 2112  # 16-byte header + 128 16-byte entries = 2064, padded to 64
AREA = REGION + 64  # then 64 bytes of the device's own (ours: the front-end keeps them)
SPEC_HEADER = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
SPEC_DESC = struct.Struct("<B5xHQ")  # inflight, padding, next, counter
USED_ELEM = struct.Struct("<II")
OK = 0


def session(sock: str) -> Frontend:
    fe = Frontend(sock)
    fe.negotiate(BLK_FEATURES)
    assert fe.protocol_features & ProtocolFeature.INFLIGHT_SHMFD
    fe.set_mem_table()
    return fe


def memfd(size: int, fill: int = 0) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create("area", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED)
    if fill:
        m[:] = bytes([fill]) * size
    return fd, m


def set_inflight(fe: Frontend, fd: int, size: int = AREA, offset: int = 0,
                 queues: int = 1, qsize: int = QSIZE) -> None:
    fe.call(F.SET_INFLIGHT_FD, p.Inflight(size, offset, queues, qsize), fds=(fd,))


def test_get_inflight_fd_hands_out_a_zeroed_sealed_area_the_queue_keeps(
        blk_daemon: Callable[..., Daemon]) -> None:
    d = blk_daemon()
    with session(d.sock) as fe:
        desc, fd = fe.get_inflight_fd(1, QSIZE)
        assert fd is not None
        try:
            assert (desc.mmap_size, desc.mmap_offset) == (AREA, 0)
            assert os.fstat(fd).st_size >= AREA
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_SHRINK
            area = mmap.mmap(fd, REGION, mmap.MAP_SHARED)
            assert area[:] == bytes(REGION)
            set_inflight(fe, fd)
            fe.setup_queue(0, QSIZE)
            blk = BlkClient(fe, 0, arena=1 << 20)
            heads = [blk.submit(1, 8 * i, out=bytes([i]) * 4096) for i in range(5)]
            got = blk.complete(5)
            assert sorted(got) == sorted(heads)
            assert all(status == OK for status, _, _ in got.values())
            _, version, num, _, used = SPEC_HEADER.unpack_from(area, 0)
            assert (version, num, used) == (1, QSIZE, 5)
            flags = [SPEC_DESC.unpack_from(area, 16 + 16 * i)[0] for i in range(QSIZE)]
            assert flags == [0] * QSIZE
            area.close()
        finally:
            os.close(fd)


SECTORS = [64, 128, 192]  # the three writes' sectors


def _take_over(sock: str) -> tuple[list[int], list[int]]:
    """Three writes were made available; the dead back-end took all three, completed the
    second (used idx 1) and died with the others in flight, the third taken before the
    first. Start the back-end at `sock` on that ring and area at used idx 1, as QEMU
    does, and let it serve. Returns the heads of the three writes and the used ring.
    (No C back-end here takes an area: qemu-storage-daemon 7.2 and 11.1 do not offer
    INFLIGHT_SHMFD.)"""
    with session(sock) as fe:
        ring = DriverRing(fe.ram, QSIZE, bool(fe.features & VirtioFeature.RING_EVENT_IDX))
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fe.queues[0] = QueueState(ring, kick, call)
        blk = BlkClient(fe, 0, arena=1 << 20)
        heads = [blk.submit(1, s, out=x, kick=False) for s, x in zip(SECTORS, DATA, strict=True)]
        # the dead back-end's completion of the second: its used element and status
        fe.ram.at(blk.inflight[heads[1]][0], 1)[0] = OK
        USED_ELEM.pack_into(ring.used, 4, heads[1], 1)
        ring.used16.store(1, 1)
        area_fd, area = memfd(AREA)
        SPEC_HEADER.pack_into(area, 0, 0, 1, QSIZE, heads[1], 1)
        SPEC_DESC.pack_into(area, 16 + 16 * heads[0], 1, 0, 9)
        SPEC_DESC.pack_into(area, 16 + 16 * heads[2], 1, 0, 7)  # taken before the first
        set_inflight(fe, area_fd)
        os.close(area_fd)
        lay = ring.layout()
        fe.call(F.SET_VRING_NUM, p.VringState(0, QSIZE))
        fe.call(F.SET_VRING_BASE, p.VringState(0, 1))
        fe.call(F.SET_VRING_ADDR, p.VringAddr(0, 0, lay.desc, lay.used, lay.avail, 0))
        fe.call(F.SET_VRING_KICK, p.VringFile.make(0), fds=(kick,))
        fe.call(F.SET_VRING_CALL, p.VringFile.make(0), fds=(call,))
        fe.call(F.SET_VRING_ENABLE, p.VringState(0, 1))
        done = [h for h, _ in fe.wait_used(0, 3)]
        assert all(fe.ram.at(blk.inflight[h][0], 1)[0] == OK for h in heads)
        # and new requests go on from there
        after = blk.submit(1, 256, out=b"\x55" * 512)
        assert [h for h, _ in fe.wait_used(0, 1)] == [after]
        assert area[16 + 16 * heads[0]] == area[16 + 16 * heads[2]] == 0
        area.close()
    return heads, done


def _check_disk(image: Path) -> None:
    disk = image.read_bytes()
    assert disk[64 * 512 : 64 * 512 + 4096] == DATA[0]
    assert disk[192 * 512 : 192 * 512 + 4096] == DATA[2]
    # the one completed before the death is not written again: the image keeps its pattern
    assert disk[128 * 512 : 128 * 512 + 4] == (128).to_bytes(4, "little")
    assert disk[256 * 512 : 256 * 512 + 512] == b"\x55" * 512


DATA = [bytes([0xA0 + i]) * 4096 for i in range(3)]


def test_requests_a_dead_back_end_left_in_flight_are_served_again(
        blk_daemon: Callable[..., Daemon], image: Path) -> None:
    """The first and third writes are served again, in the order they were taken, the
    second not."""
    d = blk_daemon()
    heads, done = _take_over(d.sock)
    assert done == [heads[1], heads[2], heads[0]]
    d.wait_log("queue 0: 2 request(s) left in flight by the last back-end: served again")
    _check_disk(image)


def test_nothing_is_written_outside_the_area(blk_daemon: Callable[..., Daemon]) -> None:
    """The area at an offset inside a bigger file, guard bytes on both sides."""
    d = blk_daemon()
    page = mmap.PAGESIZE
    size = 3 * page
    fd, whole = memfd(size, fill=0xAA)
    whole[page : page + AREA] = bytes(AREA)
    with session(d.sock) as fe:
        set_inflight(fe, fd, offset=page)
        fe.setup_queue(0, QSIZE)
        blk = BlkClient(fe, 0, arena=1 << 20)
        for i in range(3):
            blk.submit(1, 8 * i, out=bytes(4096))
        blk.complete(3)
        assert blk.read(0, 512) == (OK, bytes(512))
    os.close(fd)
    assert whole[:page] == b"\xaa" * page
    assert whole[page + AREA :] == b"\xaa" * (size - page - AREA)
    assert SPEC_HEADER.unpack_from(whole, page)[1:3] == (1, QSIZE)
    whole.close()


@pytest.mark.parametrize("queues, qsize", [(0, QSIZE), (2, QSIZE), (1, 100), (1, 0),
                                           (1, 32768)])
def test_get_inflight_fd_for_a_shape_the_device_cannot_have_is_declined(
        blk_daemon: Callable[..., Daemon], queues: int, qsize: int) -> None:
    d = blk_daemon()
    with session(d.sock) as fe:
        desc, fd = fe.get_inflight_fd(queues, qsize)
        assert fd is None and desc.mmap_size == 0
        fe.setup_queue(0, QSIZE)
        assert BlkClient(fe, 0).read(0, 512)[0] == OK  # and it serves on
    assert "GET_INFLIGHT_FD refused: in-flight area for" in d.log()


def _pipe() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


@pytest.mark.parametrize("what, says", [
    ("too small", "in-flight area of 2111 bytes: 1 queues of 128 need 2112"),
    ("a pipe", "cannot map region"),
    ("a short file", "runs past the end of its file"),
    ("offset wraps", "runs past the end of its file"),
    ("no fd", "SET_INFLIGHT_FD carries 0 fds, expected 1"),
    ("more queues", "in-flight area for 2 queues: the device has 1"),
    ("odd size", "in-flight area for queues of 96: not a power of 2"),
])
def test_a_malformed_set_inflight_fd_is_refused(blk_daemon: Callable[..., Daemon],
                                                what: str, says: str) -> None:
    d = blk_daemon()
    with session(d.sock) as fe:
        fd, m = memfd(AREA)
        m.close()
        with pytest.raises(BackendError, match="SET_INFLIGHT_FD NACKed"):
            if what == "too small":
                set_inflight(fe, fd, size=REGION - 1)
            elif what == "a pipe":
                set_inflight(fe, (pfd := _pipe()))
                os.close(pfd)
            elif what == "a short file":
                set_inflight(fe, fd, offset=mmap.PAGESIZE)
            elif what == "offset wraps":
                set_inflight(fe, fd, offset=(1 << 64) - mmap.PAGESIZE)
            elif what == "no fd":
                fe.call(F.SET_INFLIGHT_FD, p.Inflight(AREA, 0, 1, QSIZE))
            elif what == "more queues":
                set_inflight(fe, fd, size=2 * REGION + 64, queues=2)
            elif what == "odd size":
                set_inflight(fe, fd, qsize=96)
        os.close(fd)
        fe.setup_queue(0, QSIZE)  # no area: untracked, and it serves on
        assert BlkClient(fe, 0).read(0, 512)[0] == OK
    assert says in d.log()


def _writeback(fe: Frontend) -> int:
    return fe.get_config(1, offset=32)[0]  # virtio_blk_config.wce


def test_the_guests_cache_mode_outlives_a_killed_back_end(tmp_path: Path, image: Path,
                                                          blk_daemon: Callable[..., Daemon]
                                                          ) -> None:
    """The guest chose write-through (SET_CONFIG); the back-end is killed; QEMU hands the
    next one the in-flight area and never sends SET_CONFIG again: the next back-end must
    not fall back to writeback behind the guest's back."""
    sock = tmp_path / "killed.sock"
    first = Daemon(["vhostuser.cli.blk", "--socket-path", str(sock), "--blk-file", str(image)],
                   sock, tmp_path / "killed.log")
    try:
        with session(str(sock)) as fe:
            _, area = fe.get_inflight_fd(1, QSIZE)
            assert area is not None
            set_inflight(fe, area)
            assert _writeback(fe) == 1
            fe.call(F.SET_CONFIG, p.Config(32, 1, 0, b"\0"))
            assert _writeback(fe) == 0
            first.proc.kill()
            first.proc.wait()
    finally:
        first.stop()
    d = blk_daemon()
    with session(d.sock) as fe:
        set_inflight(fe, area)
        assert _writeback(fe) == 0
    d.wait_log("cache mode: writethrough (as the last back-end had it)")
    with session(d.sock) as fe:  # a fresh area: nothing kept, the default
        _, fresh = fe.get_inflight_fd(1, QSIZE)
        assert fresh is not None
        set_inflight(fe, fresh)
        os.close(fresh)
        assert _writeback(fe) == 1
    os.close(area)


def test_an_area_without_the_state_block_is_taken(blk_daemon: Callable[..., Daemon]) -> None:
    """An area of the queue regions alone (another back-end's, or an older version's)
    still tracks requests; there is just no device state kept in it."""
    d = blk_daemon()
    fd, area = memfd(REGION)
    with session(d.sock) as fe:
        set_inflight(fe, fd, size=REGION)
        fe.setup_queue(0, QSIZE)
        blk = BlkClient(fe, 0, arena=1 << 20)
        assert blk.write(8, b"\x11" * 512) == OK
        fe.call(F.SET_CONFIG, p.Config(32, 1, 0, b"\0"))  # nowhere to keep it: fine
        assert _writeback(fe) == 0
    assert SPEC_HEADER.unpack_from(area, 0)[1:] == (1, QSIZE, 0, 1)
    area.close()
    os.close(fd)


def _suspend_once(d: Daemon, data: list[bytes], size: int) -> int:
    """Make the writes available at once, stop the ring (SET_VRING_ENABLE 0 and
    GET_VRING_BASE, as QEMU does), then start it again on the same area; returns how many
    writes the stop left in the area. Each write completes exactly once either way."""
    count = len(data)
    fe = Frontend(d.sock, ram_size=64 << 20)
    with fe:
        fe.negotiate(BLK_FEATURES)
        assert fe.protocol_features & ProtocolFeature.GET_VRING_BASE_INFLIGHT
        fe.set_mem_table()
        desc, fd = fe.get_inflight_fd(1, QSIZE)
        assert fd is not None
        area = mmap.mmap(fd, REGION, mmap.MAP_SHARED)
        set_inflight(fe, fd, desc.mmap_size)
        os.close(fd)
        fe.setup_queue(0, QSIZE)
        blk = BlkClient(fe, 0, arena=count * (size + 4096))
        heads = [blk.submit(1, size // 512 * i, out=data[i], indirect=True, kick=False)
                 for i in range(count)]
        fe.kick(0)
        base = fe.get_vring_base(0)
        done = [h for h, _ in fe.queues[0].ring.take_used()]
        marked = [h for h in heads if SPEC_DESC.unpack_from(area, 16 + 16 * h)[0] == 1]
        # what the worker had not taken by the stop is still in the ring, past `base`
        # (a stop that comes before the worker's first look takes none)
        assert 0 <= base <= count
        untaken = heads[base:]
        assert sorted(done + marked + untaken) == sorted(heads), (done, marked, base)
        if marked:
            d.wait_log(f"queue 0: {len(marked)} request(s) suspended, kept in the in-flight "
                       "area")
        fe.start_queue(0, base)
        left = len(marked) + len(untaken)
        rest = [h for h, _ in fe.wait_used(0, left, timeout=30)] if left else []
        assert sorted(rest) == sorted(marked + untaken)
        statuses = {h: fe.ram.at(blk.inflight[h][0], 1)[0] for h in heads}
        assert set(statuses.values()) == {OK}, statuses
        assert all(SPEC_DESC.unpack_from(area, 16 + 16 * h)[0] == 0 for h in heads)
        area.close()
    return len(marked)


def test_get_vring_base_inflight_leaves_requests_not_started_in_the_area(
        blk_daemon: Callable[..., Daemon], image: Path) -> None:
    """With GET_VRING_BASE_INFLIGHT the back-end may stop a ring without finishing what it
    took (QEMU migrates the area with inflight-migration=on): with one I/O thread and many
    writes made available at once, the stop comes back with some of them not started and
    still marked in the area; the ring started again on the same area serves each of them
    exactly once. (Whether the stop catches writes not started is a race: tried until it
    does, a few times at most.)"""
    d = blk_daemon("--io-threads", "1")
    size, count = 256 << 10, 48  # 12 MiB of the 16 MiB image
    for attempt in range(6):
        data = [bytes([attempt * count + i & 0xFF]) * size for i in range(count)]
        suspended = _suspend_once(d, data, size)
        if suspended:
            break
    assert suspended, "every write finished before each stop: nothing was suspended"
    d.wait_log(f"queue 0: {suspended} request(s) left in flight by the last back-end: "
               "served again")
    with open(image, "rb") as f:
        for i in range(count):
            f.seek(size * i)
            assert f.read(size) == data[i], f"write {i}"
