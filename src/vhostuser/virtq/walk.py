"""Guest buffers as a device walks a chain, for either ring layout: descriptor addresses
(guest-physical) become views of the mapped regions; an indirect table is checked before
it is read."""

from __future__ import annotations

from ..memory import GuestMemory, GuestMemoryError
from .ring import DESC_F_NEXT, RingError


class BufferWalk:
    """Translation state a ring keeps while it runs. The memory table cannot change under
    a running queue (the engine restarts it), so the regions are snapshotted for the fast
    path; `_hit` is the region the last buffer was in."""

    mem: GuestMemory
    size: int
    indirect: bool
    _regions: tuple[tuple[int, int, memoryview], ...]
    _hit: tuple[int, int, memoryview]

    def _init_walk(self, mem: GuestMemory, size: int, indirect: bool) -> None:
        self.mem = mem
        self.size = size
        self.indirect = indirect
        self._regions = tuple((r.desc.guest_addr, r.gpa_end, r.view) for r in mem.regions)
        self._hit = self._regions[0] if self._regions else (0, 0, memoryview(b""))

    def _translate(self, head: int, addr: int, length: int) -> list[memoryview]:
        """Off the last region: scan the (few) regions, else the general path (which also
        splits a buffer spanning adjoining regions). Remembers the region hit."""
        end = addr + length
        for hit in self._regions:
            lo, hi, view = hit
            if lo <= addr and end <= hi:
                self._hit = hit
                return [view[addr - lo : end - lo]]
        try:
            return self.mem.gpa_iov(addr, length)
        except GuestMemoryError as e:
            raise RingError(f"chain {head}: {e}") from e

    def _indirect_table(self, head: int, addr: int, length: int, flags: int,
                        nested: bool) -> memoryview:
        if not self.indirect:
            raise RingError(f"chain {head}: indirect descriptor not negotiated")
        if nested:
            raise RingError(f"chain {head}: nested indirect table")
        if flags & DESC_F_NEXT:
            raise RingError(f"chain {head}: indirect descriptor with NEXT")
        if length == 0 or length % 16:
            raise RingError(f"chain {head}: indirect table length {length} "
                            "is not a non-zero multiple of 16")
        if length >> 4 > self.size:
            raise RingError(f"chain {head}: indirect table of {length >> 4} entries, "
                            f"more than {self.size} descriptors")
        try:
            return self.mem.gpa(addr, length)
        except GuestMemoryError as e:
            raise RingError(f"chain {head}: indirect table: {e}") from e

    def _release_walk(self) -> None:
        self._regions = ()
        self._hit = (0, 0, memoryview(b""))
