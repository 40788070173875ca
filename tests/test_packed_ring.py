"""The device side of the packed ring: chains written by a driver-side ring in the same
memory and, for every rule a driver can break, descriptors written by hand as the spec lays
them out (virtio 1.1+ §2.8: {addr u64, len u32, id u16, flags u16}, AVAIL = 1 << 7,
USED = 1 << 15, both wrap counters starting at 1)."""

from __future__ import annotations

import struct

import pytest

from vhostuser.memory import GuestMemory
from vhostuser.virtq.guest_ram import GuestRam
from vhostuser.virtq.packed import PackedQueue, split_base
from vhostuser.virtq.packed_driver import FRESH_BASE, PackedDriverRing
from vhostuser.virtq.ring import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, RingError

SIZE = 8
AVAIL, USED = 0x80, 0x8000
DESC = struct.Struct("<QIHH")


def make(ram: GuestRam, mem: GuestMemory, size: int = SIZE, event_idx: bool = False,
         indirect: bool = True) -> tuple[PackedDriverRing, PackedQueue]:
    drv = PackedDriverRing(ram, size, event_idx)
    return drv, PackedQueue(mem, drv.layout(), FRESH_BASE, event_idx, indirect)


def buf(ram: GuestRam, data: bytes) -> int:
    gpa = ram.alloc(len(data))
    ram.at(gpa, len(data))[:] = data
    return gpa


def put(drv: PackedDriverRing, i: int, addr: int, n: int, bid: int, flags: int) -> None:
    """Write ring descriptor i by hand."""
    DESC.pack_into(drv.desc, 16 * i, addr, n, bid, flags)


def raw(drv: PackedDriverRing, i: int) -> tuple[int, int, int, int]:
    addr, n, bid, flags = DESC.unpack_from(drv.desc, 16 * i)
    return addr, n, bid, flags


def test_fresh_base_has_both_wrap_counters_set() -> None:
    assert FRESH_BASE == 0x8000_8000
    assert split_base(0x8000_8000) == (0, 1, 0, 1)
    assert split_base(0x8005) == (5, 1, 5, 1)  # DPDK sends the avail half only
    assert split_base(0x0005) == (5, 0, 5, 0)
    assert split_base(0x0003_8005) == (5, 1, 3, 0)


