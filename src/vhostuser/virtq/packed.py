"""The packed virtqueue, device side (virtio 1.1+ §2.8): read available chains, return used
buffers, decide whether to notify. Every guest-supplied index and address is checked; a
ring that breaks the rules raises RingError and the queue stops.

Layout: one descriptor ring (16 B entries {addr u64, len u32, id u16, flags u16}, aligned
16) that both sides write, and two event suppression structures {off_wrap u16, flags u16}
(aligned 4): the driver's (in vhost-user's avail address) says when it wants interrupts,
the device's (the used address) when the device wants kicks. Any size up to 2^15.

A descriptor is available when its AVAIL bit equals the driver's wrap counter and its USED
bit does not. A chain is consecutive descriptors linked by NEXT; its buffer id is in its
last descriptor. The device returns a chain by writing one used descriptor (id, length
written, AVAIL = USED = its own wrap counter) at its next used position, and skips as many
positions as the chain took. Both wrap counters start at 1 and flip at each pass.

Visibility: a batch's used descriptors are written whole, the flags of all but the first
too; `publish` stores the first one's flags, and a driver, which reads used descriptors in
ring order, sees the batch at once (x86 keeps stores in order). The compiled kernels store
theirs so too before they return (ring_jit.done), each in one 8-byte store.
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
    from .dirtylog import DirtyLog

DESC_F_AVAIL = 1 << 7
DESC_F_USED = 1 << 15
EVENT_ENABLE = 0
EVENT_DISABLE = 1
EVENT_DESC = 2  # notify at a given descriptor position (EVENT_IDX only)
MAX_SIZE = 1 << 15

_DESC = struct.Struct("<QIHH")
_USED = struct.Struct("<IH")  # len, id: at offset 8 of a descriptor
_AVAIL_BITS = DESC_F_AVAIL | DESC_F_USED


def split_base(base: int) -> tuple[int, int, int, int]:
    """GET/SET_VRING_BASE's word for a packed ring: (next avail, driver wrap, next used,
    device wrap). A front-end that sends only the low half (DPDK) means used = avail."""
    avail, used = base & 0xFFFF, base >> 16 & 0xFFFF
    if not used:
        used = avail
    return avail & 0x7FFF, avail >> 15, used & 0x7FFF, used >> 15


def join_base(avail: int, avail_wrap: int, used: int, used_wrap: int) -> int:
    return avail | avail_wrap << 15 | (used | used_wrap << 15) << 16


def check_layout(layout: RingLayout) -> None:
    """A packed ring is 1..2^15 descriptors; its areas are aligned."""
    if not 1 <= layout.size <= MAX_SIZE:
        raise RingError(f"packed queue size {layout.size} is not in 1..{MAX_SIZE}")
    for name, addr, align in (("descriptor ring", layout.desc, 16),
                              ("driver event area", layout.avail, 4),
                              ("device event area", layout.used, 4)):
        if addr % align:
            raise RingError(f"{name} address {addr:#x} is not {align}-byte aligned")


class PackedQueue(BufferWalk):
    """Device-side state of one packed virtqueue over mapped guest memory."""

    def __init__(self, mem: GuestMemory, layout: RingLayout, base: int, event_idx: bool,
                 indirect: bool = True, log: DirtyLog | None = None,
                 log_used: int | None = None) -> None:
        """`base`: where to start, as SET_VRING_BASE says (`split_base`). `log`: writes
        are logged there (live migration): the buffers of every chain returned, and, if
        `log_used` (the device area's guest-physical address, the ring's VHOST_VRING_F_LOG)
        is given, the descriptor ring and the device area."""
        check_layout(layout)
        size = layout.size
        try:
            self.desc = mem.uva(layout.desc, 16 * size)
            driver = mem.uva(layout.avail, 4)
            device = mem.uva(layout.used, 4)
            desc_gpa = mem.uva_to_gpa(layout.desc)
        except GuestMemoryError as e:
            raise RingError(f"ring outside guest memory: {e}") from e
        avail, avail_wrap, used, used_wrap = split_base(base)
        if avail >= size or used >= size:
            raise RingError(f"ring base {base:#x}: a position past the ring's {size} "
                            "descriptors")
        self._init_walk(mem, size, indirect)
        self.event_idx = event_idx
        self.desc16 = U16Array(self.desc)  # descriptor i: id at 8 i + 6, flags at 8 i + 7
        self.driver16 = U16Array(driver)  # off_wrap, flags
        self.device16 = U16Array(device)
        self.next_avail, self.avail_wrap = avail, avail_wrap
        self.next_used, self.used_wrap = used, used_wrap
        # chains seen available past next_avail and not taken yet: how many, how many
        # descriptors they take, where the next unseen one starts
        self._ready = 0
        self._ready_descs = 0
        self._taken: list[int] = []  # descriptors of the chains taken lately (for unpop)
        self._first: tuple[int, int] | None = None  # a batch's first used flags, unstored
        self._signalled: int | None = None  # used position at the last notify decision
        self.log = log
        self.log_used = log_used
        self._log_desc = desc_gpa if log is not None and log_used is not None else None
        # the compiled walk (kernel_walk.py) where it is on; never while writes are logged
        self._kernel = KernelWalk.for_queue(self) if log is None else None

    @property
    def kernel(self) -> KernelWalk | None:
        """The compiled walk's arrays, where it serves this queue."""
        return self._kernel

    def cursors(self) -> tuple[int, int]:
        """Where a compiled kernel walks from and returns chains at (ring_jit.py): each
        position with its wrap counter (bit 15)."""
        return self.next_avail | self.avail_wrap << 15, self.next_used | self.used_wrap << 15

    def kernel_served(self, k: int) -> None:
        """A compiled kernel took `k` chains from the next available ones and returned
        them, their used descriptors stored as it ended (ring_jit.done: each with its
        flags, in one store): both positions move by the descriptors they took, which the
        used cursor it left says."""
        if not k:
            return
        assert self._kernel is not None
        cur = self._kernel.used_cursor()
        pos, wrap = cur & 0x7FFF, cur >> 15
        moved = (self._position(pos, wrap) - self._position(self.next_used, self.used_wrap)
                 ) % (2 * self.size)
        self.next_used, self.used_wrap = pos, wrap
        avail = self.next_avail + moved
        wrap = self.avail_wrap
        while avail >= self.size:
            avail -= self.size
            wrap ^= 1
        self.next_avail, self.avail_wrap = avail, wrap
        self._ready -= k  # (those counted already stay counted)
        self._ready_descs -= moved
        if self._ready <= 0 or self._ready_descs <= 0:
            self._ready = self._ready_descs = 0  # counted afresh

    def has_available(self) -> bool:
        """Whether a chain is available (one look at the next descriptor's flags)."""
        return self._ready > 0 or self._is_avail(self.next_avail, self.avail_wrap)

    # -- available side -------------------------------------------------------------------

    def _is_avail(self, pos: int, wrap: int) -> bool:
        f = self.desc16.load(8 * pos + 7) & _AVAIL_BITS
        return f == (DESC_F_AVAIL if wrap else DESC_F_USED)

    def available(self) -> int:
        """How many chains the driver has made available. Counts on from those seen
        before: each new one is walked once (its flags only) here."""
        size, flags16 = self.size, self.desc16
        descs = self._ready_descs
        pos = self.next_avail + descs
        wrap = self.avail_wrap
        if pos >= size:
            pos, wrap = pos - size, wrap ^ 1
        while descs < size and self._is_avail(pos, wrap):
            n = 1
            while flags16.load(8 * pos + 7) & DESC_F_NEXT:
                if descs + n >= size:
                    raise RingError(f"chain at descriptor {self.next_avail + descs} "
                                    f"is longer than the ring ({size})")
                pos += 1
                if pos == size:
                    pos, wrap = 0, wrap ^ 1
                n += 1
            pos += 1
            if pos == size:
                pos, wrap = 0, wrap ^ 1
            descs += n
            self._ready += 1
        self._ready_descs = descs
        return self._ready

    def pop_batch(self, n: int) -> tuple[list[Chain], RingError | None]:
        """Take `n` available chains; on a broken one, those before it and the error."""
        chains: list[Chain] = self._kernel_chains(n) if self._kernel is not None else []
        try:
            for _ in range(n - len(chains)):
                chains.append(self._read_chain())
        except RingError as e:
            return chains, e
        return chains, None

    def _kernel_chains(self, n: int) -> list[Chain]:
        """Up to `n` chains the compiled walk takes whole (those before the first it
        leaves to `_read_chain`), taken as `_read_chain` takes them."""
        assert self._kernel is not None
        chains = self._kernel.walk(self.cursors()[0], n)
        size = self.size
        pos, wrap = self.next_avail, self.avail_wrap
        for chain in chains:
            chain.token = pos
            pos += chain.ndesc
            if pos >= size:
                pos, wrap = pos - size, wrap ^ 1
            self._taken.append(chain.ndesc)
            if self._ready:
                self._ready -= 1
                self._ready_descs -= chain.ndesc
        self.next_avail, self.avail_wrap = pos, wrap
        if len(self._taken) > 2 * size:
            del self._taken[: len(self._taken) - size]
        if self._ready_descs < 0 or (self._ready == 0) != (self._ready_descs == 0):
            self._ready = self._ready_descs = 0  # the driver rewrote what was counted
        return chains

    def unpop(self, n: int = 1) -> None:
        """Give the `n` chains taken last back to the ring, unused."""
        for _ in range(n):
            k = self._taken.pop()
            self.next_avail -= k
            if self.next_avail < 0:
                self.next_avail += self.size
                self.avail_wrap ^= 1
        self._ready = self._ready_descs = 0  # counted afresh

    def _read_chain(self) -> Chain:
        """Walk and check the chain at next_avail; its buffers become views of guest
        memory. It must (still) be available: a driver that takes one back breaks the
        rules."""
        size = self.size
        start = pos = self.next_avail
        wrap = self.avail_wrap
        if not self._is_avail(pos, wrap):
            raise RingError(f"descriptor {pos} is not available (any more)")
        unpack, desc = _DESC.unpack_from, self.desc
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        at: list[tuple[int, int]] | None = [] if self.log is not None else None
        n = 0
        while True:
            addr, length, bid, flags = unpack(desc, pos << 4)
            n += 1
            pos += 1
            if pos == size:
                pos, wrap = 0, wrap ^ 1
            self._add(bid, addr, length, flags, readable, writable, at)
            if not flags & DESC_F_NEXT:
                break
            if n >= size:
                raise RingError(f"chain {bid}: longer than the ring ({size})")
        self.next_avail, self.avail_wrap = pos, wrap
        self._taken.append(n)
        if len(self._taken) > 2 * size:
            del self._taken[:size]
        if self._ready:
            self._ready -= 1
            self._ready_descs -= n
            if self._ready_descs < 0 or (self._ready == 0) != (self._ready_descs == 0):
                self._ready = self._ready_descs = 0  # the driver rewrote what was counted
        chain = Chain(bid, readable, writable, at, n)
        chain.token = start
        return chain

    def _add(self, bid: int, addr: int, length: int, flags: int, readable: list[memoryview],
             writable: list[memoryview], at: list[tuple[int, int]] | None) -> None:
        """One descriptor's buffer (or an indirect table's) onto the chain's lists."""
        if flags & DESC_F_INDIRECT:
            self._walk_indirect(bid, addr, length, flags, readable, writable, at)
            return
        if length:
            lo, hi, view = self._hit
            if lo <= addr and addr + length <= hi:
                bufs = [view[addr - lo : addr + length - lo]]
            else:
                bufs = self._translate(bid, addr, length)
            if flags & DESC_F_WRITE:
                writable += bufs
                if at is not None:
                    at.append((addr, length))
                return
            if not writable:
                readable += bufs
                return
        elif flags & DESC_F_WRITE or not writable:
            return
        raise RingError(f"chain {bid}: readable descriptor after a writable one")

    def rebuild(self, bid: int, descs: list[tuple[int, int, int]]) -> Chain:
        """A chain from copies of its descriptors (addr, len, flags), as the in-flight
        area keeps them; checked as if read from the ring."""
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        at: list[tuple[int, int]] | None = [] if self.log is not None else None
        for addr, length, flags in descs:
            self._add(bid, addr, length, flags, readable, writable, at)
        return Chain(bid, readable, writable, at, len(descs))

    def _walk_indirect(self, bid: int, addr: int, length: int, flags: int,
                       readable: list[memoryview], writable: list[memoryview],
                       at: list[tuple[int, int]] | None) -> None:
        """The buffers of an indirect table: all its entries in order (NEXT is ignored in
        a packed table; INDIRECT inside one is an error)."""
        table = self._indirect_table(bid, addr, length, flags, False)
        try:
            for off in range(0, len(table), 16):
                a, n, _, f = _DESC.unpack_from(table, off)
                if f & DESC_F_INDIRECT:
                    raise RingError(f"chain {bid}: nested indirect table")
                if f & DESC_F_WRITE:
                    if n:
                        writable += self._translate(bid, a, n)
                        if at is not None:
                            at.append((a, n))
                elif writable:
                    raise RingError(f"chain {bid}: readable descriptor after a writable one")
                elif n:
                    readable += self._translate(bid, a, n)
        finally:
            table.release()

    def descriptor(self, pos: int) -> tuple[int, int, int, int]:
        """Ring descriptor `pos`: addr, len, id, flags."""
        addr, length, bid, flags = _DESC.unpack_from(self.desc, pos << 4)
        return addr, length, bid, flags

    def available_at(self, pos: int, wrap: int) -> bool:
        """Whether descriptor `pos` is available on a pass with driver wrap counter `wrap`."""
        return self._is_avail(pos, wrap)

    def resume(self, avail: int, avail_wrap: int, used: int, used_wrap: int) -> None:
        """Move to these positions (in-flight recovery: the area knows better than the
        front-end's base)."""
        self.next_avail, self.avail_wrap = avail, avail_wrap
        self.next_used, self.used_wrap = used, used_wrap
        self._ready = self._ready_descs = 0
        self._taken.clear()

    # -- used side ------------------------------------------------------------------------

    def push_batch(self, chains: list[Chain], written: list[int]) -> None:
        """Write the used descriptors of a batch; visible at the next `publish`."""
        size, desc, flags16 = self.size, self.desc, self.desc16
        pack = _USED.pack_into
        pos, wrap = self.next_used, self.used_wrap
        for c, w in zip(chains, written, strict=True):
            pack(desc, 16 * pos + 8, w, c.head)
            flags = (_AVAIL_BITS if wrap else 0) | (DESC_F_WRITE if w else 0)
            if self._first is None:
                self._first = (pos, flags)
            else:
                flags16.store(8 * pos + 7, flags)
            pos += c.ndesc
            if pos >= size:
                pos, wrap = pos - size, wrap ^ 1
        self.next_used, self.used_wrap = pos, wrap

    def push_now(self, chain: Chain, written: int) -> None:
        """Return one chain, visible to the driver at once (the flags store is the last);
        in-flight tracking commits chains one at a time."""
        if self._first is not None:
            pos, flags = self._first
            self._first = None
            self.desc16.store(8 * pos + 7, flags)
        pos, wrap = self.next_used, self.used_wrap
        _USED.pack_into(self.desc, 16 * pos + 8, written, chain.head)
        self.desc16.store(8 * pos + 7, (_AVAIL_BITS if wrap else 0)
                          | (DESC_F_WRITE if written else 0))
        pos += chain.ndesc
        if pos >= self.size:
            pos, wrap = pos - self.size, wrap ^ 1
        self.next_used, self.used_wrap = pos, wrap

    def _position(self, pos: int, wrap: int) -> int:
        """A used position on a line of two passes (what event suppression compares)."""
        return pos if wrap else pos + self.size

    def publish(self) -> bool:
        """Make the pushed descriptors visible and say whether the driver wants a
        notification (its event suppression structure)."""
        if self._first is not None:
            pos, flags = self._first
            self._first = None
            self.desc16.store(8 * pos + 7, flags)
        if self._log_desc is not None:
            self._log_rings()
        full_barrier()
        new = self._position(self.next_used, self.used_wrap)
        old, self._signalled = self._signalled, new
        mode = self.driver16.load(1)
        if mode == EVENT_DISABLE:
            return False
        if mode != EVENT_DESC or not self.event_idx or old is None:
            return True
        off_wrap = self.driver16.load(0)
        event = self._position(off_wrap & 0x7FFF, off_wrap >> 15)
        return need_event(event, new, old, 2 * self.size)

    def _log_rings(self) -> None:
        """While writes are logged: the descriptor ring and the device area were written."""
        assert self.log is not None and self._log_desc is not None
        self.log.mark(self._log_desc, 16 * self.size)
        if self.log_used is not None:
            self.log.mark(self.log_used, 4)

    # -- kick suppression ---------------------------------------------------------------------

    def disable_kicks(self) -> None:
        self.device16.store(1, EVENT_DISABLE)
        if self._log_desc is not None:
            self._log_rings()

    def enable_kicks(self) -> bool:
        """Ask for kicks again; True if more chains arrived meanwhile (process them)."""
        self.device16.store(1, EVENT_ENABLE)
        if self._log_desc is not None:
            self._log_rings()
        full_barrier()
        return self.has_available()

    def base(self) -> int:
        return join_base(self.next_avail, self.avail_wrap, self.next_used, self.used_wrap)

    def release(self) -> None:
        if self._kernel is not None:  # (its numpy views hold exports of the memoryviews)
            self._kernel.release()
        self._kernel = None
        for v in (self.desc16, self.driver16, self.device16):
            v.release()
        self.desc.release()
        self._release_walk()
