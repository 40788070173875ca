"""A device's view of one running virtqueue: take available chains, complete them in any
order, notify the driver when it chooses to.

Completions are staged and reach the used ring at `notify` (the engine also calls it after
every callback it makes into the device): one used-index update and at most one
notification per batch, and the one place where a worker checks that the back-end's main
process still lives before it stores into guest memory (see engine/worker.py).

A ring that breaks the rules does not raise into the device: the chains before the bad one
are handed out, `error` is set and the queue looks empty from then on; the engine stops it
and tells the front-end (the err eventfd).

With in-flight tracking (virtq/inflight.py) every chain taken is recorded in the front-end's
in-flight area until its completion is published, and the chains a dead back-end left in
flight are handed out again first, oldest first.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING

from ..memory import GuestMemory
from ..virtq.inflight import SplitInflight
from ..virtq.packed import PackedQueue
from ..virtq.ring import Chain, DeviceRing, RingError, RingLayout
from ..virtq.split import SplitQueue
from .notify import Notifier

if TYPE_CHECKING:
    import numpy as np

    from ..virtq.burst import DirectBurst
    from ..virtq.dirtylog import DirtyLog
    from ..virtq.inflight import InflightRecord


def open_ring(mem: GuestMemory, layout: RingLayout, base: int, packed: bool, event_idx: bool,
              indirect: bool, log: DirtyLog | None = None,
              log_used: int | None = None) -> DeviceRing:
    """The device side of a ring of either layout (RingError if it cannot run)."""
    kind = PackedQueue if packed else SplitQueue
    return kind(mem, layout, base, event_idx, indirect, log, log_used)


class ParentGone(Exception):
    """The worker's parent died: nothing more may reach the used ring."""


