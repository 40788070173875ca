"""Guest memory: the front-end's regions mapped into this process, and address translation.

Ring addresses arrive as front-end virtual addresses (translated through `user_addr`);
descriptor addresses are guest-physical (through `guest_addr`). Anything outside every
region raises GuestMemoryError: the guest is untrusted, so a bad address is its error,
never an access outside guest memory.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

from .protocol.payloads import MemRegion

# Anything exposing the buffer protocol (collections.abc.Buffer is Python 3.12+).
Buffer = mmap.mmap | bytearray | memoryview


class GuestMemoryError(Exception):
    """An address or length the guest supplied is outside its memory."""


class MemoryTableError(Exception):
    """A memory table the front-end supplied is unusable (overlap, bad fd, too many slots)."""


@dataclass
class MappedRegion:
    desc: MemRegion
    mapping: Buffer  # owns the mapping (an mmap here; a BAR window for virtio-vhost-user)
    view: memoryview = field(init=False)  # guest bytes [guest_addr, guest_addr + size)

    def __post_init__(self) -> None:
        whole = memoryview(self.mapping).cast("B")
        skip = len(whole) - self.desc.size
        self.view = whole[skip:]
        whole.release()

    @property
    def gpa_end(self) -> int:
        return self.desc.guest_addr + self.desc.size

    @property
    def uva_end(self) -> int:
        return self.desc.user_addr + self.desc.size

    def close(self) -> None:
        self.view.release()
        close = getattr(self.mapping, "close", None)
        if close is not None:
            try:
                close()
            except BufferError:
                # A view of this memory is still alive somewhere: the mapping stays until
                # that view goes (never a dangling pointer), then the GC unmaps it.
                pass


# Maps a region given its descriptor and fd (None when the transport has no fds) to a
# buffer whose last `desc.size` bytes are the region's guest memory.
RegionMapper = Callable[[MemRegion, "int | None"], Buffer]


def mmap_region(desc: MemRegion, fd: int | None) -> mmap.mmap:
    """The AF_UNIX mapper: map `size` bytes of `fd` at `mmap_offset`, shared, read-write."""
    if fd is None:
        raise MemoryTableError("memory region without a file descriptor")
    # mmap offsets must be page-aligned (hugepage-aligned on hugetlbfs): map from the
    # aligned offset below and let MappedRegion skip the remainder.
    seal_against_shrinking(fd)  # before the size check: it cannot shrink after it
    try:
        page = max(os.fstatvfs(fd).f_bsize, mmap.ALLOCATIONGRANULARITY)
        st = os.fstat(fd)
    except OSError as e:
        raise MemoryTableError(f"region fd {fd} is unusable: {e}") from e
    # Pages past the end of a file raise SIGBUS when touched: refuse them up front.
    if stat.S_ISREG(st.st_mode) and desc.mmap_offset + desc.size > st.st_size:
        raise MemoryTableError(f"region {desc} runs past the end of its file "
                               f"({st.st_size} bytes)")
    base = desc.mmap_offset - desc.mmap_offset % page
    try:
        return mmap.mmap(fd, desc.mmap_offset - base + desc.size, mmap.MAP_SHARED,
                         mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
    except (OSError, ValueError, OverflowError) as e:
        raise MemoryTableError(f"cannot map region {desc}: {e}") from e


def seal_against_shrinking(fd: int) -> None:
    """A front-end that shrinks a memory file after we mapped it makes our next access
    SIGBUS. QEMU's memfds come sealed (memory-backend-memfd seal=on); a memfd that still
    takes seals gets F_SEAL_SHRINK here. Other files (hugetlbfs, tmpfs, a window file) take
    no seals: the front-end that owns them is trusted not to truncate them (docs/design.md,
    trust model)."""
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:
        pass  # not a memfd, or sealed already (F_SEAL_SEAL)


class GuestMemory:
    """The current set of mapped regions, kept sorted by guest-physical address."""

    def __init__(self, max_slots: int = 509) -> None:
        self.max_slots = max_slots
        self.regions: list[MappedRegion] = []
        self._gpa_starts: list[int] = []

    def __len__(self) -> int:
        return len(self.regions)

    def add(self, desc: MemRegion, mapping: Buffer) -> None:
        if desc.size == 0:
            raise MemoryTableError("memory region of size 0")
        if len(self.regions) >= self.max_slots:
            raise MemoryTableError(f"no free memory slot (limit {self.max_slots})")
        if desc.guest_addr + desc.size > 1 << 64 or desc.user_addr + desc.size > 1 << 64:
            raise MemoryTableError(f"region wraps the address space: {desc}")
        for r in self.regions:
            d = r.desc
            if desc.guest_addr < r.gpa_end and d.guest_addr < desc.guest_addr + desc.size:
                raise MemoryTableError(f"region {desc} overlaps {d} in guest-physical space")
            if desc.user_addr < r.uva_end and d.user_addr < desc.user_addr + desc.size:
                raise MemoryTableError(f"region {desc} overlaps {d} in front-end address space")
        region = MappedRegion(desc, mapping)
        if len(region.view) != desc.size:
            region.close()
            raise MemoryTableError(f"mapping of {desc} is too short")
        self.regions.append(region)
        self._reindex()

    def remove(self, desc: MemRegion) -> None:
        """REM_MEM_REG: match on guest address, user address and size."""
        for i, r in enumerate(self.regions):
            d = r.desc
            if (d.guest_addr, d.user_addr, d.size) == (desc.guest_addr, desc.user_addr, desc.size):
                del self.regions[i]
                self._reindex()
                r.close()
                return
        raise MemoryTableError(f"no such region to remove: {desc}")

    def clear(self) -> None:
        regions, self.regions = self.regions, []
        self._reindex()
        for r in regions:
            r.close()

    def _reindex(self) -> None:
        self.regions.sort(key=lambda r: r.desc.guest_addr)
        self._gpa_starts = [r.desc.guest_addr for r in self.regions]

    # -- translation -------------------------------------------------------------------------

    def gpa(self, addr: int, length: int) -> memoryview:
        """Guest-physical [addr, addr+length) as one view; it must lie inside one region."""
        i = bisect_right(self._gpa_starts, addr) - 1
        if i >= 0:
            r = self.regions[i]
            off = addr - r.desc.guest_addr
            if off + length <= r.desc.size:
                return r.view[off : off + length]
        raise GuestMemoryError(f"guest-physical range {addr:#x}+{length:#x} is not mapped")

    def gpa_iov(self, addr: int, length: int) -> list[memoryview]:
        """Guest-physical [addr, addr+length) as views, split where regions adjoin."""
        out: list[memoryview] = []
        while True:
            i = bisect_right(self._gpa_starts, addr) - 1
            if i < 0:
                break
            r = self.regions[i]
            off = addr - r.desc.guest_addr
            if off >= r.desc.size:
                break
            n = min(length, r.desc.size - off)
            out.append(r.view[off : off + n])
            length -= n
            if length == 0:
                return out
            addr += n
        raise GuestMemoryError(f"guest-physical range {addr:#x}+{length:#x} is not mapped")

    def uva(self, addr: int, length: int) -> memoryview:
        """Front-end virtual [addr, addr+length) (ring addresses) as one view."""
        for r in self.regions:
            off = addr - r.desc.user_addr
            if off >= 0 and off + length <= r.desc.size:
                return r.view[off : off + length]
        raise GuestMemoryError(f"front-end address range {addr:#x}+{length:#x} is not mapped")

    def uva_to_gpa(self, addr: int) -> int:
        for r in self.regions:
            off = addr - r.desc.user_addr
            if 0 <= off < r.desc.size:
                return r.desc.guest_addr + off
        raise GuestMemoryError(f"front-end address {addr:#x} is not mapped")
