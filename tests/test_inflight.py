"""In-flight tracking on split rings (vhost-user INFLIGHT_SHMFD): what the device side
stores in the area, read back with the spec's layout (QEMU docs/interop/vhost-user.rst,
"Inflight I/O tracking", decoded here with struct formats of its own), and what a back-end
that starts on an area a dead one left serves again; areas the ring contradicts."""

from __future__ import annotations

import struct

import pytest

from vhostuser.engine.notify import NoNotifier
from vhostuser.engine.queue import DeviceQueue
from vhostuser.memory import GuestMemory
from vhostuser.virtq.guest_ram import GuestRam
from vhostuser.virtq.inflight import SplitInflight
from vhostuser.virtq.ring import DESC_F_WRITE, Chain, RingError
from vhostuser.virtq.split import SplitQueue
from vhostuser.virtq.split_driver import DriverRing

SIZE = 8
# The spec's layout: QueueRegionSplit, then DescStateSplit[desc_num].
SPEC_HEADER = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
SPEC_DESC = struct.Struct("<B5xHQ")  # inflight, padding, next, counter


@pytest.fixture
def drv(ram: GuestRam) -> DriverRing:
    return DriverRing(ram, SIZE)


@pytest.fixture
def area() -> bytearray:
    """The queue's region of an in-flight area, zeroed as GET_INFLIGHT_FD hands it out."""
    return bytearray(4096)


def header(area: bytearray) -> tuple[int, int, int, int, int]:
    return SPEC_HEADER.unpack_from(area, 0)  # type: ignore[return-value]


def desc(area: bytearray, i: int) -> tuple[int, int, int]:
    return SPEC_DESC.unpack_from(area, SPEC_HEADER.size + SPEC_DESC.size * i)  # type: ignore[return-value]


class Backend:
    """One back-end's queue over the ring and the area (dropped without a word: a crash)."""

    def __init__(self, mem: GuestMemory, drv: DriverRing, area: bytearray, base: int) -> None:
        self.ring = SplitQueue(mem, drv.layout(), base, False)
        self.tracker = SplitInflight(memoryview(area), SIZE)
        again = self.tracker.recover(self.ring)
        self.q = DeviceQueue(self.ring, 0, NoNotifier(), tracker=self.tracker)
        self.q.resubmit(again)
        self.again = again

    def take(self, n: int) -> list[int]:
        return [c.head for c in self.q.pop_batch(n)]

    def complete(self, heads: list[int]) -> None:
        self.q.complete_batch([Chain(h, [], []) for h in heads], [1] * len(heads))
        self.q.notify()

    def close(self) -> None:
        self.q.release()


def add(ram: GuestRam, drv: DriverRing, n: int) -> list[int]:
    heads = []
    for _ in range(n):
        heads.append(drv.add([(ram.alloc(16), 16, True)]))
    return heads


def test_a_fresh_area_is_initialised(ram: GuestRam, mem: GuestMemory) -> None:
    drv = DriverRing(ram, SIZE)
    drv.used16.store(1, 5)  # a ring already in use
    drv.avail16.store(1, 5)
    area = bytearray(4096)
    b = Backend(mem, drv, area, base=5)
    assert b.again == []
    assert header(area) == (0, 1, SIZE, 0, 5)
    b.close()


def test_taken_and_completed_chains_are_recorded_as_the_spec_says(
        ram: GuestRam, mem: GuestMemory, drv: DriverRing, area: bytearray) -> None:
    b = Backend(mem, drv, area, base=0)
    x, y, z = add(ram, drv, 3)
    assert b.take(3) == [x, y, z]
    flags = [desc(area, h)[0] for h in (x, y, z)]
    counters = [desc(area, h)[2] for h in (x, y, z)]
    assert flags == [1, 1, 1]
    assert counters[0] < counters[1] < counters[2]  # the order they were taken in
    b.complete([y])
    assert drv.used_idx() == 1
    assert [desc(area, h)[0] for h in (x, y, z)] == [1, 0, 1]
    _, version, num, last_batch, used = header(area)
    assert (version, num, last_batch, used) == (1, SIZE, y, 1)
    b.complete([z, x])  # a batch of two: linked through `next`, last first
    _, _, _, last_batch, used = header(area)
    assert (last_batch, used) == (x, 3)
    assert desc(area, x)[1] == z
    assert all(desc(area, i)[0] == 0 for i in range(SIZE))
    b.close()


