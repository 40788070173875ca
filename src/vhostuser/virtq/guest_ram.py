"""Guest RAM for a driver side: a memfd with a bump allocator (what a VMM's guest memory
is to our front-end, the vvu transport's rings and the tests)."""

from __future__ import annotations

import mmap
import os

from ..protocol.payloads import MemRegion


class GuestRam:
    """A memfd standing in for guest RAM, with a bump allocator."""

    def __init__(self, size: int, guest_addr: int = 0, user_addr: int = 0x7F00_0000_0000) -> None:
        fd = os.memfd_create("vhostuser-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self._adopt(mmap.mmap(fd, size, mmap.MAP_SHARED), fd, guest_addr, user_addr)

    def _adopt(self, mapping: mmap.mmap, fd: int, guest_addr: int,
               user_addr: int = 0x7F00_0000_0000) -> None:
        """Serve allocations from `mapping` (of file `fd`, -1 for none) at `guest_addr`."""
        self.fd = fd
        self.size = len(mapping)
        self.guest_addr = guest_addr
        self.user_addr = user_addr
        self.map = mapping
        self.view = memoryview(mapping)
        self._next = 0x1000

    def region(self) -> MemRegion:
        return MemRegion(self.guest_addr, self.size, self.user_addr, 0)

    def alloc(self, n: int, align: int = 16) -> int:
        """Reserve n bytes; returns the guest-physical address."""
        off = (self._next + align - 1) // align * align
        if off + n > self.size:
            raise MemoryError(f"guest RAM exhausted ({n} bytes wanted)")
        self._next = off + n
        return self.guest_addr + off

    def at(self, gpa: int, n: int) -> memoryview:
        off = gpa - self.guest_addr
        return self.view[off : off + n]

    def uva(self, gpa: int) -> int:
        return self.user_addr + gpa - self.guest_addr

    def close(self) -> None:
        self.view.release()
        self.map.close()
        if self.fd >= 0:
            os.close(self.fd)
