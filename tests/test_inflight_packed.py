"""In-flight tracking on packed rings (vhost-user INFLIGHT_SHMFD): what the device side
stores in the area, read back with the spec's layout (QEMU docs/interop/vhost-user.rst,
"Inflight I/O tracking", QueueRegionPacked and DescStatePacked, decoded here with struct
formats of its own), and what a back-end that starts on the area a dead one left serves
again, from the copies, while the front-end's base is stale; deaths in the middle of
returning a chain; areas that contradict themselves."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from vhostuser.engine.notify import NoNotifier
from vhostuser.engine.queue import DeviceQueue
from vhostuser.memory import GuestMemory
from vhostuser.virtq.guest_ram import GuestRam
from vhostuser.virtq.inflight_packed import PackedInflight
from vhostuser.virtq.packed import PackedQueue, split_base
from vhostuser.virtq.packed_driver import FRESH_BASE, PackedDriverRing
from vhostuser.virtq.ring import Chain, RingError

SIZE = 8
# features, version, desc_num, free_head, old_free_head, used_idx, old_used_idx,
# used_wrap_counter, old_used_wrap_counter, padding
SPEC_HEADER = struct.Struct("<QHHHHHHBB10x")
# inflight, padding, next, last, num, counter, id, flags, len, addr
SPEC_DESC = struct.Struct("<BxHHHQHHIQ")


class Died(Exception):
    """Stands for SIGKILL at one point of the back-end's work."""


@pytest.fixture
def drv(ram: GuestRam) -> PackedDriverRing:
    return PackedDriverRing(ram, SIZE)


@pytest.fixture
def area() -> bytearray:
    return bytearray(4096)


def header(area: bytearray) -> dict[str, int]:
    names = ("features", "version", "desc_num", "free_head", "old_free_head", "used_idx",
             "old_used_idx", "used_wrap", "old_used_wrap")
    return dict(zip(names, SPEC_HEADER.unpack_from(area, 0), strict=True))


def entry(area: bytearray, i: int) -> dict[str, int]:
    names = ("inflight", "next", "last", "num", "counter", "id", "flags", "len", "addr")
    return dict(zip(names, SPEC_DESC.unpack_from(area, 32 + 32 * i), strict=True))


def in_flight(area: bytearray) -> list[int]:
    return [i for i in range(SIZE) if entry(area, i)["inflight"]]


class Backend:
    """One back-end's queue over the ring and the area (dropped without a word: a crash)."""

    def __init__(self, mem: GuestMemory, drv: PackedDriverRing, area: bytearray,
                 base: int = FRESH_BASE) -> None:
        self.ring = PackedQueue(mem, drv.layout(), base, False)
        self.tracker = PackedInflight(memoryview(area), drv.size)
        self.again = self.tracker.recover(self.ring)
        self.q = DeviceQueue(self.ring, 0, NoNotifier(), tracker=self.tracker)
        self.q.resubmit(self.again)

    def take(self, n: int) -> list[Chain]:
        return self.q.pop_batch(n)

    def complete(self, chains: list[Chain]) -> None:
        self.q.complete_batch(chains, [1] * len(chains))
        self.q.notify()

    def close(self) -> None:
        self.q.release()


def add(ram: GuestRam, drv: PackedDriverRing, ndesc: int, tag: int) -> tuple[int, int]:
    """A chain of `ndesc` buffers, the first holding `tag`; (buffer id, its gpa)."""
    gpa = ram.alloc(16)
    ram.at(gpa, 1)[0] = tag
    bid = drv.add([(gpa, 16, False)] + [(ram.alloc(16), 16, True)] * (ndesc - 1))
    return bid, gpa


def test_a_fresh_area_is_initialised_at_the_base(ram: GuestRam, mem: GuestMemory,
                                                 drv: PackedDriverRing,
                                                 area: bytearray) -> None:
    base = 5 | 0 << 15 | (5 | 0 << 15) << 16  # both positions at 5 on the second pass
    b = Backend(mem, drv, area, base)
    assert b.again == []
    h = header(area)
    assert (h["version"], h["desc_num"], h["free_head"], h["old_free_head"]) == (1, SIZE, 0, 0)
    assert (h["used_idx"], h["old_used_idx"], h["used_wrap"], h["old_used_wrap"]) == (5, 5, 0, 0)
    assert [entry(area, i)["next"] for i in range(SIZE)] == list(range(1, SIZE + 1))
    b.close()


