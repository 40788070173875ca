"""In-flight tracking for packed rings (vhost-user INFLIGHT_SHMFD; QEMU
docs/interop/vhost-user.rst, "Inflight I/O tracking", packed virtqueues).

A packed ring keeps no record of what the device took: used descriptors overwrite the
ring's slots in completion order, so a chain still in flight may already be gone from it.
The area therefore keeps a copy of every chain taken, and where the used side stood (the
front-end's SET_VRING_BASE after a crash is stale for a packed ring: only the back-end
knew). Queue region (64-byte aligned):

    u64 features; u16 version; u16 desc_num; u16 free_head; u16 old_free_head;
    u16 used_idx; u16 old_used_idx; u8 used_wrap_counter; u8 old_used_wrap_counter;
    u8 pad[10];
    desc_num x { u8 inflight; u8 pad; u16 next; u16 last; u16 num; u64 counter;
                 u16 id; u16 flags; u32 len; u64 addr; }

Entries not holding a chain form a free list through `next` from `free_head`. Taking a
chain: copy its descriptors into entries from the free list, set the head entry's `num`,
`last` and `counter`, then `inflight` = 1, then move the free head. Returning one: give
its entries back to the free list and advance `used_idx` (the uncommitted state), write
the used descriptor into the ring (the driver sees it), clear `inflight`, then commit:
`old_*` = the current values. A crash between leaves `used_idx` ahead of `old_used_idx`:
recovery commits if the flag is clear or the descriptor at the committed position is no
longer available on that pass (the spec's test), else rolls back. Chains are returned one
at a time, so that at most one is uncommitted. No index is read back from the area once
checked: what each chain holds is kept in the back-end's memory.

After a crash the ring resumes at the committed used position; the avail position is that
plus the descriptors of the chains in flight, which are handed out again from their copies,
oldest first. The area is the front-end's memory and as untrusted as the ring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .ring import Chain, RingError

if TYPE_CHECKING:
    from .packed import PackedQueue

QUEUE_HEADER = 32
ENTRY = 32
ALIGN = 64
VERSION = 1

# u16 cells of the header (from byte 8)
_VERSION, _DESC_NUM, _FREE, _OLD_FREE, _USED, _OLD_USED = range(6)
_WRAP, _OLD_WRAP = 20, 21  # bytes
# u16 cells of entry i (16 per entry): next, last, num, id, flags
_NEXT, _LAST, _NUM, _ID, _FLAGS = 1, 2, 3, 8, 9


def queue_region_bytes(queue_size: int) -> int:
    return -(-(QUEUE_HEADER + ENTRY * queue_size) // ALIGN) * ALIGN


class PackedInflight:
    """One packed queue's region of the in-flight area, as the device side keeps it."""

    __slots__ = ("_bytes", "_e16", "_e32", "_e64", "_flags", "_h16", "_held", "_region",
                 "counter", "ring", "size")

    def __init__(self, region: memoryview, ring_size: int) -> None:
        if len(region) < queue_region_bytes(ring_size):
            got = len(region)
            region.release()
            raise RingError(f"in-flight region of {got} bytes is too small for a packed "
                            f"ring of {ring_size}")
        self._region = region
        self.size = ring_size
        self._bytes = region[:QUEUE_HEADER]
        self._h16 = region[8:20].cast("H")
        entries = region[QUEUE_HEADER : QUEUE_HEADER + ENTRY * ring_size]
        self._flags = entries  # byte 32 i: inflight flag of entry i
        self._e16 = entries.cast("H")
        self._e32 = entries.cast("I")  # len of entry i at 8 i + 5
        self._e64 = entries.cast("Q")  # counter at 4 i + 1, addr at 4 i + 3
        self.counter = 0
        self.ring: PackedQueue | None = None
        # head entry -> the entries its chain holds, kept here: the area is the
        # front-end's, and no index is read back from it once checked
        self._held: dict[int, list[int]] = {}

    # -- at start ------------------------------------------------------------------------------

    def recover(self, ring: PackedQueue) -> list[int]:
        """Bring the region in line with `ring` (just created at the front-end's base) and
        return the head entries of the chains to serve again, oldest first; the ring is
        moved to where the area says it stood. A region that contradicts itself raises
        RingError."""
        self.ring = ring
        h, size = self._h16, self.size
        if h[_VERSION] not in (0, VERSION):
            raise RingError(f"in-flight region version {h[_VERSION]}, expected {VERSION}")
        if h[_VERSION] == 0 or h[_DESC_NUM] != size or not self._ours():
            self._fresh(ring)
            return []
        b = self._bytes
        for name, v in (("used", h[_USED]), ("committed used", h[_OLD_USED])):
            if v >= size:
                raise RingError(f"in-flight region: {name} position {v} >= ring size {size}")
        if b[_WRAP] > 1 or b[_OLD_WRAP] > 1:
            raise RingError("in-flight region: a wrap counter other than 0 or 1")
        if (h[_USED], b[_WRAP]) != (h[_OLD_USED], b[_OLD_WRAP]):
            self._finish_return(ring)
        heads = self._chains()
        taken = {i for held in self._held.values() for i in held}
        # the free list is rebuilt from what no chain holds: nothing of it is trusted
        free = [i for i in range(size) if i not in taken]
        e16 = self._e16
        for a, nxt in zip(free, [*free[1:], size]):  # noqa: B905 - the last links to size
            e16[16 * a + _NEXT] = nxt
        h[_FREE] = h[_OLD_FREE] = free[0] if free else size
        used, wrap = h[_OLD_USED], b[_OLD_WRAP]
        avail, avail_wrap = used + len(taken), wrap
        if avail >= size:
            avail, avail_wrap = avail - size, wrap ^ 1
        ring.resume(avail, avail_wrap, used, wrap)
        return heads

    def _ours(self) -> bool:
        """Whether the region says where the ring stands. A front-end keeps the area across
        a back-end's crash (the region is right; the base it sends for a packed ring is
        stale) and drops it when the driver resets the device (QEMU does). A region at the
        start of the ring with nothing in flight says nothing: the base decides then (the
        same place, if it is QEMU's stale one)."""
        h, b = self._h16, self._bytes
        if any(self._flags[: ENTRY * self.size : ENTRY]):
            return True
        return (h[_USED], b[_WRAP]) != (0, 1) or (h[_OLD_USED], b[_OLD_WRAP]) != (0, 1)

    def _fresh(self, ring: PackedQueue) -> None:
        """Start the region afresh at the ring's position. The version is 0 while the
        region is inconsistent: a death meanwhile leaves a fresh one."""
        h, b, e16, size = self._h16, self._bytes, self._e16, self.size
        h[_VERSION] = 0
        self._flags[:] = bytes(len(self._flags))
        for i in range(size):
            e16[16 * i + _NEXT] = i + 1
        h[_DESC_NUM] = size
        h[_FREE] = h[_OLD_FREE] = 0
        h[_USED] = h[_OLD_USED] = ring.next_used
        b[_WRAP] = b[_OLD_WRAP] = ring.used_wrap
        h[_VERSION] = VERSION

    def _finish_return(self, ring: PackedQueue) -> None:
        """A death while a chain was being returned (the uncommitted used position differs
        from the committed one): the chain is at the free head. Its flag already cleared:
        the used descriptor was written, commit. Else the spec's test: the descriptor at the
        committed position is no longer available on that pass (the used one overwrote it,
        or the driver, having seen it, already reused the slot): commit; still available:
        roll back, and the chain is served again."""
        h, b, size = self._h16, self._bytes, self.size
        head = h[_FREE]
        if head >= size:
            raise RingError(f"in-flight region: free head {head} >= ring size {size}")
        if self._flags[ENTRY * head] == 0 or not ring.available_at(h[_OLD_USED],
                                                                   b[_OLD_WRAP]):
            self._flags[ENTRY * head] = 0
            h[_OLD_FREE], h[_OLD_USED], b[_OLD_WRAP] = h[_FREE], h[_USED], b[_WRAP]
        else:
            h[_FREE], h[_USED], b[_WRAP] = h[_OLD_FREE], h[_OLD_USED], b[_OLD_WRAP]

    def _chains(self) -> list[int]:
        """The head entries in flight, oldest first; what each holds goes to `_held`."""
        size, flags, e16, e64 = self.size, self._flags, self._e16, self._e64
        heads = [i for i in range(size) if flags[ENTRY * i]]
        if any(flags[ENTRY * i] != 1 for i in heads):
            raise RingError("in-flight region: a flag other than 0 or 1")
        taken: set[int] = set()
        self._held = {}
        for head in heads:
            num = e16[16 * head + _NUM]
            if not 1 <= num <= size - len(taken):
                raise RingError(f"in-flight region: chain at entry {head} of {num} "
                                "descriptors does not fit the ring")
            held, i = [], head
            for k in range(num):
                if i >= size or i in taken:
                    raise RingError(f"in-flight region: chain at entry {head} runs into "
                                    f"entry {i}")
                taken.add(i)
                held.append(i)
                if k + 1 < num:
                    i = e16[16 * i + _NEXT]
            if e16[16 * head + _LAST] != i:
                raise RingError(f"in-flight region: chain at entry {head} ends at {i}, "
                                f"not at its last entry {e16[16 * head + _LAST]}")
            self._held[head] = held
        heads.sort(key=lambda i: e64[4 * i + 1])
        self.counter = (max((e64[4 * i + 1] for i in heads), default=0) + 1) & (2**64 - 1)
        return heads

    def reread(self, head: int) -> Chain:
        """The chain at head entry `head`, from its copy."""
        assert self.ring is not None
        e16, e32, e64 = self._e16, self._e32, self._e64
        held = self._held[head]
        descs = [(e64[4 * i + 3], e32[8 * i + 5], e16[16 * i + _FLAGS]) for i in held]
        chain = self.ring.rebuild(e16[16 * held[-1] + _ID], descs)
        chain.token = head
        return chain

    # -- running -------------------------------------------------------------------------------

    def take(self, chains: list[Chain]) -> None:
        """The device took `chains` (their `token`: where each starts in the ring; it
        becomes the chain's head entry here)."""
        ring = self.ring
        assert ring is not None
        h, e16, e32, e64, flags, size = (self._h16, self._e16, self._e32, self._e64,
                                         self._flags, self.size)
        for c in chains:
            head = e = h[_FREE]
            held: list[int] = []
            seen: set[int] = set()
            for k in range(c.ndesc):
                if e >= size or e in seen:  # the front-end wrote into the area meanwhile
                    raise RingError("in-flight region: the free list is broken")
                seen.add(e)
                addr, length, bid, f = ring.descriptor((c.token + k) % size)
                e64[4 * e + 3], e32[8 * e + 5] = addr, length
                e16[16 * e + _ID], e16[16 * e + _FLAGS] = bid, f
                held.append(e)
                e = e16[16 * e + _NEXT]
            last = held[-1]
            e16[16 * head + _NUM], e16[16 * head + _LAST] = c.ndesc, last
            e64[4 * head + 1] = self.counter
            self.counter = (self.counter + 1) & (2**64 - 1)
            flags[ENTRY * head] = 1
            h[_FREE] = h[_OLD_FREE] = e
            self._held[head] = held
            c.token = head

    def untake(self, chains: list[Chain]) -> None:
        """Chains given back to the ring unused (the last taken, newest last)."""
        h, e16, flags = self._h16, self._e16, self._flags
        for c in reversed(chains):
            head = c.token
            flags[ENTRY * head] = 0
            e16[16 * self._held.pop(head)[-1] + _NEXT] = h[_FREE]
            h[_FREE] = h[_OLD_FREE] = head

    def push(self, chains: list[Chain], written: list[int]) -> None:
        """Return `chains` to the driver one by one, each committed in the region."""
        ring = self.ring
        assert ring is not None
        h, b, e16, flags, size = self._h16, self._bytes, self._e16, self._flags, self.size
        for c, w in zip(chains, written, strict=True):
            head = c.token
            e16[16 * self._held.pop(head)[-1] + _NEXT] = h[_FREE]
            h[_FREE] = head
            used, wrap = ring.next_used + c.ndesc, ring.used_wrap
            if used >= size:
                used, wrap = used - size, wrap ^ 1
            h[_USED], b[_WRAP] = used, wrap
            ring.push_now(c, w)
            flags[ENTRY * head] = 0
            h[_OLD_FREE], h[_OLD_USED], b[_OLD_WRAP] = head, used, wrap

    def published(self) -> None:
        """Nothing to do: each chain was committed as it was returned."""

    def release(self) -> None:
        self.ring = None
        for v in (self._e64, self._e32, self._e16, self._flags, self._h16, self._bytes,
                  self._region):
            v.release()

