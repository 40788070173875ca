"""Kicks for a back-end when nothing raises them: in poll mode (an appliance VM without
interrupts, or `--poll`) the device tells nobody that the consumer added buffers, so the
bridge watches each started vring's avail index in the window and, when it moves, kicks
the back-end as the consumer's driver would: unless the back-end asked not to be (the used
ring's NO_NOTIFY flag, or with EVENT_IDX its avail_event), which spares a busy back-end
a wake-up per request. A missed kick would stall it, so the first look always kicks."""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

from ..protocol.payloads import MemRegion

log = logging.getLogger(__name__)

_U16 = struct.Struct("<H")
AVAIL_IDX = 2  # le16 idx after le16 flags
USED_RING, USED_ELEM = 4, 8  # the used ring's elements after flags and idx; avail_event after
USED_F_NO_NOTIFY = 1
RING_F_EVENT_IDX, F_RING_PACKED = 29, 34


@dataclass
class Mapped:
    """One region of the consumer's memory table, mapped from the window."""

    region: MemRegion
    view: memoryview


class RingWatch:
    """The consumer's memory as the front-end's addresses see it, and the avail indexes
    of the vrings being watched."""

    def __init__(self) -> None:
        self.regions: list[Mapped] = []
        self.avail: dict[int, int] = {}  # vring -> avail ring's front-end address
        self.used: dict[int, int] = {}  # vring -> used ring's front-end address
        self.num: dict[int, int] = {}  # vring -> its size
        self.event_idx = False
        self.kicks: dict[int, int] = {}  # vring -> our end of the back-end's kick eventfd
        self._seen: dict[int, int | None] = {}
        # vring -> (view, offset) of its avail idx and of the back-end's word: avail_event
        # (EVENT_IDX) or the used ring's flags; None where the address is in no region
        self._at: dict[int, tuple[memoryview, int, memoryview, int] | None] = {}

    def set_table(self, regions: list[Mapped]) -> None:
        self.regions = regions
        self._at.clear()

    def add(self, region: Mapped) -> None:
        self.regions.append(region)
        self._at.clear()

    def remove(self, region: MemRegion) -> None:
        self.regions = [m for m in self.regions
                        if (m.region.guest_addr, m.region.size)
                        != (region.guest_addr, region.size)]
        self._at.clear()

    def set_addr(self, vring: int, avail: int, used: int) -> None:
        self.avail[vring], self.used[vring] = avail, used
        self._at.pop(vring, None)

    def set_num(self, vring: int, num: int) -> None:
        self.num[vring] = num
        self._at.pop(vring, None)

    def set_features(self, features: int) -> None:
        self.event_idx = bool(features & (1 << RING_F_EVENT_IDX))
        if features & (1 << F_RING_PACKED):  # the bridge masks it from the features
            log.error("the consumer negotiated packed rings: the watcher reads split "
                      "rings only, its back-end will get no kicks")
        self._at.clear()

    def watch(self, vring: int, kick: int) -> None:
        """Signal eventfd `kick` (ours: the watch closes it) when vring's avail idx moves."""
        self.unwatch(vring)
        self.kicks[vring] = kick
        self._seen[vring] = None

    def unwatch(self, vring: int) -> None:
        fd = self.kicks.pop(vring, None)
        if fd is not None:
            os.close(fd)
        self._seen.pop(vring, None)

    def look(self) -> bool:
        """Kick every watched vring whose avail idx moved, unless its back-end asked not
        to be; whether any moved."""
        moved = False
        unpack = _U16.unpack_from
        for vring, fd in self.kicks.items():
            if vring not in self._at:
                self._at[vring] = self._locate(vring)
            at = self._at[vring]
            if at is None:
                continue
            view, off, wview, woff = at
            idx = unpack(view, off)[0]
            old = self._seen[vring]
            if idx == old:
                continue
            self._seen[vring] = idx
            moved = True
            word = unpack(wview, woff)[0]
            if old is None:
                kick = True
            elif self.event_idx:  # vring_need_event(avail_event, new, old)
                kick = (idx - word - 1) & 0xFFFF < (idx - old) & 0xFFFF
            else:
                kick = not word & USED_F_NO_NOTIFY
            if kick:
                try:
                    os.eventfd_write(fd, 1)
                except BlockingIOError:
                    pass  # the back-end holds the counter full: a kick is pending
        return moved

    def _locate(self, vring: int) -> tuple[memoryview, int, memoryview, int] | None:
        avail, used, num = self.avail.get(vring), self.used.get(vring), self.num.get(vring)
        if avail is None or used is None or num is None:
            log.warning("vring %d: no address or size yet; it is not watched", vring)
            return None
        idx = self._find(avail + AVAIL_IDX)
        word = self._find(used + USED_RING + USED_ELEM * num if self.event_idx else used)
        if idx is None or word is None:
            log.warning("vring %d: its rings (avail %#x, used %#x) are in no memory region; "
                        "not watched", vring, avail, used)
            return None
        return (*idx, *word)

    def _find(self, addr: int) -> tuple[memoryview, int] | None:
        """The view and offset of the u16 at front-end address `addr`."""
        for m in self.regions:
            r = m.region
            if r.user_addr <= addr and addr + 2 <= r.user_addr + r.size:
                return m.view, addr - r.user_addr
        return None

    def close(self) -> None:
        for vring in list(self.kicks):
            self.unwatch(vring)
        self.regions = []
        self._at.clear()
