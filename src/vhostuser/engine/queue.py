"""A device's view of one running virtqueue: take available chains, complete them in any
order, notify the driver when it chooses to.

Completions are staged and reach the used ring at `notify` (the engine also calls it after
every callback it makes into the device): one used-index update and at most one
notification per batch, and the one place where a worker checks that the back-end's main
process still lives before it stores into guest memory (see engine/worker.py).

A ring that breaks the rules does not raise into the device: the chains before the bad one
are handed out, `error` is set and the queue looks empty from then on; the engine stops it
and tells the front-end (the err eventfd).
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from ..virtq.split import Chain, RingError, SplitQueue
from .notify import Notifier

if TYPE_CHECKING:
    import numpy as np

    from ..virtq.burst import DirectBurst


class ParentGone(Exception):
    """The worker's parent died: nothing more may reach the used ring."""


class DeviceQueue:
    """One running split virtqueue as a device uses it."""

    __slots__ = ("_chains", "_lens", "_ppid", "call", "completed", "error", "index", "lock",
                 "popped", "ring")

    def __init__(self, ring: SplitQueue, index: int, call: Notifier,
                 ppid: int | None = None) -> None:
        self.ring = ring  # for the burst helpers below; take and complete through this class
        self.index = index
        self.call = call
        self._ppid = ppid  # the engine's process, checked before each store (None: we are it)
        self._chains: list[Chain] = []
        self._lens: list[int] = []
        self.popped = 0  # chains handed to the device so far
        self.completed = 0  # chains returned to the driver so far
        self.error: RingError | None = None
        # Set by a service that completes chains from threads of its own: `complete` and
        # `notify` (the used ring's side) then take it. Taking chains stays with the
        # worker's thread.
        self.lock: threading.Lock | None = None

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
            return self.ring.available()
        except RingError as e:
            self.error = e
            return 0

    def pop(self) -> Chain | None:
        """The next available chain, or None."""
        if not self.available():
            return None
        try:
            chain = self.ring.pop()
        except RingError as e:
            self.error = e
            return None
        self.popped += 1
        return chain

    def pop_batch(self, n: int | None = None) -> list[Chain]:
        """Up to `n` available chains (all of them if None)."""
        avail = self.available()
        if n is not None and n < avail:
            avail = n
        if avail <= 0:
            return []
        chains, error = self.ring.pop_batch(avail)
        self.popped += len(chains)
        if error is not None:
            self.error = error
        return chains

    def unpop(self, n: int = 1) -> None:
        """Give back the `n` chains taken last, untouched (not completed)."""
        self.ring.last_avail = (self.ring.last_avail - n) & 0xFFFF
        self.popped -= n

    def pop_direct(self, n: int, flags: int = 0) -> DirectBurst | None:
        """A burst of up to `n` one-descriptor chains (virtq/burst.py), or None: then take
        them one by one, which also reports what is wrong with them."""
        from ..virtq.burst import pop_direct

        n = min(n, self.available())
        if n <= 0:
            return None
        burst = pop_direct(self.ring, n, flags)
        if burst is not None:
            self.popped += len(burst.heads)
        return burst

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
        push_heads(self.ring, heads, written)
        self.completed += len(heads)
        if self.ring.publish():
            self.call.notify()

    def notify(self) -> None:
        """Make the staged completions visible to the driver and signal it if it asked."""
        if not self._chains:
            return
        if self.lock is not None:
            with self.lock:
                self._publish()
            return
        self._publish()

    def _publish(self) -> None:
        if not self._chains:
            return
        if self.completed + len(self._chains) > self.popped:  # a device bug, not the guest's
            self._chains, self._lens = [], []
            self.error = RingError("the device completed more chains than it took")
            return
        self._check_parent()
        self.ring.push_batch(self._chains, self._lens)
        self.completed += len(self._chains)
        self._chains, self._lens = [], []
        if self.ring.publish():
            self.call.notify()

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

    def release(self) -> None:
        self.ring.release()
