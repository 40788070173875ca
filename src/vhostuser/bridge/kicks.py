"""Kicks for a back-end when nothing raises them: in poll mode (an appliance VM without
interrupts, or `--poll`) the device tells nobody that the consumer added buffers, so the
bridge watches each started vring's avail index in the window and signals the back-end's
kick eventfd when it moves. A spurious kick costs the back-end one look at its ring; a
missed one would stall it, so the first look always kicks."""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

from ..protocol.payloads import MemRegion

log = logging.getLogger(__name__)

_U16 = struct.Struct("<H")
AVAIL_IDX = 2  # le16 idx after le16 flags


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
        self.kicks: dict[int, int] = {}  # vring -> our end of the back-end's kick eventfd
        self._seen: dict[int, int | None] = {}
        self._at: dict[int, tuple[memoryview, int] | None] = {}

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

    def set_avail(self, vring: int, addr: int) -> None:
        self.avail[vring] = addr
        self._at.pop(vring, None)

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
        """Kick every watched vring whose avail idx moved; whether any did."""
        moved = False
        for vring, fd in self.kicks.items():
            if vring not in self._at:
                self._at[vring] = self._locate(vring)
            at = self._at[vring]
            if at is None:
                continue
            view, off = at
            idx = _U16.unpack_from(view, off)[0]
            if idx != self._seen[vring]:
                self._seen[vring] = idx
                os.eventfd_write(fd, 1)
                moved = True
        return moved

    def _locate(self, vring: int) -> tuple[memoryview, int] | None:
        addr = self.avail.get(vring)
        if addr is None:
            log.warning("vring %d: no address yet; it is not watched", vring)
            return None
        for m in self.regions:
            r = m.region
            if r.user_addr <= addr + AVAIL_IDX and addr + AVAIL_IDX + 2 <= r.user_addr + r.size:
                return m.view, addr + AVAIL_IDX - r.user_addr
        log.warning("vring %d: its avail ring %#x is in no memory region; not watched",
                    vring, addr)
        return None

    def close(self) -> None:
        for vring in list(self.kicks):
            self.unwatch(vring)
        self.regions = []
        self._at.clear()
