"""virtio-blk's reads, writes and flushes served by a compiled kernel (blk_serve_jit.py), a
batch per call: each request walked (the compiled walk of either ring layout), its data moved with
preadv/pwritev straight between the image and guest memory, its status byte and used
element written — no Python per request. The used index, barriers and the notification
stay the engine's (`DeviceQueue.serve_compiled`).

The kernel serves only the common case whole: a read, a write (synced after unless the
cache is write-back) or a flush of the usual layout, in range, moved in full. It stops
before anything else — a discard, GET_ID, a read or write that fails, a short read of a
shrunk image, O_DIRECT refusing a buffer — and blk.py serves that request, so those rules
and error messages have one place. A failed sync is the exception: it is not tried again
(Linux reports a writeback error once per file), so the kernel completes that request with
S_IOERR itself and `BlkKernel.serve` logs it as blk.py would. Used only where the compiled
walk is on (VHOSTUSER_JIT=1, kernel_walk.py), while writes are not logged (on a packed
ring, without an in-flight area), in order (not with --io-threads).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from ..ratelog import Limited
from ..virtq.kernel_walk import available as walk_available
from .blk_abi import T_OUT

if TYPE_CHECKING:
    from ..virtq.ring import DeviceRing

log = logging.getLogger(__name__)

IOV_MAX = 1024  # Linux's: a request with more data buffers goes to blk.py
FAILED_KEPT = 16  # failed syncs of one call logged each (blk.py's calls serve at most
# PUBLISH_EVERY, 16: keep this no smaller)

_jit: Any = None  # blk_serve_jit, once loaded
_tried = False


def available() -> bool:
    """Whether the kernel is on (the compiled walk is, and this one loads too); loaded and
    run once the first time: call it in the engine's process, before workers fork."""
    global _jit, _tried
    if not _tried and walk_available():
        _tried = True
        try:
            from . import blk_serve_jit

            _jit = blk_serve_jit
            _warm()
        except Exception as e:  # it cannot compile here: blk.py serves every request
            log.warning("compiled blk kernel unavailable (%s): blk.py serves", e)
            _jit = None
    return _jit is not None


def _warm() -> None:
    """Compile (or load from the cache) the kernel."""

    from ..virtq import ring_jit

    ring, _arrays = ring_jit.dummy_ctx()
    k = BlkKernel(-1)
    _jit.serve_at(ring, k.ctx, 0, 0, 0, -1, 0, False, False)


class BlkKernel:
    """Serves queues with the kernel, over each one's compiled walk's arrays (which
    the ring owns and releases)."""

    def __init__(self, fd: int, failures: Limited | None = None) -> None:
        """`failures`: where failed syncs are logged (blk.py's, shared with its own I/O
        errors)."""
        import numpy as np

        self.fd = fd
        self.failures = failures or Limited(log)
        self.heads = np.zeros(1, np.int64)
        self.meta = np.zeros((1, 4), np.int64)
        self.iov = np.zeros((IOV_MAX, 2), np.uint64)
        self.failed = np.zeros((1 + FAILED_KEPT, 3), np.int64)  # syncs that failed: a
        # count, then each one's errno, request type and sector (blk_serve_jit.serve)
        self.ctx = _jit.serve_ctx(self.heads, self.meta, self.iov, self.failed)

    def serve(self, ring: DeviceRing, n: int, capacity: int, writable: bool,
              writeback: bool) -> int:
        """Serve up to `n` requests at the ring's next available and used slots: how many
        it served (`DeviceQueue.serve_compiled` makes them visible).
        `writable`: writes and flushes may be served (not read-only); `writeback`: a write
        needs no sync after it."""
        w = ring.kernel
        assert w is not None and w.ctx is not None
        last, used_at = ring.cursors()
        k = _jit.serve_at(w.ctx, self.ctx, last, n, used_at, self.fd, capacity, writable,
                          writeback)
        if self.failed[0, 0]:
            self._report_failed()
        return int(k)

    def _report_failed(self) -> None:
        """Log the syncs that failed as blk.py does (their requests were answered S_IOERR)."""
        count = int(self.failed[0, 0])
        for errno, rtype, sector in self.failed[1 : 1 + count].tolist():
            e = OSError(errno, os.strerror(errno))
            if rtype == T_OUT:
                self.failures.log(logging.ERROR, "write at sector %d: %s", sector, e)
            else:
                self.failures.log(logging.ERROR, "request type %d sector %d: %s", rtype,
                                  sector, e)
        if count > FAILED_KEPT:
            self.failures.log(logging.ERROR, "and %d more failed syncs", count - FAILED_KEPT)
        self.failed[:] = 0