def test_taken_and_returned_chains_are_recorded_as_the_spec_says(
        ram: GuestRam, mem: GuestMemory, drv: PackedDriverRing, area: bytearray) -> None:
    b = Backend(mem, drv, area)
    (x, gx), (y, _), (z, _) = add(ram, drv, 2, 1), add(ram, drv, 1, 2), add(ram, drv, 3, 3)
    cx, cy, cz = b.take(3)
    assert [c.head for c in (cx, cy, cz)] == [x, y, z]
    # copies of the descriptors, chained from the free list in order: x 0-1, y 2, z 3-5
    assert in_flight(area) == [0, 2, 3]
    ex, ey, ez = entry(area, 0), entry(area, 2), entry(area, 3)
    assert (ex["num"], ex["last"], ex["addr"], ex["len"]) == (2, 1, gx, 16)
    assert entry(area, 1)["id"] == x and entry(area, 5)["id"] == z
    assert (ey["num"], ey["last"], ez["num"], ez["last"]) == (1, 2, 3, 5)
    assert ex["counter"] < ey["counter"] < ez["counter"]
    assert header(area)["free_head"] == 6
    b.complete([cy])  # out of order: y's used descriptor at ring position 0
    h = header(area)
    assert in_flight(area) == [0, 3]
    assert (h["used_idx"], h["old_used_idx"], h["free_head"], h["old_free_head"]) == (1, 1, 2, 2)
    assert entry(area, 2)["next"] == 6  # y's entry back on the free list
    assert drv.take_used() == [(y, 1)]
    b.complete([cz, cx])
    h = header(area)
    assert in_flight(area) == [] and (h["used_idx"], h["used_wrap"]) == (6, 1)
    assert [bid for bid, _ in drv.take_used()] == [z, x]
    b.close()


def test_a_new_back_end_serves_the_copies_from_where_the_area_says(
        ram: GuestRam, mem: GuestMemory, drv: PackedDriverRing, area: bytearray) -> None:
    b = Backend(mem, drv, area)
    (x, _), (y, _), (z, _) = add(ram, drv, 2, 1), add(ram, drv, 1, 2), add(ram, drv, 3, 3)
    _, _, cz = b.take(3)
    b.complete([cz])  # z's used descriptor overwrites x's first one in the ring
    assert drv.take_used() == [(z, 1)]
    (w, _) = add(ram, drv, 2, 4)  # the driver goes on: into positions 6 and 7
    b.close()  # dies with x and y in flight
    # QEMU cannot know where a packed ring stood: it sends the base it started with
    b2 = Backend(mem, drv, area, FRESH_BASE)
    # used at 3 (z's 3 descriptors), avail past the 3 of x and y: 6
    assert split_base(b2.ring.base()) == (6, 1, 3, 1)
    again = b2.take(8)
    assert [(c.head, c.ndesc, bytes(c.readable[0][:1])) for c in again] == \
        [(x, 2, b"\x01"), (y, 1, b"\x02")]
    (cw,) = b2.take(8)
    assert cw.head == w
    b2.complete([cw, *again])
    assert [bid for bid, _ in drv.take_used()] == [w, x, y]
    assert in_flight(area) == []
    assert split_base(b2.ring.base()) == (0, 0, 0, 0)  # 8 descriptors: one whole pass
    b2.close()


