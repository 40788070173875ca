"""The device side of the split ring against a driver-side ring in the same memory:
chain parsing, every validation case, used-ring updates and notification decisions."""

from __future__ import annotations

import struct

import pytest

from vhostuser.memory import GuestMemory, mmap_region
from vhostuser.virtq.guest_ram import GuestRam
from vhostuser.virtq.ring import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    RingError,
    RingLayout,
)
from vhostuser.virtq.split import SplitQueue
from vhostuser.virtq.split_driver import DriverRing

SIZE = 8


def make(ram: GuestRam, mem: GuestMemory, event_idx: bool = False,
         indirect: bool = True) -> tuple[DriverRing, SplitQueue]:
    drv = DriverRing(ram, SIZE, event_idx)
    return drv, SplitQueue(mem, drv.layout(), 0, event_idx, indirect)


def buf(ram: GuestRam, data: bytes) -> int:
    gpa = ram.alloc(len(data))
    ram.at(gpa, len(data))[:] = data
    return gpa


def test_chain_buffers_are_guest_memory(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    a, b = buf(ram, b"hello"), buf(ram, b"world!")
    w = ram.alloc(4)
    head = drv.add([(a, 5, False), (b, 6, False), (w, 4, True)])
    assert q.available() == 1
    chain = q.pop()
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"hello", b"world!"]
    assert [len(v) for v in chain.writable] == [4]
    chain.writable[0][:] = b"DONE"  # a device write lands in guest RAM, no copy
    assert bytes(ram.at(w, 4)) == b"DONE"
    assert q.available() == 0