def test_a_new_back_end_serves_what_the_dead_one_left_oldest_first(
        ram: GuestRam, mem: GuestMemory, drv: DriverRing, area: bytearray) -> None:
    b = Backend(mem, drv, area, base=0)
    x, y, z = add(ram, drv, 3)
    assert b.take(3) == [x, y, z]
    b.complete([y])
    assert drv.take_used() == [(y, 1)]
    (w,) = add(ram, drv, 1)  # the driver reuses y's descriptor
    assert w == y
    assert b.take(1) == [w]
    b.close()  # it dies with x, z and w in flight, taken in that order
    (v,) = add(ram, drv, 1)  # the driver goes on meanwhile
    # The front-end restarts the ring at used->idx (1), as QEMU does after a crash.
    b2 = Backend(mem, drv, area, base=drv.used_idx())
    assert b2.again == [x, z, w]  # oldest first, not by head
    assert b2.ring.last_avail == 4  # used idx 1 plus the 3 left in flight
    assert b2.q.available() == 4
    assert b2.take(8) == [x, z, w]  # the ones left first, on their own
    assert b2.take(8) == [v]
    b2.complete([v, z, x, w])
    assert [h for h, _ in drv.take_used()] == [v, z, x, w]
    assert all(desc(area, i)[0] == 0 for i in range(SIZE))
    b2.close()


def test_a_batch_published_but_not_cleared_is_not_served_again(
        ram: GuestRam, mem: GuestMemory, drv: DriverRing, area: bytearray) -> None:
    b = Backend(mem, drv, area, base=0)
    x, y, z = add(ram, drv, 3)
    b.take(3)
    # Death between storing used->idx and clearing the flags: do what _publish does up to
    # the store, by hand.
    b.tracker.link([y, x])
    b.ring.push(y, 1)
    b.ring.push(x, 1)
    b.ring.publish()
    assert [desc(area, h)[0] for h in (x, y, z)] == [1, 1, 1]
    assert header(area)[4] == 0
    b.close()
    b2 = Backend(mem, drv, area, base=drv.used_idx())
    assert b2.again == [z]
    assert header(area)[4] == 2
    assert b2.ring.last_avail == 3
    b2.close()


def test_a_chain_given_back_is_served_once(
        ram: GuestRam, mem: GuestMemory, drv: DriverRing, area: bytearray) -> None:
    b = Backend(mem, drv, area, base=0)
    x, y = add(ram, drv, 2)
    assert b.take(2) == [x, y]
    b.q.unpop(1)  # y goes back, still marked
    b.close()
    b2 = Backend(mem, drv, area, base=0)
    served = b2.take(8) + b2.take(8)
    assert sorted(served) == sorted([x, y])
    b2.complete(served)
    assert sorted(h for h, _ in drv.take_used()) == sorted([x, y])
    b2.close()


def test_resubmitted_chains_given_back_come_again(
        ram: GuestRam, mem: GuestMemory, drv: DriverRing, area: bytearray) -> None:
    b = Backend(mem, drv, area, base=0)
    x, y = add(ram, drv, 2)
    b.take(2)
    b.close()
    b2 = Backend(mem, drv, area, base=0)
    assert b2.take(1) == [x]
    b2.q.unpop(1)
    assert b2.take(8) == [x, y]
    b2.close()


