"""The split virtqueue, driver side: what a VMM's guest driver does."""

from __future__ import annotations

import struct

from .atomic import U16Array, full_barrier
from .guest_ram import GuestRam
from .ring import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, RingLayout, need_event
from .split import AVAIL_F_NO_INTERRUPT, USED_F_NO_NOTIFY

_DESC = struct.Struct("<QIHH")
_USED = struct.Struct("<II")


class DriverRing:
    """A split ring as the guest driver sees it."""

    def __init__(self, ram: GuestRam, size: int, event_idx: bool = False) -> None:
        self.ram = ram
        self.size = size
        self.event_idx = event_idx
        self.desc_gpa = ram.alloc(16 * size, 16)
        self.avail_gpa = ram.alloc(6 + 2 * size, 2)
        self.used_gpa = ram.alloc(6 + 8 * size, 4)
        self.desc = ram.at(self.desc_gpa, 16 * size)
        self.avail16 = U16Array(ram.at(self.avail_gpa, 6 + 2 * size))
        self.used = ram.at(self.used_gpa, 6 + 8 * size)
        self.used16 = U16Array(self.used)
        self.free = list(range(size - 1, -1, -1))
        self.chains: dict[int, list[int]] = {}  # head -> descriptor ids in flight
        self.avail_idx = 0
        self.last_used = 0
        self.kicked_at = 0  # avail idx at the last kick decision

    def layout(self) -> RingLayout:
        uva = self.ram.uva
        return RingLayout(self.size, uva(self.desc_gpa), uva(self.avail_gpa), uva(self.used_gpa))

    def start_at(self, base: int) -> None:
        """Indices as SET_VRING_BASE carries them (nothing in flight)."""
        self.avail_idx = self.last_used = self.kicked_at = base
        self.avail16.store(1, base)
        self.used16.store(1, base)

    # -- submitting --------------------------------------------------------------------------

    def add(self, bufs: list[tuple[int, int, bool]], indirect: bool = False) -> int:
        """Make a chain of (gpa, len, device_writable) buffers available; returns its head."""
        if indirect:
            table = self.ram.alloc(16 * len(bufs), 16)
            for i, (addr, n, wr) in enumerate(bufs):
                flags = (DESC_F_WRITE if wr else 0) | (DESC_F_NEXT if i + 1 < len(bufs) else 0)
                _DESC.pack_into(self.ram.at(table, 16 * len(bufs)), 16 * i, addr, n, flags, i + 1)
            bufs_in_ring = [(table, 16 * len(bufs), DESC_F_INDIRECT)]
        else:
            bufs_in_ring = [(a, n, DESC_F_WRITE if wr else 0) for a, n, wr in bufs]
        if len(bufs_in_ring) > len(self.free):
            raise RuntimeError("ring full")
        ids = [self.free.pop() for _ in bufs_in_ring]
        for k, (addr, n, flags) in enumerate(bufs_in_ring):
            nxt = ids[k + 1] if k + 1 < len(ids) else 0
            self.write_desc(ids[k], addr, n, flags | (DESC_F_NEXT if k + 1 < len(ids) else 0), nxt)
        self.chains[ids[0]] = ids
        self.publish(ids[0])
        return ids[0]

    def write_desc(self, i: int, addr: int, n: int, flags: int, nxt: int) -> None:
        _DESC.pack_into(self.desc, 16 * i, addr, n, flags, nxt)

    def publish(self, head: int) -> None:
        """Put `head` in the avail ring and publish the new avail idx."""
        self.avail16.store(2 + self.avail_idx % self.size, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.avail16.store(1, self.avail_idx)

    def needs_kick(self) -> bool:
        full_barrier()
        old, new = self.kicked_at, self.avail_idx
        self.kicked_at = new
        if self.event_idx:
            event = self.used16.load(2 + 4 * self.size)
            return need_event(event, new, old)
        return not self.used16.load(0) & USED_F_NO_NOTIFY

    # -- completions -------------------------------------------------------------------------

    def used_idx(self) -> int:
        return self.used16.load(1)

    def take_used(self) -> list[tuple[int, int]]:
        """Completed (head, written) pairs since the last call. Their descriptors are freed
        at once, so read every buffer before adding new chains (which may reuse the ids)."""
        out = []
        while True:
            end = self.used_idx()
            while self.last_used != end:
                head, written = _USED.unpack_from(self.used, 4 + 8 * (self.last_used % self.size))
                out.append((head, written))
                self.free.extend(self.chains.pop(head, ()))
                self.last_used = (self.last_used + 1) & 0xFFFF
            if not self.event_idx:
                return out
            # ask for a call at the next completion, then look again: one the device
            # published before it could see the new used_event raised no call
            self.avail16.store(2 + self.size, self.last_used)
            full_barrier()
            if self.used_idx() == self.last_used:
                return out

    def release(self) -> None:
        for v in (self.avail16, self.used16):
            v.release()
        self.desc.release()
        self.used.release()

    def set_interrupts(self, on: bool) -> None:
        self.avail16.store(0, 0 if on else AVAIL_F_NO_INTERRUPT)
