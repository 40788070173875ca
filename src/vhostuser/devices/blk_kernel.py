"""virtio-blk's reads and writes served by a compiled kernel (blk_serve_jit.py), a batch per
call: each request walked (the compiled split walk), its data moved with preadv/pwritev
straight between the image and guest memory, its status byte and used element written —
no Python per request. The used index, barriers and the notification stay the engine's
(`DeviceQueue.serve_split`).

The kernel serves only the common case whole: a read or a write of the usual layout, in
range, moved in full. It stops before anything else — a flush, a discard, GET_ID, an
error, a short read of a shrunk image, O_DIRECT refusing a buffer — and blk.py serves that
request, so every rule and error message has one place. Used only where the compiled walk
is on (VHOSTUSER_JIT=1, split_kernel.py), on split rings while writes are not logged, in
order (not with --io-threads).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..virtq.split_kernel import MAX_REGIONS
from ..virtq.split_kernel import available as walk_available

if TYPE_CHECKING:
    from ..virtq.split import SplitQueue

log = logging.getLogger(__name__)

IOV_MAX = 1024  # Linux's: a request with more data buffers goes to blk.py

_kernel: Any = None
_tried = False


def available() -> bool:
    """Whether the kernel is on (the compiled walk is, and this one loads too); loaded and
    run once the first time: call it in the engine's process, before workers fork."""
    global _kernel, _tried
    if not _tried and walk_available():
        _tried = True
        try:
            from . import blk_serve_jit

            _kernel = blk_serve_jit.serve
            _warm()
        except Exception as e:  # it cannot compile here: blk.py serves every request
            log.warning("compiled blk kernel unavailable (%s): blk.py serves", e)
            _kernel = None
    return _kernel is not None


def _warm() -> None:
    """Compile (or load from the cache) every version the queues will call."""
    import numpy as np

    desc = np.zeros(4, np.uint64)
    avail = np.zeros(2, np.uint16)
    regions = np.zeros((1, 2), np.uint64)
    for nreg in range(1, MAX_REGIONS + 1):
        mems = tuple(np.zeros(2, np.uint64) for _ in range(nreg))
        mem8 = tuple(m.view(np.uint8) for m in mems)
        _kernel(desc, avail, 0, 0, 2, True, regions, mems, mem8, np.zeros(nreg, np.uint64),
                np.zeros(1, np.int64), np.zeros((1, 3), np.int64), np.zeros((1, 3), np.int64),
                np.zeros((1, 2), np.uint64), np.zeros(4, np.uint32), 0, np.zeros(1, np.int64),
                -1, 0, False)


class BlkKernel:
    """Serves split queues with the kernel, over each one's compiled walk's arrays (which
    the ring owns and releases)."""

    def __init__(self, fd: int) -> None:
        import numpy as np

        self.fd = fd
        self.heads = np.zeros(1, np.int64)
        self.meta = np.zeros((1, 3), np.int64)
        self.iov = np.zeros((IOV_MAX, 2), np.uint64)

    def serve(self, ring: SplitQueue, n: int, capacity: int, writes: bool) -> list[int]:
        """Serve up to `n` requests at the ring's next available and used slots: the heads
        of those served, from the first on (`DeviceQueue.serve_split` makes them visible).
        `writes`: writes may be served (not read-only, and no sync needed after each)."""
        w = ring.kernel
        assert w is not None and w.desc is not None
        # the heads served go to the walk's own output array (a ring's worth; unused while
        # this kernel walks a chain at a time into `self.heads`)
        k = _kernel(w.desc, w.avail, ring.last_avail, n, ring.size, ring.indirect, w.regions,
                    w.mems, w.mem8, w.bases, self.heads, self.meta, w.segs, self.iov, w.used,
                    ring.used_idx % ring.size, w.heads, self.fd, capacity, writes)
        return w.heads[:k].tolist() if k else []
