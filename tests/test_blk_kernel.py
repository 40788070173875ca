"""vhost-user-blk's compiled kernel (devices/blk_kernel.py) against blk.py serving the same
requests (the reference): a seeded, bounded differential fuzz. Each round makes a batch of
requests available — reads and writes of every layout drivers use and some they do not,
flushes, GET_ID, discards, unknown types, the legacy barrier bit, sectors past the end,
lengths not whole sectors, a header or a status byte of the wrong size, buffers in two
regions, across them and outside memory, indirect tables, readable after writable — over
an image that is shorter than the capacity the device believes (reads past its end come
back short), in write-back and write-through mode, read-only too, with an in-flight area
and without. One device serves them with the kernel, one without, from the same guest
memory and images; afterwards guest memory (data, status bytes, used ring), the image, the
ring's indices, the queue's error and the in-flight area (but for the counters of chains
taken) must be equal. Set VHOSTUSER_FUZZ_SEED to replay; the seed is in the message."""

from __future__ import annotations

import logging
import os
import random
import struct
from pathlib import Path

import pytest
from fuzz_memory import A, TwoRegions, seed

from vhostuser.devices import blk_kernel
from vhostuser.devices.blk import PUBLISH_EVERY, BlkDevice, BlkOptions, BlkQueue
from vhostuser.devices.blk_abi import (
    S_IOERR,
    S_OK,
    T_BARRIER,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
)
from vhostuser.engine.notify import NoNotifier
from vhostuser.engine.queue import DeviceQueue
from vhostuser.memory import GuestMemory, mmap_region
from vhostuser.virtq.guest_ram import GuestRam
from vhostuser.virtq.inflight import ENTRY, QUEUE_HEADER, SplitInflight, queue_region_bytes
from vhostuser.virtq.ring import DeviceRing, RingError
from vhostuser.virtq.split import SplitQueue
from vhostuser.virtq.split_driver import DriverRing

ROUNDS = 250
RAM = 2 << 20  # two regions of 2 MiB, adjoining
B = A + RAM
IMAGE = 1 << 20
CAPACITY = 2 * IMAGE // 512  # the device believes the image twice as long as it is


@pytest.fixture(autouse=True)
def _jit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VHOSTUSER_JIT", "1")
    assert blk_kernel.available()  # numba is a test dependency