@pytest.mark.parametrize("when", ["before the ring write", "after the ring write"])
def test_a_death_while_returning_a_chain(ram: GuestRam, mem: GuestMemory,
                                         drv: PackedDriverRing, area: bytearray,
                                         when: str) -> None:
    b = Backend(mem, drv, area)
    (x, _), (y, _) = add(ram, drv, 1, 1), add(ram, drv, 2, 2)
    _, cy = b.take(2)
    write: Callable[[Chain, int], None] = b.ring.push_now

    def dies(c: Chain, w: int) -> None:
        if when == "after the ring write":
            write(c, w)
        raise Died()

    b.ring.push_now = dies  # type: ignore[method-assign]
    with pytest.raises(Died):
        b.complete([cy])
    h = header(area)
    assert h["used_idx"] == 2 and h["old_used_idx"] == 0  # not committed
    b.close()
    seen = drv.take_used()
    b2 = Backend(mem, drv, area, FRESH_BASE)
    if when == "after the ring write":  # the driver had it: committed, not served again
        assert seen == [(y, 1)]
        assert [c.head for c in b2.take(8)] == [x]
        assert split_base(b2.ring.base()) == (3, 1, 2, 1)
    else:  # rolled back: served again
        assert seen == []
        assert [c.head for c in b2.take(8)] == [x, y]
        assert split_base(b2.ring.base()) == (3, 1, 0, 1)
    h = header(area)
    assert (h["used_idx"], h["used_wrap"]) == (h["old_used_idx"], h["old_used_wrap"])
    b2.close()


def test_a_chain_given_back_is_not_in_flight(ram: GuestRam, mem: GuestMemory,
                                             drv: PackedDriverRing, area: bytearray) -> None:
    b = Backend(mem, drv, area)
    add(ram, drv, 2, 1)
    add(ram, drv, 1, 2)
    b.take(2)
    b.q.unpop(1)
    assert in_flight(area) == [0]
    b.q.unpop(1)
    assert in_flight(area) == []
    again = b.take(2)
    assert [c.ndesc for c in again] == [2, 1] and in_flight(area) == [0, 2]
    b.close()


def test_a_pristine_area_follows_the_base(ram: GuestRam, mem: GuestMemory,
                                          drv: PackedDriverRing, area: bytearray) -> None:
    Backend(mem, drv, area).close()  # initialised at (0, 1), nothing ever returned
    b = Backend(mem, drv, area, 4 | 1 << 15 | (4 | 1 << 15) << 16)
    assert split_base(b.ring.base()) == (4, 1, 4, 1)
    b.close()


@pytest.mark.parametrize("damage", ["flag", "num", "last", "next", "used", "wrap",
                                    "version"])
def test_an_area_that_contradicts_itself_is_refused(ram: GuestRam, mem: GuestMemory,
                                                    drv: PackedDriverRing, area: bytearray,
                                                    damage: str) -> None:
    b = Backend(mem, drv, area)
    add(ram, drv, 3, 1)
    b.take(1)
    b.close()
    at = 32  # entry 0: the chain's head
    if damage == "flag":
        area[at] = 2
    elif damage == "num":
        struct.pack_into("<H", area, at + 6, SIZE + 1)
    elif damage == "last":
        struct.pack_into("<H", area, at + 4, 1)  # the chain runs 0, 1, 2
    elif damage == "next":
        struct.pack_into("<H", area, 32 + 32 * 1 + 2, 0)  # entry 1 leads back to 0
    elif damage == "used":
        struct.pack_into("<H", area, 18, SIZE)
    elif damage == "wrap":
        area[21] = 7
    else:
        struct.pack_into("<H", area, 8, 2)
    with pytest.raises(RingError, match="in-flight region"):
        Backend(mem, drv, area)


def test_a_region_too_small_is_refused() -> None:
    with pytest.raises(RingError, match="too small"):
        PackedInflight(memoryview(bytearray(32 + 32 * SIZE - 1)), SIZE)


def test_a_whole_ring_in_flight_is_recovered(ram: GuestRam, mem: GuestMemory,
                                             drv: PackedDriverRing, area: bytearray) -> None:
    b = Backend(mem, drv, area)
    ids = [add(ram, drv, n, n)[0] for n in (3, 1, 4)]  # every descriptor of the ring
    assert [c.head for c in b.take(8)] == ids
    b.close()
    b2 = Backend(mem, drv, area)
    assert header(area)["free_head"] == SIZE  # nothing free
    again = b2.take(8)
    assert [(c.head, c.ndesc) for c in again] == list(zip(ids, (3, 1, 4), strict=True))
    b2.complete(again)
    assert [bid for bid, _ in drv.take_used()] == ids
    b2.close()


