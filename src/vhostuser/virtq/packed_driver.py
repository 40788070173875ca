"""The packed virtqueue, driver side: what a guest driver does (virtio 1.1+ §2.8), with
the same calls as the split ring's `DriverRing`."""

from __future__ import annotations

import struct

from .atomic import U16Array, full_barrier
from .guest_ram import GuestRam
from .packed import (
    DESC_F_AVAIL,
    DESC_F_USED,
    EVENT_DESC,
    EVENT_DISABLE,
    EVENT_ENABLE,
    join_base,
    split_base,
)
from .ring import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, RingLayout, need_event

_DESC = struct.Struct("<QIHH")
_USED = struct.Struct("<IH")  # len, id at offset 8
FRESH_BASE = join_base(0, 1, 0, 1)  # both wrap counters start at 1


class PackedDriverRing:
    """A packed ring as the guest driver sees it: buffer ids 0..size-1, descriptors taken
    in ring order."""

    def __init__(self, ram: GuestRam, size: int, event_idx: bool = False) -> None:
        self.ram = ram
        self.size = size
        self.event_idx = event_idx
        self.desc_gpa = ram.alloc(16 * size, 16)
        self.driver_gpa = ram.alloc(4, 4)  # the driver's event suppression
        self.device_gpa = ram.alloc(4, 4)  # the device's
        self.desc = ram.at(self.desc_gpa, 16 * size)
        self.desc16 = U16Array(self.desc)
        self.driver16 = U16Array(ram.at(self.driver_gpa, 4))
        self.device16 = U16Array(ram.at(self.device_gpa, 4))
        self.free_ids = list(range(size - 1, -1, -1))
        self.free_descs = size
        self.chains: dict[int, int] = {}  # buffer id -> descriptors it takes
        self.start_at(FRESH_BASE)

    def start_at(self, base: int) -> None:
        """Positions as SET_VRING_BASE carries them (nothing in flight)."""
        self.next_avail, self.avail_wrap, self.next_used, self.used_wrap = split_base(base)
        self.kicked_at = self._line(self.next_avail, self.avail_wrap)

    def base(self) -> int:
        return join_base(self.next_avail, self.avail_wrap, self.next_used, self.used_wrap)

    def layout(self) -> RingLayout:
        uva = self.ram.uva
        return RingLayout(self.size, uva(self.desc_gpa), uva(self.driver_gpa),
                          uva(self.device_gpa))

    def _line(self, pos: int, wrap: int) -> int:
        return pos if wrap else pos + self.size

    # -- submitting --------------------------------------------------------------------------

    def add(self, bufs: list[tuple[int, int, bool]], indirect: bool = False) -> int:
        """Make a chain of (gpa, len, device_writable) buffers available; returns its
        buffer id."""
        if indirect:
            table = self.ram.alloc(16 * len(bufs), 16)
            view = self.ram.at(table, 16 * len(bufs))
            for i, (addr, n, wr) in enumerate(bufs):
                _DESC.pack_into(view, 16 * i, addr, n, 0, DESC_F_WRITE if wr else 0)
            ring_bufs = [(table, 16 * len(bufs), DESC_F_INDIRECT)]
        else:
            ring_bufs = [(a, n, DESC_F_WRITE if wr else 0) for a, n, wr in bufs]
        if len(ring_bufs) > self.free_descs or not self.free_ids:
            raise RuntimeError("ring full")
        bid = self.free_ids.pop()
        self.free_descs -= len(ring_bufs)
        self.chains[bid] = len(ring_bufs)
        head = (self.next_avail, self.avail_wrap)
        head_flags = 0
        for k, (addr, n, flags) in enumerate(ring_bufs):
            if k + 1 < len(ring_bufs):
                flags |= DESC_F_NEXT
            flags |= DESC_F_AVAIL if self.avail_wrap else DESC_F_USED
            if k == 0:  # the head's flags last (0 is never available): they make the
                # whole chain available
                _DESC.pack_into(self.desc, 16 * self.next_avail, addr, n, bid, 0)
                head_flags = flags
            else:
                _DESC.pack_into(self.desc, 16 * self.next_avail, addr, n, bid, flags)
            self.next_avail += 1
            if self.next_avail == self.size:
                self.next_avail, self.avail_wrap = 0, self.avail_wrap ^ 1
        self.desc16.store(8 * head[0] + 7, head_flags)
        return bid

    def needs_kick(self) -> bool:
        full_barrier()
        old, new = self.kicked_at, self._line(self.next_avail, self.avail_wrap)
        self.kicked_at = new
        mode = self.device16.load(1)
        if mode == EVENT_DISABLE:
            return False
        if mode != EVENT_DESC or not self.event_idx:
            return True
        off_wrap = self.device16.load(0)
        event = self._line(off_wrap & 0x7FFF, off_wrap >> 15)
        return need_event(event, new, old, 2 * self.size)

    # -- completions -------------------------------------------------------------------------

    def _used_here(self) -> bool:
        f = self.desc16.load(8 * self.next_used + 7) & (DESC_F_AVAIL | DESC_F_USED)
        return f == ((DESC_F_AVAIL | DESC_F_USED) if self.used_wrap else 0)

    def take_used(self) -> list[tuple[int, int]]:
        """Completed (buffer id, written) pairs since the last call."""
        out = []
        while True:
            while self._used_here():
                written, bid = _USED.unpack_from(self.desc, 16 * self.next_used + 8)
                n = self.chains.pop(bid)
                self.free_ids.append(bid)
                self.free_descs += n
                out.append((bid, written))
                self.next_used += n
                if self.next_used >= self.size:
                    self.next_used, self.used_wrap = self.next_used - self.size, self.used_wrap ^ 1
            if not self.event_idx:
                return out
            # ask for a call at the next completion, then look again
            self.driver16.store(0, self.next_used | self.used_wrap << 15)
            self.driver16.store(1, EVENT_DESC)
            full_barrier()
            if not self._used_here():
                return out

    def set_interrupts(self, on: bool) -> None:
        self.driver16.store(1, EVENT_ENABLE if on else EVENT_DISABLE)

    def release(self) -> None:
        for v in (self.desc16, self.driver16, self.device16):
            v.release()
        self.desc.release()
