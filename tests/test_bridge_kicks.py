"""The bridge's poll-mode kicks (bridge/kicks.py): it stands in for the consumer's driver,
so it kicks the back-end when the avail index moves, by the virtio spec's rules for a
driver: not while the back-end sets VRING_USED_F_NO_NOTIFY, and with EVENT_IDX only when
the new entries cross the avail_event the back-end published (2.7.10 / 2.7.7.2)."""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Iterator

import pytest

from vhostuser.bridge.kicks import Mapped, RingWatch
from vhostuser.protocol.payloads import MemRegion

USER = 0x7F00_0000_0000  # the consumer's VMM address of the region
AVAIL, USED, NUM = 0x1000, 0x2000, 8


@pytest.fixture
def ring() -> Iterator[tuple[RingWatch, bytearray, int]]:
    mem = bytearray(0x4000)
    watch = RingWatch()
    watch.set_table([Mapped(MemRegion(0, len(mem), USER, 0), memoryview(mem))])
    watch.set_num(0, NUM)
    watch.set_addr(0, USER + AVAIL, USER + USED)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    ours = os.dup(kick)
    watch.watch(0, ours)  # the watch closes its fd
    yield watch, mem, kick
    watch.close()
    os.close(kick)


def kicks(fd: int) -> int:
    if not select.select([fd], [], [], 0)[0]:
        return 0
    return os.eventfd_read(fd)


def publish(mem: bytearray, idx: int) -> None:
    struct.pack_into("<H", mem, AVAIL + 2, idx)


def test_the_first_look_kicks_then_each_move(ring: tuple[RingWatch, bytearray, int]) -> None:
    watch, mem, kick = ring
    assert watch.look() and kicks(kick) == 1  # whatever is there: the back-end looks
    assert not watch.look() and kicks(kick) == 0  # nothing moved
    publish(mem, 1)
    assert watch.look() and kicks(kick) == 1


def test_no_notify_flag_is_respected(ring: tuple[RingWatch, bytearray, int]) -> None:
    watch, mem, kick = ring
    watch.look()
    kicks(kick)
    struct.pack_into("<H", mem, USED, 1)  # VRING_USED_F_NO_NOTIFY: the back-end is busy
    publish(mem, 3)
    assert watch.look() and kicks(kick) == 0
    struct.pack_into("<H", mem, USED, 0)
    publish(mem, 4)
    assert watch.look() and kicks(kick) == 1


def test_event_idx(ring: tuple[RingWatch, bytearray, int]) -> None:
    watch, mem, kick = ring
    watch.set_features(1 << 29)  # VIRTIO_RING_F_EVENT_IDX
    avail_event = USED + 4 + 8 * NUM  # after the used ring's NUM elements
    publish(mem, 3)
    watch.look()  # the first look kicks, whatever the event
    kicks(kick)
    struct.pack_into("<H", mem, avail_event, 5)  # "kick me when entry 5 is made available"
    publish(mem, 5)  # entries 3 and 4: not yet
    assert watch.look() and kicks(kick) == 0
    publish(mem, 6)  # entry 5 now
    assert watch.look() and kicks(kick) == 1
    struct.pack_into("<H", mem, avail_event, 0xFFFF)  # across the wrap of the 16-bit index
    publish(mem, 0xFFFE)  # 6 .. 0xFFFD
    assert watch.look() and kicks(kick) == 0
    publish(mem, 2)  # 0xFFFE .. 1, past 0xFFFF
    assert watch.look() and kicks(kick) == 1


def test_a_ring_outside_every_region_is_not_watched(
        ring: tuple[RingWatch, bytearray, int]) -> None:
    watch, _mem, kick = ring
    watch.set_addr(0, USER + 0x10_0000, USER + USED)
    assert not watch.look() and kicks(kick) == 0