def test_indirect_and_direct_then_indirect(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    a, w = buf(ram, b"abc"), ram.alloc(2)
    drv.add([(a, 3, False), (w, 2, True)], indirect=True)
    chain = q.pop()
    assert [bytes(v) for v in chain.readable] == [b"abc"] and len(chain.writable) == 1
    # direct descriptor followed by one indirect table holding the rest
    table = ram.alloc(16)
    struct.pack_into("<QIHH", ram.at(table, 16), 0, w, 2, DESC_F_WRITE, 0)
    drv.write_desc(5, a, 3, DESC_F_NEXT, 6)
    drv.write_desc(6, table, 16, DESC_F_INDIRECT, 0)
    drv.publish(5)
    chain = q.pop()
    assert [bytes(v) for v in chain.readable] == [b"abc"] and len(chain.writable) == 1


def test_buffer_split_across_adjoining_regions(ram: GuestRam) -> None:
    lo, hi = GuestRam(0x10000, 0x0, 0x1000_0000), GuestRam(0x10000, 0x10000, 0x2000_0000)
    m = GuestMemory()
    for r in (lo, hi):
        m.add(r.region(), mmap_region(r.region(), r.fd))
    lo.at(0xFFF0, 16)[:] = b"A" * 16
    hi.at(0x10000, 16)[:] = b"B" * 16
    views = m.gpa_iov(0xFFF0, 32)
    assert [bytes(v) for v in views] == [b"A" * 16, b"B" * 16]
    del views
    m.clear()


def bad(q: SplitQueue, match: str) -> None:
    with pytest.raises(RingError, match=match):
        q.pop()


def test_loop(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    a = buf(ram, b"x")
    drv.write_desc(0, a, 1, DESC_F_NEXT, 1)
    drv.write_desc(1, a, 1, DESC_F_NEXT, 0)
    drv.publish(0)
    bad(q, "loop")


def test_self_loop_in_indirect_table(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    a, table = buf(ram, b"x"), ram.alloc(32)
    struct.pack_into("<QIHHQIHH", ram.at(table, 32), 0, a, 1, DESC_F_NEXT, 1, a, 1, DESC_F_NEXT, 0)
    drv.write_desc(0, table, 32, DESC_F_INDIRECT, 0)
    drv.publish(0)
    bad(q, "loop|more than")


def test_head_beyond_queue_size(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    drv.publish(SIZE)
    bad(q, "head 8 >= queue size")


def test_next_beyond_queue_size(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    drv.write_desc(0, buf(ram, b"x"), 1, DESC_F_NEXT, 200)
    drv.publish(0)
    bad(q, "next index 200")


def test_avail_idx_jumps_past_queue_size(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    drv.avail16.store(1, SIZE + 1)
    with pytest.raises(RingError, match="more than the queue size"):
        q.available()


def test_more_descriptors_than_queue_size(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    a = buf(ram, b"x")
    n = SIZE + 1  # an indirect table may not hold more than the queue size either
    table = ram.alloc(16 * n)
    for i in range(n):
        flags = DESC_F_NEXT if i + 1 < n else 0
        struct.pack_into("<QIHH", ram.at(table, 16 * n), 16 * i, a, 1, flags, i + 1)
    drv.write_desc(0, table, 16 * n, DESC_F_INDIRECT, 0)
    drv.publish(0)
    bad(q, f"more than {SIZE} descriptors")


def test_full_size_indirect_table_is_accepted(ram: GuestRam, mem: GuestMemory) -> None:
    """Linux fills an indirect table of exactly the queue size (header, seg_max data
    segments, status) behind one ring descriptor: that is not a loop."""
    drv, q = make(ram, mem)
    bufs = [(ram.alloc(16), 16, False)] + [(ram.alloc(64), 64, False)] * (SIZE - 2)
    drv.add([*bufs, (ram.alloc(1), 1, True)], indirect=True)
    chain = q.pop()
    assert len(chain.readable) == SIZE - 1 and len(chain.writable) == 1


def test_nested_indirect(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    inner, outer = ram.alloc(16), ram.alloc(16)
    struct.pack_into("<QIHH", ram.at(inner, 16), 0, buf(ram, b"x"), 1, 0, 0)
    struct.pack_into("<QIHH", ram.at(outer, 16), 0, inner, 16, DESC_F_INDIRECT, 0)
    drv.write_desc(0, outer, 16, DESC_F_INDIRECT, 0)
    drv.publish(0)
    bad(q, "nested indirect")


@pytest.mark.parametrize("length", [0, 8, 24, 17])
def test_indirect_length_not_multiple_of_16(ram: GuestRam, mem: GuestMemory, length: int) -> None:
    drv, q = make(ram, mem)
    drv.write_desc(0, ram.alloc(32), length, DESC_F_INDIRECT, 0)
    drv.publish(0)
    bad(q, "multiple of 16")


def test_indirect_with_next(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    drv.write_desc(0, ram.alloc(16), 16, DESC_F_INDIRECT | DESC_F_NEXT, 1)
    drv.publish(0)
    bad(q, "indirect descriptor with NEXT")


def test_indirect_not_negotiated(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem, indirect=False)
    drv.add([(buf(ram, b"x"), 1, False)], indirect=True)
    bad(q, "not negotiated")


def test_writable_before_readable(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    drv.add([(ram.alloc(4), 4, True), (buf(ram, b"x"), 1, False)])
    bad(q, "readable descriptor after a writable")


@pytest.mark.parametrize(("addr", "length"), [
    (0x0, 16),  # below the region
    (0x10000 + (1 << 20) - 8, 16),  # runs off the end
    (0x10000 + (1 << 20), 1),  # just past the end
    ((1 << 64) - 8, 16),  # wraps
])
def test_buffer_outside_guest_memory(ram: GuestRam, mem: GuestMemory, addr: int,
                                     length: int) -> None:
    drv, q = make(ram, mem)
    drv.write_desc(0, addr, length, 0, 0)
    drv.publish(0)
    bad(q, "not mapped")


def test_indirect_table_outside_guest_memory(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    drv.write_desc(0, 0x5000_0000, 64, DESC_F_INDIRECT, 0)
    drv.publish(0)
    bad(q, "indirect table")


def test_rings_outside_memory_or_misaligned(ram: GuestRam, mem: GuestMemory) -> None:
    drv = DriverRing(ram, SIZE)
    lay = drv.layout()
    for broken in (RingLayout(SIZE, 0x1000, lay.avail, lay.used),
                   RingLayout(SIZE, lay.desc, lay.avail, ram.uva(ram.guest_addr + ram.size - 8)),
                   RingLayout(SIZE, lay.desc + 8, lay.avail, lay.used),
                   RingLayout(SIZE, lay.desc, lay.avail + 1, lay.used),
                   RingLayout(SIZE, lay.desc, lay.avail, lay.used + 2),
                   RingLayout(6, lay.desc, lay.avail, lay.used)):
        with pytest.raises(RingError):
            SplitQueue(mem, broken, 0, False)


def test_used_ring_and_notification_without_event_idx(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    heads = [drv.add([(ram.alloc(8), 8, True)]) for _ in range(3)]
    chains = [q.pop() for _ in range(3)]
    for c, n in zip(chains, (1, 2, 3), strict=True):
        q.push(c.head, n)
    assert drv.used_idx() == 0  # nothing visible before publish
    assert q.publish() is True
    assert drv.take_used() == list(zip(heads, (1, 2, 3), strict=True))
    drv.set_interrupts(False)  # VRING_AVAIL_F_NO_INTERRUPT
    drv.add([(ram.alloc(8), 8, True)])
    q.push(q.pop().head, 0)
    assert q.publish() is False


def test_event_idx_notification(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem, event_idx=True)
    for _ in range(4):
        drv.add([(ram.alloc(8), 8, True)])
    drv.avail16.store(2 + SIZE, 2)  # used_event: call me when used idx passes 2
    q.push(q.pop().head, 0)
    assert q.publish() is True  # the first decision always notifies
    q.push(q.pop().head, 0)  # used idx 1 -> 2: event 2 not yet crossed
    assert q.publish() is False
    q.push(q.pop().head, 0)  # 2 -> 3 crosses used_event = 2
    assert q.publish() is True
    q.push(q.pop().head, 0)
    assert q.publish() is False


def test_driver_never_strands_a_completion_with_event_idx(ram: GuestRam, mem: GuestMemory,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The device publishes a completion just after the driver read used idx and before it
    moved used_event on: the device's decision (against the old used_event) raises no call,
    so the driver must look again after arming, or the completion waits forever (this hung
    a vhost-user session relayed through rxq)."""
    drv, q = make(ram, mem, event_idx=True)
    for _ in range(3):
        drv.add([(ram.alloc(8), 8, True)])
    q.push(q.pop().head, 1)
    assert q.publish() is True
    assert [n for _, n in drv.take_used()] == [1]  # used_event = 1 now
    q.push(q.pop().head, 2)
    assert q.publish() is True  # crosses used_event 1: the call that wakes the driver

    real, raced = DriverRing.used_idx, []

    def used_idx_then_device_races(self: DriverRing) -> int:
        idx = real(self)
        if not raced:  # the device completes one more right after this read
            raced.append(True)
            q.push(q.pop().head, 3)
            assert q.publish() is False  # used_event is still 1: no call for this one
        return idx

    monkeypatch.setattr(DriverRing, "used_idx", used_idx_then_device_races)
    assert [n for _, n in drv.take_used()] == [2, 3]  # found by the look after arming
    assert drv.last_used == real(drv) == 3


def test_kick_suppression(ram: GuestRam, mem: GuestMemory) -> None:
    drv, q = make(ram, mem)
    q.disable_kicks()
    assert drv.used16.load(0) == 1  # VRING_USED_F_NO_NOTIFY
    assert not drv.needs_kick()
    drv.add([(ram.alloc(8), 8, True)])
    assert q.enable_kicks() is True  # a chain arrived while kicks were off
    assert drv.used16.load(0) == 0
    drv2, q2 = make(ram, mem, event_idx=True)
    drv2.add([(ram.alloc(8), 8, True)])
    q2.pop()
    assert q2.enable_kicks() is False
    assert drv2.used16.load(2 + 4 * SIZE) == 1  # avail_event = next avail index we want


def test_direct_burst_matches_the_chain_walk_and_refuses_anything_odd(
        ram: GuestRam, mem: GuestMemory) -> None:
    """burst.pop_direct takes a burst of one-descriptor readable chains with array
    operations; it stops before the first chain it would get wrong (NEXT/WRITE/INDIRECT,
    head out of range, a buffer leaving guest memory, an address that wraps 2^64, another
    region) and pops nothing when that is the first, so the chain walk reports it."""
    from vhostuser.virtq.burst import pop_direct, push_heads

    drv, q = make(ram, mem)
    bufs = [buf(ram, bytes([i]) * (10 + i)) for i in range(5)]
    heads = [drv.add([(g, 10 + i, False)]) for i, g in enumerate(bufs)]
    b = pop_direct(q, 5)
    assert b is not None and b.heads.tolist() == heads and q.last_avail == 5
    assert [bytes(b.view[o : o + n]) for o, n in zip(b.offsets.tolist(), b.lengths.tolist(),
                                                      strict=True)] == [
        bytes([i]) * (10 + i) for i in range(5)]
    push_heads(q, b.heads)
    assert q.publish() and drv.take_used() == [(h, 0) for h in heads]

    lo, hi = ram.guest_addr, ram.guest_addr + ram.size
    odd = {
        "a chain of two": [(bufs[0], 4, False), (bufs[1], 4, False)],
        "writable": [(bufs[0], 4, True)],
        "past the end of memory": [(hi - 8, 16, False)],
        "wrapping 2^64": [((1 << 64) - 8, 16, False)],
        "below memory": [(lo - 16, 8, False)],
    }
    for what, chain in odd.items():
        drv2, q2 = make(ram, mem)
        drv2.add([(bufs[2], 4, False)])
        drv2.add(chain)
        drv2.add([(bufs[3], 4, False)])
        b2 = pop_direct(q2, 3)  # the run before the odd chain only
        assert b2 is not None and len(b2.heads) == 1 and q2.last_avail == 1, what
        assert pop_direct(q2, 2) is None and q2.last_avail == 1, what  # odd chain first
        chains, error = q2.pop_batch(2)
        if what in ("a chain of two", "writable"):
            assert error is None and len(chains) == 2, what  # legal, just not this path
        else:
            assert isinstance(error, RingError) and not chains, what
    drv3, q3 = make(ram, mem)
    drv3.publish(SIZE + 3)  # a head beyond the queue size
    assert pop_direct(q3, 1) is None
    with pytest.raises(RingError, match="head"):
        q3.pop()

    # used elements written across the end of the ring
    drv4, q4 = make(ram, mem)
    for _ in range(2):
        for _ in range(SIZE - 2):
            drv4.add([(bufs[0], 4, False)])
        burst = pop_direct(q4, SIZE - 2)
        assert burst is not None
        push_heads(q4, burst.heads, 7)
        q4.publish()
        assert [n for _, n in drv4.take_used()] == [7] * (SIZE - 2)
    assert q4.used_idx == 2 * (SIZE - 2)


def test_scatter_frames_into_a_writable_burst(ram: GuestRam, mem: GuestMemory) -> None:
    from vhostuser.devices.net_frames import Frames
    from vhostuser.virtq.burst import pop_direct, push_heads, scatter_frames

    drv, q = make(ram, mem)
    bufs = [ram.alloc(32) for _ in range(3)]
    heads = [drv.add([(g, 32, True)]) for g in bufs]
    assert pop_direct(q, 3) is None  # writable buffers are not a transmit burst
    b = pop_direct(q, 3, DESC_F_WRITE)
    assert b is not None
    frames = [b"a" * 20, b"bb" * 10, b"c" * 27]
    too_long = Frames.of([*frames[:2], b"x" * 29])
    assert scatter_frames(b, b"HDR!", too_long.data, too_long.offs,
                          too_long.lens) is None  # 4 + 29 > 32
    assert bytes(ram.at(bufs[0], 4)) != b"HDR!"  # nothing written
    packed = Frames.of(frames)
    written = scatter_frames(b, b"HDR!", packed.data, packed.offs, packed.lens)
    assert written is not None and written.tolist() == [24, 24, 31]
    for g, f in zip(bufs, frames, strict=True):
        assert bytes(ram.at(g, 4 + len(f))) == b"HDR!" + f
    push_heads(q, b.heads, written)
    q.publish()
    assert drv.take_used() == list(zip(heads, (24, 24, 31), strict=True))


def test_direct_bursts_split_at_region_boundaries(ram: GuestRam, mem: GuestMemory) -> None:
    """Buffers in two memory regions (guest RAM below and above 4 GiB): each run of
    chains in one region is one burst, with offsets into that region."""
    from vhostuser.virtq.burst import pop_direct

    high = GuestRam(1 << 20, guest_addr=0x1_0000_0000, user_addr=0x7E00_0000_0000)
    mem.add(high.region(), mmap_region(high.region(), high.fd))
    drv, q = make(ram, mem)
    where = [ram, ram, high, high, ram]
    for i, r in enumerate(where):
        g = r.alloc(8)
        r.at(g, 8)[:] = bytes([i]) * 8
        drv.add([(g, 8, False)])
    runs = []
    while q.available():
        b = pop_direct(q, q.available())
        assert b is not None
        runs.append([bytes(b.view[o : o + 8]) for o in b.offsets.tolist()])
    assert runs == [[bytes([0]) * 8, bytes([1]) * 8], [bytes([2]) * 8, bytes([3]) * 8],
                    [bytes([4]) * 8]]
    q.release()
    mem.clear()
    high.close()