def test_chain_buffers_and_the_used_descriptor(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    a, b, w = buf(ram, b"hello"), buf(ram, b"world!"), ram.alloc(4)
    bid = drv.add([(a, 5, False), (b, 6, False), (w, 4, True)])
    assert q.available() == 1
    chains, err = q.pop_batch(1)
    assert err is None and len(chains) == 1
    c = chains[0]
    assert c.head == bid and c.ndesc == 3
    assert [bytes(v) for v in c.readable] == [b"hello", b"world!"]
    c.writable[0][:] = b"DONE"
    assert bytes(ram.at(w, 4)) == b"DONE"
    assert q.available() == 0
    q.push_batch([c], [4])
    assert raw(drv, 0)[3] & (AVAIL | USED) == AVAIL  # still the driver's until publish
    assert q.publish()  # the driver's events are on (flags 0)
    _, n, used_id, flags = raw(drv, 0)
    assert (n, used_id, flags) == (4, bid, AVAIL | USED | DESC_F_WRITE)
    assert drv.take_used() == [(bid, 4)]
    # the next used descriptor goes three positions on: the chain took three
    bid2 = drv.add([(a, 5, False)])
    (c2,), _ = q.pop_batch(1)
    q.push_batch([c2], [0])
    q.publish()
    assert raw(drv, 3)[1:] == (0, bid2, AVAIL | USED)  # nothing written: no WRITE flag
    assert q.base() == (4 | 1 << 15) | (4 | 1 << 15) << 16


def test_many_laps_with_chains_across_the_end(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem, size=5)
    data = [buf(ram, bytes([i]) * 3) for i in range(4)]
    lengths = [1, 2, 3, 2, 1, 3]
    for round_ in range(40):
        n = lengths[round_ % len(lengths)]
        bid = drv.add([(data[k], 3, False) for k in range(n)])
        assert q.available() == 1
        (c,), err = q.pop_batch(1)
        assert err is None and c.head == bid and c.ndesc == n
        assert [bytes(v) for v in c.readable] == [bytes([k]) * 3 for k in range(n)]
        q.push_batch([c], [0])
        q.publish()
        assert drv.take_used() == [(bid, 0)]
    # 80 descriptors over a ring of 5: 16 laps, both counters back where they started
    assert q.base() == drv.base() == (0 | 1 << 15) | (0 | 1 << 15) << 16


def test_out_of_order_completion_in_one_batch(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    a = buf(ram, b"x")
    ids = [drv.add([(a, 1, False)] * k) for k in (2, 1, 3)]
    assert q.available() == 3
    chains, _ = q.pop_batch(3)
    q.push_batch([chains[2], chains[0], chains[1]], [7, 8, 9])
    q.publish()
    assert drv.take_used() == [(ids[2], 7), (ids[0], 8), (ids[1], 9)]
    # used descriptors at 0, 3 (after the 3-descriptor chain) and 5 (after 2)
    assert [raw(drv, i)[2] for i in (0, 3, 5)] == [ids[2], ids[0], ids[1]]


def test_a_batch_is_visible_only_once_published(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    a = buf(ram, b"x")
    for _ in range(3):
        drv.add([(a, 1, False)])
    chains, _ = q.pop_batch(3)
    q.push_batch(chains, [0, 0, 0])
    assert drv.take_used() == []  # the first one's flags are still the driver's
    assert raw(drv, 1)[3] & (AVAIL | USED) == AVAIL | USED  # the others are written
    q.publish()
    assert len(drv.take_used()) == 3


def test_indirect_table(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    a, w = buf(ram, b"abc"), ram.alloc(2)
    bid = drv.add([(a, 3, False), (w, 2, True)], indirect=True)
    (c,), err = q.pop_batch(1)
    assert err is None and c.head == bid and c.ndesc == 1
    assert [bytes(v) for v in c.readable] == [b"abc"] and [len(v) for v in c.writable] == [2]


def test_notification_modes(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem, event_idx=True)
    a = buf(ram, b"x")

    def complete_one() -> bool:
        drv.add([(a, 1, False)])
        (c,), _ = q.pop_batch(1)
        q.push_batch([c], [0])
        return q.publish()

    struct.pack_into("<HH", ram.at(drv.driver_gpa, 4), 0, 0, 1)  # DISABLE
    assert not complete_one()
    struct.pack_into("<HH", ram.at(drv.driver_gpa, 4), 0, 0, 0)  # ENABLE
    assert complete_one()
    drv.take_used()
    # DESC: notify once the used descriptor at position 4 (first lap: wrap 1) is written
    struct.pack_into("<HH", ram.at(drv.driver_gpa, 4), 0, 4 | 1 << 15, 2)
    assert not complete_one()  # writes position 2
    assert not complete_one()  # 3
    assert complete_one()  # 4


def test_event_index_across_the_wrap(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem, size=4, event_idx=True)
    a = buf(ram, b"x")
    # position 1 of the second lap (wrap counter 0)
    struct.pack_into("<HH", ram.at(drv.driver_gpa, 4), 0, 1, 2)
    fired = []
    for _ in range(10):  # iteration k writes the used descriptor k % 4, on lap k // 4
        drv.add([(a, 1, False)])
        (c,), _ = q.pop_batch(1)
        q.push_batch([c], [0])
        fired.append(q.publish())
        drv.take_used()  # which moves the event on (EVENT_IDX): set it back
        drv.driver16.store(0, 1)
    # the first decision always notifies (nothing to compare with)
    assert fired == [k in (0, 5) for k in range(10)]


def test_kick_suppression(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    a = buf(ram, b"x")
    q.disable_kicks()
    assert struct.unpack_from("<HH", ram.at(drv.device_gpa, 4)) == (0, 1)
    drv.add([(a, 1, False)])
    assert not drv.needs_kick()
    assert q.enable_kicks()  # a chain arrived while kicks were off
    assert struct.unpack_from("<HH", ram.at(drv.device_gpa, 4)) == (0, 0)
    drv.add([(a, 1, False)])
    assert drv.needs_kick()


def test_unpop_gives_the_same_chains_again(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem, size=4)
    a, b = buf(ram, b"a"), buf(ram, b"b")
    drv.add([(a, 1, False)] * 3)
    drv.add([(b, 1, False)])
    chains, _ = q.pop_batch(2)
    q.unpop(2)
    assert q.available() == 2
    again, _ = q.pop_batch(2)
    assert [(c.head, c.ndesc) for c in again] == [(c.head, c.ndesc) for c in chains]


def test_restart_from_base(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem, size=4)
    a = buf(ram, b"z")
    for _ in range(3):
        drv.add([(a, 1, False)] * 2)
        (c,), _ = q.pop_batch(1)
        q.push_batch([c], [0])
        q.publish()
        drv.take_used()
    base = q.base()
    assert split_base(base) == (2, 0, 2, 0)  # 6 descriptors on a ring of 4
    q.release()
    q2 = PackedQueue(mem, drv.layout(), base, False)
    bid = drv.add([(a, 1, False)])
    (c,), err = q2.pop_batch(1)
    assert err is None and c.head == bid


# -- rules a driver can break ------------------------------------------------------------


def broken(q: PackedQueue) -> str:
    chains, err = q.pop_batch(1)
    assert err is not None and chains == []
    return str(err)


def test_a_chain_longer_than_the_ring(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem, size=4)
    a = buf(ram, b"x")
    for i in range(4):  # every descriptor available and NEXT: a chain with no end
        put(drv, i, a, 1, 0, AVAIL | DESC_F_NEXT)
    with pytest.raises(RingError, match="longer than the ring"):
        q.available()
    assert "longer than the ring" in broken(q)


def test_wrong_wrap_counter_is_not_available(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    a = buf(ram, b"x")
    put(drv, 0, a, 1, 0, USED)  # available on the second lap, not the first
    assert q.available() == 0
    put(drv, 0, a, 1, 0, AVAIL | USED)  # a used descriptor
    assert q.available() == 0
    assert "not available" in broken(q)
    put(drv, 0, a, 1, 0, AVAIL)
    assert q.available() == 1


def test_a_driver_taking_a_descriptor_back(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    a = buf(ram, b"x")
    put(drv, 0, a, 1, 0, AVAIL)
    assert q.available() == 1
    put(drv, 0, a, 1, 0, 0)
    assert "not available" in broken(q)


@pytest.mark.parametrize("case", ["nested", "next", "length", "empty", "oversize",
                                  "outside", "not-negotiated"])
def test_bad_indirect_tables(ram: GuestRam, mem: GuestMemory, case: str) -> None:
    drv, q = make(ram, mem, indirect=case != "not-negotiated")
    a = buf(ram, b"x")
    table = ram.alloc(16 * 2, 16)
    view = ram.at(table, 32)
    DESC.pack_into(view, 0, a, 1, 0, 0)
    DESC.pack_into(view, 16, a, 1, 0, DESC_F_INDIRECT if case == "nested" else 0)
    length = {"length": 24, "empty": 0, "oversize": 16 * (SIZE + 1)}.get(case, 32)
    addr = 0xDEAD_0000 if case == "outside" else table
    flags = AVAIL | DESC_F_INDIRECT | (DESC_F_NEXT if case == "next" else 0)
    put(drv, 0, addr, length, 0, flags)
    put(drv, 1, a, 1, 0, AVAIL)
    expect = {"nested": "nested", "next": "with NEXT", "length": "multiple of 16",
              "empty": "multiple of 16", "oversize": "more than", "outside": "not mapped",
              "not-negotiated": "not negotiated"}[case]
    assert expect in broken(q)


def test_buffer_outside_memory_and_order(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    a, w = buf(ram, b"x"), ram.alloc(1)
    put(drv, 0, 0xFFFF_FFFF_FFFF_FFF0, 0x20, 0, AVAIL)  # would wrap past 2^64
    assert "not mapped" in broken(q)
    drv2, q2 = make(ram, mem)
    put(drv2, 0, w, 1, 0, AVAIL | DESC_F_WRITE | DESC_F_NEXT)
    put(drv2, 1, a, 1, 0, AVAIL)
    assert "readable descriptor after a writable" in broken(q2)


@pytest.mark.parametrize("size", [0, 1 << 15 | 1])
def test_bad_sizes(ram: GuestRam, mem: GuestMemory, size: int) -> None:
    drv = PackedDriverRing(ram, 4)
    lay = drv.layout()
    from dataclasses import replace
    with pytest.raises(RingError, match="size"):
        PackedQueue(mem, replace(lay, size=size), FRESH_BASE, False)


def test_odd_sizes_work(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem, size=3)  # a packed ring need not be a power of 2
    a = buf(ram, b"q")
    for _ in range(7):
        bid = drv.add([(a, 1, False)] * 2)
        (c,), _ = q.pop_batch(1)
        q.push_batch([c], [1])
        q.publish()
        assert drv.take_used() == [(bid, 1)]


def test_bad_bases_and_areas(ram: GuestRam, mem: GuestMemory) -> None:
    drv = PackedDriverRing(ram, 4)
    lay = drv.layout()
    with pytest.raises(RingError, match="past the ring"):
        PackedQueue(mem, lay, 0x8004 | 0x8000 << 16, False)  # avail position 4 of 4
    with pytest.raises(RingError, match="past the ring"):
        PackedQueue(mem, lay, 0x8000 | 0x8009 << 16, False)
    from dataclasses import replace
    with pytest.raises(RingError, match="aligned"):
        PackedQueue(mem, replace(lay, avail=lay.avail + 2), FRESH_BASE, False)
    with pytest.raises(RingError, match="outside guest memory"):
        PackedQueue(mem, replace(lay, desc=lay.desc + (1 << 20) - 16), FRESH_BASE, False)
