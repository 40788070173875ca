"""Packed virtqueues through the whole engine: vhost-user-blk served on packed rings to the
Python front-end over a real socket (the Linux guest and DPDK peers are in
test_qemu_packed.py and test_switch_dpdk.py)."""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon import BLK_FEATURES, Daemon, blk_session

from vhostuser.devices.blk import COMPILED
from vhostuser.frontend.blk import T_IN, T_OUT
from vhostuser.protocol import VirtioFeature
from vhostuser.virtq.guest_ram import GuestRam
from vhostuser.virtq.packed import split_base
from vhostuser.virtq.packed_driver import PackedDriverRing

PACKED = BLK_FEATURES | VirtioFeature.RING_PACKED
OK = 0


@pytest.mark.parametrize("jit", [False, True])  # the compiled kernels serve packed rings
def test_packed_is_offered_and_serves_io(blk_daemon: Callable[..., Daemon], image: Path,
                                         monkeypatch: pytest.MonkeyPatch, jit: bool) -> None:
    monkeypatch.setenv("VHOSTUSER_JIT", "1" if jit else "0")
    d = blk_daemon()
    fe, (blk,) = blk_session(d.sock, features=PACKED, size=24)  # not a power of 2
    with fe:
        assert fe.features & VirtioFeature.RING_PACKED
        assert isinstance(blk.ring, PackedDriverRing)
        written = {}
        for i in range(60):  # chains of 3 descriptors, direct and indirect: many laps
            data = os.urandom(4096)
            assert blk.request(T_OUT, 8 * i, out=data, indirect=bool(i % 2))[0] == OK
            written[i] = data
        for i in range(0, 60, 7):
            assert blk.request(T_IN, 8 * i, in_len=4096, indirect=bool(i % 3)) == (OK,
                                                                                written[i])
    with open(image, "rb") as f:
        f.seek(8 * 512 * 59)
        assert f.read(4096) == written[59]
    assert (COMPILED in d.log()) == jit, d.log()


def test_many_in_flight_and_a_restart_from_the_reported_base(
        blk_daemon: Callable[..., Daemon]) -> None:
    d = blk_daemon("--io-threads", "4")  # no in-flight area: served in order
    fe, (blk,) = blk_session(d.sock, features=PACKED, size=16)
    with fe:
        heads = [blk.submit(0, 8 * i, in_len=4096, kick=False) for i in range(5)]
        fe.kick(0)
        done = blk.complete(5)
        assert sorted(done) == sorted(heads) and all(s == OK for s, _, _ in done.values())
        ring = blk.ring
        assert isinstance(ring, PackedDriverRing)
        base = fe.restart_queue(0)
        # 5 chains of 3 descriptors on a ring of 16: both positions at 15, first lap
        assert split_base(base) == (15, 1, 15, 1) == split_base(ring.base())
        for i in range(10):  # on across the wrap
            assert blk.read(8 * i, 512)[0] == OK
        base = fe.restart_queue(0)
        # 30 more descriptors: position 45 = 2 laps + 13, the counters flipped twice
        assert split_base(base) == (13, 1, 13, 1)


def test_multiqueue_packed(blk_daemon: Callable[..., Daemon]) -> None:
    d = blk_daemon("--num-queues", "3")
    fe, blks = blk_session(d.sock, queues=3, features=PACKED | (1 << 12), size=32)
    with fe:
        for q, blk in enumerate(blks):
            data = bytes([q]) * 512
            assert blk.write(1000 + q, data) == OK
        for q, blk in enumerate(blks):
            assert blk.read(1000 + q, 512) == (OK, bytes([q]) * 512)


# -- rings that break the rules: the queue stops, the daemon serves on ----------------------

AVAIL, USED, NEXT, WRITE, INDIRECT = 0x80, 0x8000, 1, 2, 4
DESC = struct.Struct("<QIHH")  # addr, len, id, flags (virtio 1.1+ §2.8)


def malicious(d: Daemon, build: Callable[[PackedDriverRing, GuestRam], None], log: str,
              stops: bool = True) -> None:
    fe, _ = blk_session(d.sock, features=PACKED, size=8)
    with fe:
        ring = fe.queues[0].ring
        assert isinstance(ring, PackedDriverRing)
        build(ring, fe.ram)
        fe.kick(0)
        with pytest.raises(TimeoutError):  # nothing completes
            fe.wait_used(0, timeout=1.0)
        if stops:
            d.wait_log(log)
        else:
            assert log not in d.log()
        assert d.alive()
    fe, (blk,) = blk_session(d.sock, features=PACKED, size=8)
    with fe:
        assert blk.read(1, 512)[0] == OK


