"""In-flight tracking for split rings (vhost-user INFLIGHT_SHMFD; QEMU
docs/interop/vhost-user.rst, "Inflight I/O tracking").

The front-end keeps a shared area for the back-end (GET_INFLIGHT_FD) and hands it to the
next back-end after a crash (SET_INFLIGHT_FD). In it, one region per queue records which
descriptor heads the device has taken from the avail ring and not yet returned, and in
what order it took them. A back-end that dies with requests in flight leaves them marked;
the next one takes them up again before anything new. Without it, a device that
completes out of order loses requests: the front-end resumes the ring at used->idx.

Queue region (64-byte aligned, as libvhost-user and DPDK lay it out):

    u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
    desc_num x { u8 inflight; u8 pad[5]; u16 next; u64 counter; }

Taking a chain: counter, then inflight = 1. Returning a batch: link it through `next`
(last_batch_head), publish used->idx, clear the flags, then store used_idx. A crash
between the used->idx store and the last step leaves used_idx behind used->idx by the
batch's size: recovery clears that batch's flags. The area is the front-end's memory and
as untrusted as the ring: every index read from it is checked.
"""

from __future__ import annotations

from typing import Protocol

from . import inflight_packed
from .ring import Chain, RingError
from .split import SplitQueue

QUEUE_HEADER = 16
ENTRY = 16
ALIGN = 64
VERSION = 1
MAX_QUEUE_SIZE = 32768