class DeviceQueue:
    """One running virtqueue (split or packed) as a device uses it."""

    __slots__ = ("_chains", "_lens", "_ppid", "_pushed", "_recent", "_redone", "_resubmit",
                 "call", "completed", "error", "index", "lock", "popped", "ring", "tracker")

    def __init__(self, ring: DeviceRing, index: int, call: Notifier,
                 ppid: int | None = None, tracker: InflightRecord | None = None) -> None:
        """`tracker`: the queue's in-flight record, already recovered against `ring`."""
        self.ring = ring  # for the burst helpers below; take and complete through this class
        self.index = index
        self.call = call
        self._ppid = ppid  # the engine's process, checked before each store (None: we are it)
        self._chains: list[Chain] = []
        self._lens: list[int] = []
        self._pushed = 0  # completions in the used ring, not yet published
        self.popped = 0  # chains handed to the device so far
        self.completed = 0  # chains returned to the driver so far
        self.error: RingError | None = None
        # Set by a service that completes chains from threads of its own: `complete` and
        # `notify` (the used ring's side) then take it. Taking chains stays with the
        # worker's thread.
        self.lock: threading.Lock | None = None
        self.tracker = tracker
        # chains left in flight by a dead back-end (the tracker's names), oldest last
        self._resubmit: list[int] = []
        self._redone: list[int] = []  # those handed out again, in order
        # tracked: the chains taken from the ring lately (bursts are not listed: they are a
        # split ring's, whose give-backs need nothing of the area)
        self._recent: list[Chain] = []

    def resubmit(self, items: list[int]) -> None:
        """Hand these chains (oldest first, still marked in flight) out again before
        anything new from the ring."""
        self._resubmit = items[::-1]

    @property
    def inflight(self) -> int:
        """Chains the device holds: taken, not yet completed."""
        return self.popped - self.completed - len(self._chains)

    # -- taking ------------------------------------------------------------------------------

    def available(self) -> int:
        """How many chains the driver has made available (0 once the ring is broken)."""
        if self.error is not None:
            return 0
        try:
            return self.ring.available() + len(self._resubmit)
        except RingError as e:
            self.error = e
            return 0

    def pop(self) -> Chain | None:
        """The next available chain, or None."""
        chains = self.pop_batch(1)
        return chains[0] if chains else None

    def _room(self) -> int:
        """How many more chains the device may hold: a ring's worth at most (a driver has
        no more heads; one that makes more available breaks the rules)."""
        return self.ring.size - (self.popped - self.completed)

    def pop_batch(self, n: int | None = None) -> list[Chain]:
        """Up to `n` available chains (all of them if None)."""
        avail = min(self.available(), self._room())
        if n is not None and n < avail:
            avail = n
        if avail <= 0:
            return []
        if self._resubmit:
            return self._pop_resubmitted(avail)
        chains, error = self.ring.pop_batch(avail)
        if error is not None:
            self.error = error
        if self.tracker is not None and chains and not self._mark_taken(chains):
            return []
        self.popped += len(chains)
        return chains

    def _mark_taken(self, chains: list[Chain]) -> bool:
        """Record chains taken in the in-flight area. Under the lock if completions come
        from other threads: between publishing a batch and clearing its flags, the driver
        may already have made one of its heads available again, and its new mark must not
        be cleared. False if the area is broken (the chains go back; the queue stops)."""
        assert self.tracker is not None
        with self.lock or nullcontext():
            try:
                self.tracker.take(chains)
            except RingError as e:
                self.error = e
                self.ring.unpop(len(chains))
                return False
        self._recent += chains
        if len(self._recent) > 2 * self.ring.size:
            del self._recent[: self.ring.size]
        return True

    def _pop_resubmitted(self, n: int) -> list[Chain]:
        assert self.tracker is not None
        chains: list[Chain] = []
        while self._resubmit and len(chains) < n:
            item = self._resubmit[-1]
            try:
                chains.append(self.tracker.reread(item))
            except RingError as e:
                self.error = e
                break
            self._redone.append(self._resubmit.pop())
        self.popped += len(chains)
        return chains

    def unpop(self, n: int = 1) -> None:
        """Give back the `n` chains taken last, untouched (not completed)."""
        from_ring = min(n, self.popped - len(self._redone))
        if self.tracker is not None and from_ring:
            back = self._recent[-from_ring:]
            del self._recent[-from_ring:]
            with self.lock or nullcontext():
                self.tracker.untake(back)
        self.ring.unpop(from_ring)
        for _ in range(n - from_ring):
            self._resubmit.append(self._redone.pop())
        self.popped -= n

    def pop_direct(self, n: int, flags: int = 0) -> DirectBurst | None:
        """A burst of up to `n` one-descriptor chains (virtq/burst.py), or None: then take
        them one by one, which also reports what is wrong with them."""
        from ..virtq.burst import pop_direct

        ring = self.ring
        if not isinstance(ring, SplitQueue):
            return None
        n = min(n, self.available(), self._room())
        if n <= 0 or self._resubmit or ring.log is not None:
            return None  # while writes are logged, chains know where their buffers are
        burst = pop_direct(ring, n, flags)
        if burst is not None:
            self.popped += len(burst.heads)
            tracker = self.tracker
            if tracker is not None:
                assert isinstance(tracker, SplitInflight)  # bursts are a split ring's
                with self.lock or nullcontext():
                    for h in burst.heads.tolist():
                        tracker.taken(h)
        return burst

    def compiled(self) -> bool:
        """Whether `serve_compiled` may be used now: a ring with its compiled walk on, writes
        not logged, no chains to hand out again, no completions from threads (and on a
        packed ring, no in-flight area)."""
        ring = self.ring
        return (ring.kernel is not None and ring.log is None and not self._resubmit
                and self.lock is None
                and (self.tracker is None or isinstance(ring, SplitQueue)))

    def _ready_now(self) -> int:
        """How many chains a kernel may walk: those available on a split ring (its index
        says); on a packed ring its size where one is (the walk finds where they end).
        0 once the ring broke the rules."""
        ring = self.ring
        if self.error is not None:
            return 0
        try:
            if isinstance(ring, SplitQueue):
                return ring.available()
            return ring.size if ring.has_available() else 0
        except RingError as e:
            self.error = e
            return 0

    def waiting(self) -> bool:
        """Whether a chain is available: `available() > 0`, without counting them (on a
        packed ring, counting is a walk)."""
        return self.error is None and (bool(self._resubmit) or self._ready_now() > 0)

    def serve_compiled(self, serve: Callable[[DeviceRing, int], int], limit: int) -> int:
        """Let `serve` take and complete, in place, up to `limit` of the chains available:
        a compiled kernel that serves them whole from the ring's cursors on (`cursors`,
        ring_jit.py); it returns how many it served (their heads are the first of
        `ring.kernel.heads`). They become visible with the other completions at the next
        `notify` (one index store, at most one notification; on a packed ring, whose used
        descriptors carry their own flags, as the kernel returns unless a batch before
        them waits for its first flags there), recorded in the in-flight area as
        completed. Returns how many. 0 where it may not be used — writes logged,
        chains to hand out again, completions from threads, a packed ring with an
        in-flight area — or nothing is available: then take chains the usual way.

        With an in-flight area, the chains `serve` took are marked in flight as soon as
        it returns, as the chains taken the usual way are (before they are served): the
        next back-end serves again every marked chain not published and resumes past them.
        A death while `serve` runs leaves its chains unmarked, but they are the last ones
        taken, so the resume point (the used index plus the marked chains) is the first
        of them, and they are taken from the ring again."""
        ring, tracker = self.ring, self.tracker
        if not self.compiled():
            return 0
        assert tracker is None or isinstance(tracker, SplitInflight)  # a split ring's
        n = min(self._ready_now(), self._room(), limit)
        if n <= 0:
            return 0
        self._check_parent()  # the kernel stores into guest memory
        if self._chains and not self._push_staged():  # their used elements come first
            return 0
        k = serve(ring, n)
        if k:
            self._check_parent()  # a long batch of I/O: the area is not ours if it died
            if tracker is not None:
                assert ring.kernel is not None
                listed = ring.kernel.heads[:k].tolist()
                for h in listed:
                    tracker.taken(h)
                tracker.pushed(listed)
            ring.kernel_served(k)
            self.popped += k
            self.completed += k
            self._pushed += k
        return k

    def run_kernel(self, kernel: Callable[..., int], ctx: object, args: tuple[object, ...],
                   limit: int) -> int | None:
        """`serve_compiled` in its usual case, with its chains published at once: a
        compiled kernel, `kernel(the ring's context, ctx, avail cursor, n, used cursor,
        *args)` (ring_jit.py's cursors), serves up to `limit` of the chains available (n
        may be 0: none is, or the device holds a ring's worth) and returns how many. None
        where this may not be used — where `serve_compiled` may not, or with an in-flight
        area or completions staged — or the ring broke the rules (`error` is set): then
        `serve_compiled`, or chains.
        A caller that completes more chains itself afterwards publishes (and may notify)
        once more at its `notify`. It runs once per burst, where each call more costs
        (bench/RESULTS.md, net_dpdk 2026-12-02): the staging and publishing of
        `serve_compiled` and `notify` are done here, in two calls (`kernel_cursors`,
        `kernel_ran`, which a caller that runs one kernel over two rings uses)."""
        cursors = self.kernel_cursors(limit)
        if cursors is None:
            return None
        assert self.ring.kernel is not None
        k = kernel(self.ring.kernel.ctx, ctx, *cursors, *args)
        self.kernel_ran(k)
        return k

    def kernel_cursors(self, limit: int) -> tuple[int, int, int] | None:
        """`run_kernel`'s first half: (avail cursor, n, used cursor) for a kernel that
        serves up to `limit` chains over the ring's context (`ring.kernel.ctx`), or None
        where run_kernel returns None. Nothing changes here but `error` (set where the
        ring broke the rules); a caller that then runs the kernel calls `kernel_ran`."""
        if (self.tracker is not None or self._chains or self.error is not None
                or not self.compiled()):
            return None
        ring = self.ring
        n = min(limit, self._ready_now(), ring.size - (self.popped - self.completed))
        if self.error is not None:
            return None
        if self._ppid is not None:
            self._check_parent()  # the kernel stores into guest memory
        last, used_at = ring.cursors()
        return last, max(n, 0), used_at

    def kernel_ran(self, k: int) -> None:
        """`run_kernel`'s second half: a kernel given `kernel_cursors` served `k` chains:
        they are published (and the driver notified if it asks)."""
        if k:
            if self._ppid is not None:
                self._check_parent()
            ring = self.ring
            ring.kernel_served(k)
            self.popped += k
            self.completed += k
            self._pushed = 0  # (published with these)
            if ring.publish():
                self.call.notify()

    # -- completing ----------------------------------------------------------------------------

    def complete(self, chain: Chain, written: int) -> None:
        """Return `chain` to the driver with `written` bytes stored in its writable part
        (visible at the next `notify`)."""
        if self.lock is not None:
            with self.lock:
                self._chains.append(chain)
                self._lens.append(written)
            return
        self._chains.append(chain)
        self._lens.append(written)

    def complete_batch(self, chains: list[Chain], written: list[int]) -> None:
        if self.lock is not None:
            with self.lock:
                self._chains += chains
                self._lens += written
            return
        self._chains += chains
        self._lens += written

    def complete_burst(self, heads: np.ndarray, written: np.ndarray | int = 0) -> None:
        """Return a burst taken with `pop_direct` at once (and notify)."""
        self.notify()  # what was staged goes first
        if self.lock is not None:
            with self.lock:
                self._push_burst(heads, written)
            return
        self._push_burst(heads, written)

    def _push_burst(self, heads: np.ndarray, written: np.ndarray | int) -> None:
        from ..virtq.burst import push_heads

        self._check_parent()
        ring = self.ring
        assert isinstance(ring, SplitQueue)  # bursts are a split ring's (pop_direct)
        tracker = self.tracker
        assert tracker is None or isinstance(tracker, SplitInflight)
        listed = heads.tolist() if tracker is not None else []
        if tracker is not None:
            tracker.link(listed)
        push_heads(ring, heads, written)
        self.completed += len(heads)
        wanted = ring.publish()
        if tracker is not None:
            tracker.settle(listed, ring.used_idx)
        if wanted:
            self.call.notify()

    def notify(self) -> None:
        """Make the staged completions visible to the driver and signal it if it asked."""
        if not self._chains and not self._pushed:
            return
        if self.lock is not None:
            with self.lock:
                self._publish()
            return
        self._publish()

    def _publish(self) -> None:
        if self._chains:
            if not self._push_staged():  # (which looked at the parent)
                return
        elif self._pushed:  # a kernel's completions alone
            self._check_parent()
        else:
            return
        ring, tracker = self.ring, self.tracker
        self._pushed = 0
        wanted = ring.publish()
        if ring.log is not None:
            ring.log.logged()
        if tracker is not None:
            tracker.published()
        if wanted:
            self.call.notify()

    def _push_staged(self) -> bool:
        """Write the staged completions' used elements (not yet visible). False if the
        device completed more chains than it took (the queue stops)."""
        if self.completed + len(self._chains) > self.popped:  # a device bug, not the guest's
            self._chains, self._lens = [], []
            self.error = RingError("the device completed more chains than it took")
            return False
        self._check_parent()
        tracker, ring = self.tracker, self.ring
        if tracker is not None:
            tracker.push(self._chains, self._lens)
        else:
            ring.push_batch(self._chains, self._lens)
        self.completed += len(self._chains)
        self._pushed += len(self._chains)
        log = ring.log
        if log is not None:  # live migration: the chains' buffers are dirty
            for c in self._chains:
                if c.writable_at:
                    log.mark_all(c.writable_at)
        self._chains, self._lens = [], []
        return True

    def _check_parent(self) -> None:
        if self._ppid is not None and os.getppid() != self._ppid:
            raise ParentGone()

    # -- kicks -------------------------------------------------------------------------------

    def disable_kicks(self) -> None:
        self.ring.disable_kicks()

    def enable_kicks(self) -> bool:
        """Ask for kicks again; True if chains arrived meanwhile."""
        if self.error is not None:
            return False
        try:
            return self.ring.enable_kicks()
        except RingError as e:
            self.error = e
            return False

    @property
    def unserved(self) -> int:
        """Chains left in flight by a dead back-end that were not handed out again yet."""
        return len(self._resubmit)

    def release(self) -> None:
        if self.tracker is not None:
            self.tracker.release()
        self.ring.release()