class Rig(TwoRegions):
    def __init__(self, rng: random.Random, tmp: Path, read_only: bool, tracked: bool,
                 size: int, event_idx: bool, packed: bool = False) -> None:
        super().__init__(rng, RAM, size, event_idx, packed)
        # each device's in-flight area (as QEMU gives one), kept from round to round
        self.areas = [bytearray(queue_region_bytes(size)) for _ in range(2)] if tracked else []
        image = rng.randbytes(IMAGE)
        self.devs = []
        for name, compiled in (("py", False), ("jit", True)):
            path = tmp / f"{name}.img"
            path.write_bytes(image)
            dev = BlkDevice(BlkOptions(str(path), read_only=read_only, serial="fuzz"))
            dev.compiled = compiled
            dev.capacity = CAPACITY
            self.devs.append(dev)

    def request(self) -> list[tuple[int, int, bool]]:
        """One request's buffers (address, length, device-writable)."""
        rng = self.rng
        rtype = rng.choice([T_IN] * 8 + [T_OUT] * 6 + [T_FLUSH, T_GET_ID, T_DISCARD, 99,
                                                         T_IN | T_BARRIER])
        sector = rng.choice([rng.randrange(IMAGE // 512 - 32)] * 6 + [
            rng.randrange(CAPACITY), CAPACITY - rng.randrange(1, 9),
            CAPACITY + rng.randrange(4), 2**64 - 1])
        lens = [rng.choice([512, 4096, 1024, 8192] * 4 + [rng.randrange(1, 5000)])
                for _ in range(rng.choice([0, 1, 1, 1, 1, 2, 3]))]
        if rtype == T_DISCARD:
            lens = [16]
        header = rng.choice([16] * 20 + [15, 17, 16 + sum(lens)])
        status = rng.choice([1] * 20 + [0, 2])
        in_b = rng.random() < 0.2
        hdr_at = (B if in_b else self.arena) + rng.randrange(RAM // 2 - header)
        self.rams[in_b].at(hdr_at, 16)[:] = struct.pack("<IIQ", rtype, 0, sector)
        data_writable = rtype in (T_IN, T_GET_ID, T_IN | T_BARRIER, 99)
        if rng.random() < 0.03:
            data_writable = not data_writable  # readable after writable, or the reverse
        bufs = [(hdr_at, header, False)]
        bufs += [(self.buf(n), n, data_writable) for n in lens]
        if status:
            bufs.append((self.buf(status), status, True))
        return bufs

    def batch(self) -> None:
        """Make up to a ring's worth of requests available."""
        for _ in range(self.rng.randrange(1, self.size + 1)):
            bufs = self.request()
            room, only_indirect = self.room(len(bufs))
            if not room:
                break
            self.add(bufs, self.rng.random() < 0.3 or only_indirect)

    def close(self) -> None:
        for d in self.devs:
            d.close()
        super().close()


def count_served(service: BlkQueue) -> list[int]:
    """From now on, how many requests the kernel serves itself (the list's one item)."""
    served = [0]
    if service.kernel is not None:
        compiled = service._compiled

        def counted(r: DeviceRing, n: int) -> int:
            k = compiled(r, n)
            served[0] += k
            return k

        service._compiled = counted  # type: ignore[method-assign]
    return served


def run_queue(service: BlkQueue, q: DeviceQueue) -> int:
    """Call `kicked` as engine/worker.py's run_queue does, publishing after each call,
    until nothing is left or a call takes nothing; how many calls."""
    calls = 0
    while q.available():
        before = q.popped
        service.kicked(q)
        q.notify()
        calls += 1
        if q.popped == before:
            break
    return calls


def serve(rig: Rig, side: int, last: int) -> tuple[object, ...]:
    """Device `side` serves what is available from `last` on (with its in-flight area if
    the rig has them); what it left behind."""
    dev = rig.devs[side]
    ring = rig.ring(last)
    if side == 0:
        ring._kernel = None  # the reference: the Python walk too
    publish = ring.publish
    publishes = 0

    def counted_publish() -> bool:
        nonlocal publishes
        publishes += 1
        return publish()

    ring.publish = counted_publish  # type: ignore[method-assign]
    tracker = None
    if rig.areas:
        assert isinstance(ring, SplitQueue)
        tracker = SplitInflight(memoryview(rig.areas[side]), rig.size)
        assert tracker.recover(ring) == []
    q = DeviceQueue(ring, 0, NoNotifier(), tracker=tracker)
    service = BlkQueue(dev)
    served = count_served(service)
    try:
        calls = run_queue(service, q)
        # each call's requests made visible at once, however they were served; the
        # kernel's side in turns of at most PUBLISH_EVERY (the driver reaps meanwhile)
        assert publishes <= calls
        if service.kernel is not None and q.completed > PUBLISH_EVERY:
            assert publishes >= 2, f"{q.completed} requests published at once"
        return (served[0], str(q.error), *rig.position(ring), q.popped, q.completed,
                rig.contents(), Path(dev.opts.path).read_bytes(),
                area(rig.areas[side], rig.size) if rig.areas else None)
    finally:
        q.release()


def area(region: bytearray, size: int) -> bytes:
    """An in-flight region without the entries' counters (the kernel takes no chain in
    flight: it completes each before the used index moves)."""
    out = bytearray(region)
    for at in range(QUEUE_HEADER + 8, QUEUE_HEADER + ENTRY * size, ENTRY):
        out[at : at + 8] = bytes(8)
    return bytes(out)


@pytest.mark.parametrize(("read_only", "tracked", "size", "event_idx", "packed"), [
    (False, False, 16, False, False), (True, False, 16, True, False),
    (False, True, 16, True, False), (False, True, 256, False, False),
    (False, False, 64, True, False),
    (False, False, 16, False, True), (True, False, 24, True, True)])  # packed rings
def test_the_kernel_serves_as_blk_py_does(tmp_path: Path, read_only: bool, tracked: bool,
                                          size: int, event_idx: bool, packed: bool) -> None:
    s = seed()
    rng = random.Random(s)
    rig = Rig(rng, tmp_path, read_only, tracked, size, event_idx, packed)
    py, jit = rig.devs
    by_kernel = completed = 0
    try:
        for round_ in range(ROUNDS * 16 // size):  # about as many requests for each size
            last = rig.start()
            rig.batch()
            writeback = rng.random() < 0.8
            py.writeback = jit.writeback = writeback
            before = rig.contents()
            want = serve(rig, 0, last)
            rig.restore(before)
            got = serve(rig, 1, last)
            assert want[0] == 0
            by_kernel += got[0]  # type: ignore[operator]
            completed += got[5]  # type: ignore[operator]
            where = f"seed {s}, round {round_}"
            assert got[1:6] == want[1:6], where
            assert got[6] == want[6], (
                f"{where}: guest memory differs at {rig.differ(got[6], want[6])}")
            assert got[7] == want[7], f"{where}: the image differs"
            assert got[8] == want[8], f"{where}: the in-flight areas differ"
            if got[1] != "None":  # a broken ring stops the queue: start a fresh one
                rig.close()
                rig = Rig(rng, tmp_path, read_only, tracked, size, event_idx, packed)
                py, jit = rig.devs
                continue
            rig.take_used()
    finally:
        rig.close()
    # the kernel takes about a third of these requests (reads alone, about a fifth)
    assert by_kernel > completed // (10 if read_only else 5), (
        f"seed {s}: the kernel served few requests itself ({by_kernel} of {completed})")


class Death(BaseException):
    """The back-end dies here (a BaseException: nothing on the way catches it)."""


STEPS = [(SplitInflight, "taken"), (SplitInflight, "link"), (SplitInflight, "settle"),
         (SplitQueue, "push_batch"), (SplitQueue, "publish"), (blk_kernel.BlkKernel, "serve")]


def test_a_death_at_any_step_loses_nothing(tmp_path: Path) -> None:
    """With QEMU's in-flight area, the kernel and blk.py serving a mix (reads, writes and
    flushes by the kernel, GET_ID by blk.py) in turns of PUBLISH_EVERY, the back-end dies
    before or after the n-th call of one of the steps that write the used ring or the
    area; the next back-end starts where QEMU starts it after a death (the used index) and
    recovers from the area. Every request must then be exactly one of: completed
    (published), handed out again, or still ahead of the resume point."""
    s = seed()
    rng = random.Random(s)
    deaths: dict[str, int] = {}
    for round_ in range(200):
        ram = GuestRam(4 << 20, guest_addr=A)
        mem = GuestMemory()
        mem.add(ram.region(), mmap_region(ram.region(), ram.fd))
        drv = DriverRing(ram, 64)
        drv.start_at(rng.choice([0, 65536 - 10]))
        img = tmp_path / "death.img"
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        dev = BlkDevice(BlkOptions(str(img)))
        area = bytearray(queue_region_bytes(64))
        heads = []
        for i in range(21):
            rtype = rng.choice([T_IN, T_IN, T_OUT, T_FLUSH, T_GET_ID])  # (GET_ID: blk.py's)
            hdr, data, status = ram.alloc(16), ram.alloc(4096, 4096), ram.alloc(1, 1)
            ram.at(hdr, 16)[:] = struct.pack("<IIQ", rtype, 0, 8 * i)
            bufs = [(hdr, 16, False)]
            if rtype != T_FLUSH:
                bufs.append((data, 4096, rtype in (T_IN, T_GET_ID)))
            heads.append(drv.add([*bufs, (status, 1, True)]))
        start = drv.avail_idx - 21 & 0xFFFF
        cls, name = rng.choice(STEPS)
        # publish and settle come once or twice a run, the others up to 21 times
        after = rng.random() < 0.5
        calls = rng.randrange(2 if name in ("publish", "settle") else 12)
        real = getattr(cls, name)

        def dying(*args: object, real: object = real, after: bool = after) -> object:
            nonlocal calls
            calls -= 1
            if calls < 0 and not after:
                raise Death
            out = real(*args)  # type: ignore[operator]
            if calls < 0:
                raise Death
            return out

        ring = SplitQueue(mem, drv.layout(), start, False)
        tracker = SplitInflight(memoryview(area), 64)
        assert tracker.recover(ring) == []
        q = DeviceQueue(ring, 0, NoNotifier(), tracker=tracker)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cls, name, dying)
            try:
                run_queue(BlkQueue(dev), q)
            except Death:
                deaths[name] = deaths.get(name, 0) + 1
        where = f"seed {s}, round {round_}: death {'after' if after else 'before'} {name}"
        used = drv.used_idx()
        done = (used - start) & 0xFFFF
        published = [struct.unpack_from("<I", ram.at(drv.used_gpa + 4 + 8 * ((start + j) % 64),
                                                     4))[0] for j in range(done)]
        ring2 = SplitQueue(mem, drv.layout(), used, False)
        again = SplitInflight(memoryview(area), 64).recover(ring2)
        resumed = (ring2.last_avail - start) & 0xFFFF
        ahead = heads[resumed:]
        assert sorted(published + again + ahead) == sorted(heads), where
        q.release()
        ring2.release()
        dev.close()
        drv.release()
        mem.clear()
        ram.close()
    assert sorted(deaths) == sorted(name for _, name in STEPS), f"seed {s}: died {deaths}"


FLUSH_FAILS = "request type 4 sector 0: [Errno 22] Invalid argument"  # as blk.py says


def serve_on_dev_null(tmp_path: Path, compiled: bool, writeback: bool, read_only: bool,
                      requests: list[tuple[int, int]]) -> tuple[list[int], list[int],
                                                                list[str], int]:
    """Serve `requests` (type, sector; a write carries 4 KiB) as run_queue would, the
    image's fd swapped for /dev/null, which takes writes but fails syncs (EINVAL): each
    request's status byte and used length, the errors logged, how many the kernel served."""
    ram = GuestRam(1 << 20, guest_addr=A)
    mem = GuestMemory()
    mem.add(ram.region(), mmap_region(ram.region(), ram.fd))
    drv = DriverRing(ram, 128)
    img = tmp_path / "sync.img"
    img.write_bytes(bytes(1 << 16))
    dev = BlkDevice(BlkOptions(str(img), read_only=read_only))
    dev.compiled = compiled
    dev.writeback = writeback
    null = os.open("/dev/null", os.O_RDWR)
    statuses = []
    for rtype, sector in requests:
        hdr, data, status = ram.alloc(16), ram.alloc(4096, 4096), ram.alloc(1, 1)
        ram.at(hdr, 16)[:] = struct.pack("<IIQ", rtype, 0, sector)
        ram.at(status, 1)[0] = 0xAA
        statuses.append(status)
        bufs = [(hdr, 16, False)] + ([(data, 4096, False)] if rtype == T_OUT else [])
        drv.add([*bufs, (status, 1, True)])
    ring = SplitQueue(mem, drv.layout(), 0, False)
    q = DeviceQueue(ring, 0, NoNotifier())
    service = BlkQueue(dev)
    assert (service.kernel is not None) == compiled
    service.fd = null
    if service.kernel is not None:
        service.kernel.fd = null
    served = count_served(service)
    logger = logging.getLogger("vhostuser.devices")
    errors: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda r: errors.append(r.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        run_queue(service, q)
        assert drv.used_idx() == len(requests)
        return ([ram.at(at, 1)[0] for at in statuses],
                [struct.unpack_from("<I", ram.at(drv.used_gpa + 8 + 8 * j, 4))[0]
                 for j in range(len(requests))], errors, served[0])
    finally:
        logger.removeHandler(handler)
        os.close(null)
        q.release()
        dev.close()
        drv.release()
        mem.clear()
        ram.close()


@pytest.mark.parametrize(("writeback", "read_only", "want", "errors"), [
    (False, False, [S_IOERR] * 3,
     [FLUSH_FAILS, "write at sector 8: [Errno 22] Invalid argument", FLUSH_FAILS]),
    (True, False, [S_IOERR, S_OK, S_IOERR], [FLUSH_FAILS] * 2),  # the write: no sync
    (False, True, [S_OK, S_IOERR, S_OK], [])])  # read-only: no sync, no write
@pytest.mark.parametrize("compiled", [False, True])
def test_a_failed_sync_is_answered_with_an_error(
        compiled: bool, writeback: bool, read_only: bool, want: list[int], errors: list[str],
        tmp_path: Path) -> None:
    """fdatasync fails: a flush, and a write while the cache is write-through, are
    completed with S_IOERR and the log says why, by blk.py and by the kernel alike. The
    kernel answers them itself: a second fdatasync would succeed where a disk's writeback
    failed (Linux reports such an error once), so leaving the request to blk.py would tell
    the guest its data was safe."""
    statuses, lens, logged, served = serve_on_dev_null(
        tmp_path, compiled, writeback, read_only, [(T_FLUSH, 0), (T_OUT, 8), (T_FLUSH, 0)])
    assert statuses == want
    assert lens == [1, 1, 1]  # the status byte alone written
    assert logged == errors
    if compiled:  # every sync the kernel's (a read-only disk's write: blk.py's)
        assert served == (2 if read_only else 3)


@pytest.mark.parametrize("compiled", [False, True])
def test_failing_requests_do_not_flood_the_log(compiled: bool, tmp_path: Path) -> None:
    """A guest may send failing requests at will: the first ten are logged, not all."""
    statuses, _, logged, _ = serve_on_dev_null(tmp_path, compiled, True, False,
                                               [(T_FLUSH, 0)] * 40)
    assert statuses == [S_IOERR] * 40
    assert logged == [FLUSH_FAILS] * 10


def test_an_avail_index_moved_too_far_stops_the_queue_not_the_worker(tmp_path: Path) -> None:
    """The driver moves the avail index by more than the ring holds between two compiled
    batches: the queue stops with the ring's error (as the Python path reports it), and
    nothing escapes to the worker, which would stop every queue it serves."""
    ram = GuestRam(1 << 20, guest_addr=A)
    mem = GuestMemory()
    mem.add(ram.region(), mmap_region(ram.region(), ram.fd))
    drv = DriverRing(ram, 16)
    img = tmp_path / "img"
    img.write_bytes(bytes(1 << 16))
    dev = BlkDevice(BlkOptions(str(img)))
    ring = SplitQueue(mem, drv.layout(), 0, False)
    q = DeviceQueue(ring, 0, NoNotifier())
    try:
        assert q.compiled()
        buf = ram.alloc(4096)
        hdr, status = ram.alloc(16), ram.alloc(1)
        ram.at(hdr, 16)[:] = struct.pack("<IIQ", T_IN, 0, 0)
        drv.add([(hdr, 16, False), (buf, 4096, True), (status, 1, True)])
        service = BlkQueue(dev)
        service.kicked(q)
        q.notify()
        assert q.completed == 1 and q.error is None  # (served: the path is the kernel's)
        drv.avail16.store(1, drv.avail_idx + 17)  # 17 more than were made available
        service.kicked(q)
        assert isinstance(q.error, RingError) and "more than the queue size" in str(q.error)
        assert q.completed == 1
    finally:
        q.release()
        dev.close()
        drv.release()
        mem.clear()
        ram.close()