def queue_region_bytes(queue_size: int, packed: bool = False) -> int:
    """Bytes one queue's region takes (padded to 64)."""
    if packed:
        return inflight_packed.queue_region_bytes(queue_size)
    return -(-(QUEUE_HEADER + ENTRY * queue_size) // ALIGN) * ALIGN


def area_bytes(num_queues: int, queue_size: int, packed: bool = False) -> int:
    return num_queues * queue_region_bytes(queue_size, packed)


class InflightRecord(Protocol):
    """One queue's region of the in-flight area as a running queue uses it (bound to its
    ring by `recover`). Chains to serve again are named by an int of the layout's."""

    def take(self, chains: list[Chain]) -> None:
        """The device took `chains` from the ring (RingError: the region is broken)."""
        ...

    def untake(self, chains: list[Chain]) -> None:
        """The chains taken last go back to the ring unused."""
        ...

    def push(self, chains: list[Chain], written: list[int]) -> None:
        """Return chains into the ring (instead of the ring's own push_batch)."""
        ...

    def published(self) -> None:
        """The ring published what was pushed."""
        ...

    def reread(self, item: int) -> Chain:
        """A chain the last back-end left in flight, to serve again."""
        ...

    def release(self) -> None: ...


class SplitInflight:
    """One split queue's region of the in-flight area, as the device side keeps it."""

    __slots__ = ("_batch", "_counters", "_flags", "_head16", "_next16", "_region", "counter",
                 "ring", "size")

    def __init__(self, region: memoryview, ring_size: int) -> None:
        if len(region) < queue_region_bytes(ring_size):
            got = len(region)
            region.release()
            raise RingError(f"in-flight region of {got} bytes is too small for a ring of "
                            f"{ring_size}")
        self._region = region
        self.size = ring_size
        entries = region[QUEUE_HEADER : QUEUE_HEADER + ENTRY * ring_size]
        self._head16 = region[8:QUEUE_HEADER].cast("H")  # version, desc_num, batch, used
        self._flags = entries  # byte 16 i: inflight flag of head i
        self._next16 = entries.cast("H")  # u16 8 i + 3: next of head i
        self._counters = entries.cast("Q")  # u64 2 i + 1: counter of head i
        self.counter = 0
        self.ring: SplitQueue | None = None
        self._batch: list[int] = []

    # -- at start ------------------------------------------------------------------------------

    def recover(self, ring: SplitQueue) -> list[int]:
        """Bring the region in line with `ring` (just created, at the front-end's base) and
        return the heads to serve again, oldest first. The ring then resumes past them:
        used->idx plus their number. A region the ring contradicts raises RingError."""
        self.ring = ring
        h, size = self._head16, self.size
        used = ring.used_idx
        if h[0] != 0 and h[0] != VERSION:
            raise RingError(f"in-flight region version {h[0]}, expected {VERSION}")
        flagged = any(self._flags[: ENTRY * min(h[1], size) : ENTRY])
        if h[0] == VERSION and h[1] != size and flagged:
            raise RingError(f"in-flight region for {h[1]} descriptors, the ring has {size}")
        behind = (used - h[3]) & 0xFFFF
        if h[0] == 0 or h[1] != size or (behind and not flagged) or behind > size:
            # fresh; of a ring of another size or another life (the driver reset it, the
            # front-end kept the area); or nothing in flight: start it afresh. The version
            # is 0 while the header is inconsistent: a death meanwhile leaves a fresh area.
            h[0] = 0
            self._flags[:] = bytes(len(self._flags))
            h[1], h[2], h[3] = size, 0, used
            h[0] = VERSION
            return []
        if behind:  # died after publishing a batch, before clearing its flags
            i = h[2]
            for _ in range(behind):
                if i >= size:
                    raise RingError(f"in-flight region: batch entry {i} >= ring size {size}")
                self._flags[ENTRY * i] = 0
                i = self._next16[8 * i + 3]
            h[3] = used
        flags = self._flags[::ENTRY]
        heads = [i for i in range(size) if flags[i]]
        if any(flags[i] != 1 for i in heads):
            raise RingError("in-flight region: a flag other than 0 or 1")
        counters = self._counters
        heads.sort(key=lambda i: counters[2 * i + 1])
        self.counter = (max((counters[2 * i + 1] for i in heads), default=0) + 1) & (2**64 - 1)
        if heads:
            waiting = (ring.avail16.load(1) - used) & 0xFFFF
            if len(heads) > min(waiting, size):
                raise RingError(f"in-flight region lists {len(heads)} requests, the driver "
                                f"has only {waiting} available past used index {used}")
            ring.last_avail = (used + len(heads)) & 0xFFFF
        return heads

    # -- running -------------------------------------------------------------------------------

    def take(self, chains: list[Chain]) -> None:
        for c in chains:
            self.taken(c.head)

    def untake(self, chains: list[Chain]) -> None:
        """Nothing: a chain given back stays marked; were the back-end to die now, the next
        one would count it among those taken and serve it again, the same thing."""

    def push(self, chains: list[Chain], written: list[int]) -> None:
        """Before the used index moves (several pushes may come before it does)."""
        assert self.ring is not None
        self.pushed([c.head for c in chains])
        self.ring.push_batch(chains, written)

    def pushed(self, heads: list[int]) -> None:
        """The used elements of `heads` were written (by `push`, or by a kernel): they join
        the batch `published` settles, all of its flags before the area's used index."""
        self.link(heads)
        self._batch += heads

    def published(self) -> None:
        assert self.ring is not None
        self.settle(self._batch, self.ring.used_idx)
        self._batch = []

    def reread(self, item: int) -> Chain:
        assert self.ring is not None
        return self.ring.read_chain(item)

    def taken(self, head: int) -> None:
        """The device took chain `head` from the avail ring."""
        self._counters[2 * head + 1] = self.counter
        self.counter = (self.counter + 1) & (2**64 - 1)
        self._flags[ENTRY * head] = 1

    def link(self, heads: list[int]) -> None:
        """Before the used index moves: the batch of `heads` becomes the last batch."""
        last, nxt = self._head16[2], self._next16
        for i in heads:
            nxt[8 * i + 3] = last
            last = i
        self._head16[2] = last

    def settle(self, heads: list[int], used_idx: int) -> None:
        """After the used index moved to `used_idx`: the batch is no longer in flight."""
        flags = self._flags
        for i in heads:
            flags[ENTRY * i] = 0
        self._head16[3] = used_idx

    def release(self) -> None:
        self.ring = None
        for v in (self._counters, self._next16, self._flags, self._head16, self._region):
            v.release()
