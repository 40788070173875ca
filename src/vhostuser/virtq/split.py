"""The split virtqueue, device side: read available chains, return used buffers, decide
whether to notify. Every guest-supplied index and address is checked; a ring that breaks
the rules raises RingError and the queue stops.

Layout (virtio 1.x §2.7): descriptor table (16 B entries, aligned 16), avail ring
(flags, idx, ring[N], used_event; aligned 2), used ring (flags, idx, ring[N]{id, len},
avail_event; aligned 4).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from ..memory import GuestMemory, GuestMemoryError
from .atomic import U16Array, full_barrier
from .kernel_walk import KernelWalk
from .ring import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    Chain,
    RingError,
    RingLayout,
    need_event,
)
from .walk import BufferWalk

if TYPE_CHECKING:
    from .burst import BurstArrays
    from .dirtylog import DirtyLog

AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


def check_layout(layout: RingLayout, max_size: int = 32768) -> None:
    """A split ring's size is a power of 2; its areas are aligned."""
    size = layout.size
    if size == 0 or size > max_size or size & (size - 1):
        raise RingError(f"queue size {size} is not a power of 2 in 1..{max_size}")
    for name, addr, align in (("descriptor table", layout.desc, 16),
                              ("avail ring", layout.avail, 2), ("used ring", layout.used, 4)):
        if addr % align:
            raise RingError(f"{name} address {addr:#x} is not {align}-byte aligned")


