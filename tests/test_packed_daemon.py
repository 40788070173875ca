"""Packed virtqueues through the whole engine: vhost-user-blk served on packed rings to the
Python front-end over a real socket (the Linux guest and DPDK peers are in
test_qemu_packed.py and test_switch_dpdk.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from daemon import BLK_FEATURES, Daemon, blk_session

from vhostuser.frontend.blk import T_IN, T_OUT
from vhostuser.frontend.packed_ring import PackedDriverRing
from vhostuser.protocol import VirtioFeature
from vhostuser.virtq.packed import split_base

PACKED = BLK_FEATURES | VirtioFeature.RING_PACKED
OK = 0


def test_packed_is_offered_and_serves_io(blk_daemon: Callable[..., Daemon],
                                         image: Path) -> None:
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