def test_a_chain_longer_than_the_ring(blk_daemon: Callable[..., Daemon]) -> None:
    def build(ring: PackedDriverRing, ram: GuestRam) -> None:
        hdr = ram.alloc(16)
        for i in range(8):  # every descriptor available and chained: no end
            DESC.pack_into(ring.desc, 16 * i, hdr, 16, 0, AVAIL | NEXT)
    malicious(blk_daemon(), build, "longer than the ring")


def test_a_buffer_outside_guest_memory(blk_daemon: Callable[..., Daemon],
                                       image: Path) -> None:
    before = image.read_bytes()

    def build(ring: PackedDriverRing, ram: GuestRam) -> None:
        hdr = ram.alloc(16)
        ram.at(hdr, 16)[:] = struct.pack("<IIQ", 1, 0, 0)  # a write...
        DESC.pack_into(ring.desc, 16, 0x7FFF_0000_0000, 4096, 0, AVAIL | NEXT)  # ...of this
        DESC.pack_into(ring.desc, 32, ram.alloc(1), 1, 0, AVAIL | WRITE)
        DESC.pack_into(ring.desc, 0, hdr, 16, 0, AVAIL | NEXT)
    malicious(blk_daemon(), build, "is not mapped")
    assert image.read_bytes() == before


def test_a_nested_indirect_table(blk_daemon: Callable[..., Daemon]) -> None:
    def build(ring: PackedDriverRing, ram: GuestRam) -> None:
        table = ram.alloc(32)
        DESC.pack_into(ram.at(table, 32), 0, ram.alloc(16), 16, 0, 0)
        DESC.pack_into(ram.at(table, 32), 16, table, 32, 0, INDIRECT)
        DESC.pack_into(ring.desc, 0, table, 32, 0, AVAIL | INDIRECT)
    malicious(blk_daemon(), build, "nested indirect table")


def test_descriptors_of_the_wrong_pass_are_not_taken(blk_daemon: Callable[..., Daemon]) -> None:
    """A chain marked available for the second pass (AVAIL clear, USED set) or used (both
    set) on the first is not taken: nothing completes and the queue does not stop; marked
    available for the first pass, the same chain is served on the same session."""
    d = blk_daemon()
    fe, _ = blk_session(d.sock, features=PACKED, size=8)
    with fe:
        ring = fe.queues[0].ring
        assert isinstance(ring, PackedDriverRing)
        hdr, status = fe.ram.alloc(16), fe.ram.alloc(1)
        fe.ram.at(hdr, 16)[:] = struct.pack("<IIQ", 8, 0, 0)  # GET_ID...
        data = fe.ram.alloc(20)
        fe.ram.at(status, 1)[0] = 0xFF
        try:  # the call the back-end makes when a ring starts (a completion lost with an
            os.eventfd_read(fe.queues[0].call)  # old call fd would be seen then)
        except BlockingIOError:
            pass
        for head_flags in (USED, AVAIL | USED):
            DESC.pack_into(ring.desc, 16, data, 20, 9, AVAIL | WRITE | NEXT)
            DESC.pack_into(ring.desc, 32, status, 1, 9, AVAIL | WRITE)
            DESC.pack_into(ring.desc, 0, hdr, 16, 9, head_flags | NEXT)
            os.eventfd_write(fe.queues[0].kick, 1)
            # no call, nothing written (the driver's own take_used would misread its
            # hand-made "used" descriptor: not used here)
            assert not select.select([fe.queues[0].call], [], [], 0.5)[0]
            assert fe.ram.at(status, 1)[0] == 0xFF
        DESC.pack_into(ring.desc, 0, hdr, 16, 9, AVAIL | NEXT)
        os.eventfd_write(fe.queues[0].kick, 1)
        ring.chains[9] = 3  # the driver ring's bookkeeping, for take_used
        assert fe.wait_used(0) == [(9, 21)]
        assert fe.ram.at(status, 1)[0] == OK
    assert "queue 0: stopped" not in d.log()