def test_a_chain_as_long_as_the_largest_ring(mem: GuestMemory, ram: GuestRam) -> None:
    """One chain of 32768 descriptors (the largest ring, every descriptor): recorded entry
    by entry and served again from the copies, in time linear in its length."""
    size = 32768
    drv = PackedDriverRing(ram, size)
    area = bytearray(2 << 20)
    b = Backend(mem, drv, area)
    gpa = ram.alloc(16)
    ram.at(gpa, 1)[0] = 9
    bid = drv.add([(gpa, 16, False)] + [(ram.alloc(1), 1, True)] * (size - 1))
    (c,) = b.take(1)
    assert (c.head, c.ndesc) == (bid, size)
    e = entry(area, 0)
    assert (e["inflight"], e["num"], e["last"]) == (1, size, size - 1)
    b.close()
    b2 = Backend(mem, drv, area)
    (again,) = b2.take(1)
    assert (again.head, again.ndesc, bytes(again.readable[0][:1])) == (bid, size, b"\x09")
    b2.complete([again])
    assert drv.take_used() == [(bid, 1)]
    b2.close()


@pytest.mark.parametrize("torn", ["whole commit", "wrap counter only"])
def test_a_death_after_the_flag_was_cleared_commits(ram: GuestRam, mem: GuestMemory,
                                                    area: bytearray, torn: str) -> None:
    drv = PackedDriverRing(ram, 4)
    b = Backend(mem, drv, area)
    (x, _), (y, _) = add(ram, drv, 3, 1), add(ram, drv, 1, 2)
    cx, cy = b.q.pop_batch(2)
    b.complete([cx])  # x's 3 descriptors: used at 3
    before = bytes(area[:32])
    b.complete([cy])  # across the end: used at 0, second pass
    if torn == "whole commit":
        area[14:16], area[18:20], area[21] = before[14:16], before[18:20], before[21]
    else:  # old_used_idx stored, its wrap counter not
        area[21] = before[21]
    b.close()
    assert [bid for bid, _ in drv.take_used()] == [x, y]
    b2 = Backend(mem, drv, area)
    assert b2.again == [] and split_base(b2.ring.base()) == (0, 0, 0, 0)
    (z, _) = add(ram, drv, 1, 3)
    assert [c.head for c in b2.q.pop_batch(8)] == [z]
    b2.close()


def test_a_slot_the_driver_already_reused_commits(ram: GuestRam, mem: GuestMemory,
                                                  area: bytearray) -> None:
    """The used descriptor reached the ring, the back-end died before clearing the flag,
    and the driver, having seen it, already made the slot available for its next pass:
    the slot is no longer available on the committed pass, so the chain was returned."""
    drv = PackedDriverRing(ram, 2)
    b = Backend(mem, drv, area)
    (x, _) = add(ram, drv, 1, 1)
    (cx,) = b.q.pop_batch(1)
    write = b.ring.push_now

    def dies(c: Chain, w: int) -> None:
        write(c, w)
        raise Died()

    b.ring.push_now = dies  # type: ignore[method-assign]
    with pytest.raises(Died):
        b.complete([cx])
    b.close()
    assert drv.take_used() == [(x, 1)]
    (y, _), (z, _) = add(ram, drv, 1, 2), add(ram, drv, 1, 3)  # slots 1, then 0 again
    b2 = Backend(mem, drv, area)
    assert b2.again == []
    assert [c.head for c in b2.q.pop_batch(8)] == [y, z]
    b2.close()


def test_the_area_changed_after_recovery_changes_nothing(
        ram: GuestRam, mem: GuestMemory, drv: PackedDriverRing, area: bytearray) -> None:
    b = Backend(mem, drv, area)
    (x, _) = add(ram, drv, 3, 7)
    b.take(1)
    b.close()
    b2 = Backend(mem, drv, area)
    # the front-end scribbles over the chain's entries before they are served again
    struct.pack_into("<HHH", area, 32 + 2, 999, 999, 0)  # next, last, num of entry 0
    struct.pack_into("<H", area, 32 + 32 + 2, 60000)  # next of entry 1
    (c,) = b2.take(8)
    assert (c.head, c.ndesc, bytes(c.readable[0][:1])) == (x, 3, b"\x07")
    b2.complete([c])
    assert drv.take_used() == [(x, 1)]
    b2.close()