class SplitQueue(BufferWalk):
    """Device-side state of one split virtqueue over mapped guest memory."""

    def __init__(self, mem: GuestMemory, layout: RingLayout, last_avail: int,
                 event_idx: bool, indirect: bool = True, log: DirtyLog | None = None,
                 log_used: int | None = None) -> None:
        """`log`: writes are logged there (live migration): the buffers of every chain
        returned, and the used ring at guest-physical `log_used` if given (the ring's
        VHOST_VRING_F_LOG)."""
        check_layout(layout)
        size = layout.size
        try:
            self.desc = mem.uva(layout.desc, 16 * size)
            avail = mem.uva(layout.avail, 6 + 2 * size)
            self.used = mem.uva(layout.used, 6 + 8 * size)
        except GuestMemoryError as e:
            raise RingError(f"ring outside guest memory: {e}") from e
        self._init_walk(mem, size, indirect)
        self.event_idx = event_idx
        self.avail16 = U16Array(avail)
        self.used16 = U16Array(self.used)
        self.avail_ring = avail[4 : 4 + 2 * self.size].cast("H")
        self.last_avail = last_avail & 0xFFFF
        self.used_idx = self.used16.load(1)
        self.signalled_used: int | None = None  # used idx at the last notify decision
        self._used_event_i = 2 + self.size  # u16 index of used_event in the avail ring
        self._avail_event_i = 2 + 4 * self.size  # u16 index of avail_event in the used ring
        self._burst: BurstArrays | None = None  # numpy views for burst.py, made on demand
        self.log = log
        # the compiled walk (kernel_walk.py) where it is on; never while writes are logged
        # (the Python walk records where the writable buffers are)
        self._kernel = KernelWalk.for_queue(self) if log is None else None
        self.log_used = log_used

    @property
    def kernel(self) -> KernelWalk | None:
        """The compiled walk's arrays, where it serves this queue."""
        return self._kernel

    def cursors(self) -> tuple[int, int]:
        """Where a compiled kernel walks from and returns chains at (ring_jit.py)."""
        return self.last_avail, self.used_idx % self.size

    def kernel_served(self, k: int) -> None:
        """A compiled kernel took `k` chains and returned them (published at `publish`)."""
        self.last_avail = (self.last_avail + k) & 0xFFFF
        self.used_idx = (self.used_idx + k) & 0xFFFF

    def burst_arrays(self) -> BurstArrays:
        if self._burst is None:
            from .burst import arrays  # numpy only where bursts are used (the switch)

            self._burst = arrays(self)
        return self._burst

    # -- available side -----------------------------------------------------------------

    def available(self) -> int:
        """How many new chains the driver has made available (read barrier implied:
        x86 does not reorder loads with older loads)."""
        n = (self.avail16.load(1) - self.last_avail) & 0xFFFF
        if n > self.size:
            raise RingError(f"avail idx moved by {n}, more than the queue size {self.size}")
        return n

    def has_available(self) -> bool:
        return self.available() > 0

    def pop(self) -> Chain:
        head = self.avail_ring[self.last_avail % self.size]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return self.read_chain(head)

    def unpop(self, n: int = 1) -> None:
        """Give the `n` chains popped last back to the ring, unused."""
        self.last_avail = (self.last_avail - n) & 0xFFFF

    def base(self) -> int:
        return self.last_avail

    def pop_batch(self, n: int) -> tuple[list[Chain], RingError | None]:
        """Pop `n` available chains; on a broken one, those before it and the error."""
        kernel = self._kernel
        last = self.last_avail
        if kernel is not None:
            chains = kernel.walk(last, n)
            last = (last + len(chains)) & 0xFFFF
            if len(chains) == n:
                self.last_avail = last
                return chains, None
            n -= len(chains)  # the rest, from the chain the kernel left, the Python way
        else:
            chains = []
        ring, size, read = self.avail_ring, self.size, self.read_chain
        try:
            for _ in range(n):
                head = ring[last % size]
                last = (last + 1) & 0xFFFF
                chains.append(read(head))
        except RingError as e:
            return chains, e
        finally:
            self.last_avail = last
        return chains, None

    def read_chain(self, head: int) -> Chain:
        """Walk and check one chain; its buffers become views of guest memory. The common
        case (direct descriptors inside the region hit last) is kept inline."""
        size = self.size
        if head >= size:
            raise RingError(f"available head {head} >= queue size {size}")
        unpack = _DESC.unpack_from
        table, table_len = self.desc, size
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        lo, hi, view = self._hit
        seen = 0
        indirect = False
        at: list[tuple[int, int]] | None = [] if self.log is not None else None
        i = head
        while True:
            if i >= table_len:
                raise RingError(f"chain {head}: next index {i} >= table size {table_len}")
            seen += 1
            if seen > table_len:  # every entry visited once already: a loop
                raise RingError(f"chain {head}: more than {table_len} descriptors (a loop?)")
            addr, length, flags, nxt = unpack(table, i << 4)
            if flags & DESC_F_INDIRECT:
                table = self._indirect_table(head, addr, length, flags, indirect)
                # counted on their own, as QEMU does: Linux fills a table of exactly the
                # queue size (seg_max + header + status) behind one ring descriptor
                table_len, indirect, i, seen = length >> 4, True, 0, 0
                continue
            if length:
                if lo <= addr and addr + length <= hi:
                    bufs = [view[addr - lo : addr + length - lo]]
                else:
                    bufs = self._translate(head, addr, length)
                    lo, hi, view = self._hit
                if flags & DESC_F_WRITE:
                    writable += bufs
                    if at is not None:
                        at.append((addr, length))
                elif writable:
                    raise RingError(f"chain {head}: readable descriptor after a writable one")
                else:
                    readable += bufs
            elif writable and not flags & DESC_F_WRITE:
                raise RingError(f"chain {head}: readable descriptor after a writable one")
            if not flags & DESC_F_NEXT:
                return Chain(head, readable, writable, at)
            i = nxt

    # -- used side ------------------------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Write one used element; it becomes visible at the next `publish`."""
        _USED_ELEM.pack_into(self.used, 4 + 8 * (self.used_idx % self.size), head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def push_batch(self, chains: list[Chain], written: list[int]) -> None:
        """Write the used elements of a batch, one struct call per contiguous run."""
        size, used = self.size, self.used
        start = self.used_idx % size
        flat = [x for pair in zip([c.head for c in chains], written, strict=True) for x in pair]
        first = min(len(chains), size - start)
        struct.pack_into(f"<{2 * first}I", used, 4 + 8 * start, *flat[: 2 * first])
        if first < len(chains):  # wrapped around the end of the ring
            rest = len(chains) - first
            struct.pack_into(f"<{2 * rest}I", used, 4, *flat[2 * first :])
        self.used_idx = (self.used_idx + len(chains)) & 0xFFFF

    def log_used_ring(self) -> None:
        """While writes are logged: the used ring was written."""
        if self.log is not None and self.log_used is not None:
            self.log.mark(self.log_used, 6 + 8 * self.size)

    def publish(self) -> bool:
        """Make pushed elements visible (x86 keeps stores in order, so the elements are
        visible before the index) and say whether the driver wants a notification."""
        self.used16.store(1, self.used_idx)
        if self.log is not None:
            self.log_used_ring()
        full_barrier()
        new = self.used_idx
        if self.event_idx:
            old, self.signalled_used = self.signalled_used, new
            event = self.avail16.load(self._used_event_i)
            return old is None or need_event(event, new, old)
        return not self.avail16.load(0) & AVAIL_F_NO_INTERRUPT

    # -- kick suppression ------------------------------------------------------------------

    def disable_kicks(self) -> None:
        if not self.event_idx:
            self.used16.store(0, USED_F_NO_NOTIFY)
            if self.log is not None:
                self.log_used_ring()

    def enable_kicks(self) -> bool:
        """Ask for kicks again; True if more chains arrived meanwhile (process them)."""
        if self.event_idx:
            self.used16.store(self._avail_event_i, self.last_avail)
        else:
            self.used16.store(0, 0)
        if self.log is not None:
            self.log_used_ring()
        full_barrier()
        return self.available() > 0

    def release(self) -> None:
        """Let go of every view of guest memory this queue holds."""
        self._burst = None  # the numpy views first: they hold exports of the memoryviews
        if self._kernel is not None:
            self._kernel.release()
        self._kernel = None
        self.avail_ring.release()
        self.avail16.release()
        self.used16.release()
        self.desc.release()
        self.used.release()
        self._release_walk()