def _corrupt(ram: GuestRam, mem: GuestMemory, how: str) -> str:
    drv = DriverRing(ram, SIZE)
    area = bytearray(4096)
    b = Backend(mem, drv, area, base=0)
    heads = add(ram, drv, 2)
    b.take(2)
    b.close()
    base = SPEC_HEADER.size
    if how == "version":
        struct.pack_into("<H", area, 8, 2)
    elif how == "desc_num":
        struct.pack_into("<H", area, 10, SIZE // 2)
    elif how == "batch head":
        drv.used16.store(1, 1)
        struct.pack_into("<H", area, 12, 1000)
    elif how == "too many":
        for i in range(SIZE):
            area[base + SPEC_DESC.size * i] = 1
    elif how == "flag":
        area[base + SPEC_DESC.size * heads[0]] = 7
    with pytest.raises(RingError) as e:
        Backend(mem, drv, area, base=0)
    return str(e.value)


@pytest.mark.parametrize("how, says", [
    ("version", "version 2"),
    ("desc_num", "for 4 descriptors, the ring has 8"),
    ("batch head", "batch entry 1000"),
    ("too many", "lists 8 requests, the driver has only 2 available"),
    ("flag", "a flag other than 0 or 1"),
])
def test_an_area_the_ring_contradicts_is_refused(ram: GuestRam, mem: GuestMemory,
                                                 how: str, says: str) -> None:
    assert says in _corrupt(ram, mem, how)


def test_a_region_of_another_size_with_nothing_in_flight_starts_afresh(
        ram: GuestRam, mem: GuestMemory, drv: DriverRing, area: bytearray) -> None:
    SPEC_HEADER.pack_into(area, 0, 0, 1, 2 * SIZE, 5, 9)  # a ring of 16, all done
    b = Backend(mem, drv, area, base=0)
    assert b.again == []
    assert header(area) == (0, 1, SIZE, 0, 0)
    b.close()


def test_an_area_of_another_life_of_the_ring_starts_afresh(
        ram: GuestRam, mem: GuestMemory, drv: DriverRing, area: bytearray) -> None:
    """The driver reset the ring (used idx back to 0) and the front-end kept the area: its
    used index is far ahead of the ring's, whatever it still marks is of the old life."""
    b = Backend(mem, drv, area, base=0)
    for _ in range(3):  # 18 chains through, two left in flight
        heads = add(ram, drv, 6)
        b.take(6)
        b.complete(heads)
        drv.take_used()
    add(ram, drv, 2)
    b.take(2)
    b.close()
    fresh = DriverRing(ram, SIZE)  # the reset ring: indices at 0
    b2 = Backend(mem, fresh, area, base=0)
    assert b2.again == []
    assert header(area) == (0, 1, SIZE, 0, 0)
    assert all(desc(area, i)[0] == 0 for i in range(SIZE))
    b2.close()


def test_an_area_with_nothing_in_flight_follows_the_ring(
        mem: GuestMemory, drv: DriverRing, area: bytearray) -> None:
    SPEC_HEADER.pack_into(area, 0, 0, 1, SIZE, 3, 2)  # behind the ring, nothing marked
    drv.used16.store(1, 5)
    drv.avail16.store(1, 5)
    b = Backend(mem, drv, area, base=5)
    assert b.again == [] and b.ring.last_avail == 5
    assert header(area)[4] == 5
    b.close()


def test_a_region_too_small_is_refused() -> None:
    with pytest.raises(RingError, match="too small"):
        SplitInflight(memoryview(bytearray(100)), SIZE)


def test_writable_flag_is_irrelevant_to_tracking(
        ram: GuestRam, mem: GuestMemory, drv: DriverRing, area: bytearray) -> None:
    """A readable-only chain is tracked the same way (blk writes: data out, status in)."""
    b = Backend(mem, drv, area, base=0)
    h = drv.add([(ram.alloc(16), 16, False), (ram.alloc(1), 1, bool(DESC_F_WRITE))])
    assert b.take(1) == [h]
    assert desc(area, h)[0] == 1
    b.close()
