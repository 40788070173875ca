"""The chain walk of either ring layout, compiled with numba, a batch of chains per call:
the rules of `SplitQueue.read_chain` and `PackedQueue._read_chain` (the references, which
stay) run over numpy views of the descriptors, the avail ring and the guest memory
regions (split_walk_jit.py, packed_walk_jit.py; ring_jit.py serves both to the kernels).

The kernel takes a chain only whole and only when it is ordinary: it stops *before* the
first chain it does not take — any broken rule, a buffer that spans two regions, an
indirect table not 8-byte aligned where it is mapped — and the Python walk takes that chain
(raising its error, or handling the rare case). So every error message, and every case
the kernel leaves out, has one place: split.py or packed.py. The chain it hands back is
made of the same views as the Python walk's.

Used only where numba is installed (the `jit` extra) and VHOSTUSER_JIT=1: opt-in while it
covers the walk alone (importing numba and loading the compiled code costs a process about
0.4 s, which only a data path that gains more than that should pay); `available()` says.
Compiled once per machine into numba's cache (NUMBA_CACHE_DIR; by default a directory of
ours under the user's cache, so a read-only install works), and loaded before workers
fork (`warm`).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from .ring import Chain

if TYPE_CHECKING:
    from .packed import PackedQueue
    from .split import SplitQueue

log = logging.getLogger(__name__)

MAX_REGIONS = 64  # guest memory in more regions than this: the Python walk (the kernel
# looks a buffer's region up by scanning them)
SEGS_PER_CHAIN = 8  # room for segments per chain asked for (a chain with more: still taken
# whole by the kernel if the batch has room, else left to the Python walk)

_kernel: Any = None
_jit: Any = None  # ring_jit, once loaded
_tried = False


def available() -> bool:
    """Whether the compiled walk is on: asked for (VHOSTUSER_JIT=1) and loadable here."""
    return os.environ.get("VHOSTUSER_JIT", "0") == "1" and load()


def load() -> bool:
    """Compile the kernel (or load it from the cache); False where numba is missing or
    cannot compile here (then the Python walk serves)."""
    global _kernel, _tried
    if not _tried:
        _tried = True
        ours = cache_dir()
        os.environ.setdefault("NUMBA_CACHE_DIR", ours)
        if os.environ["NUMBA_CACHE_DIR"] == ours:  # (not a directory someone chose)
            prune_cache(ours)
        try:
            _kernel = _compile()
        except Exception as e:  # no numba, or it cannot compile here: the Python walk
            log.warning("compiled chain walk unavailable (%s): the Python walk serves", e)
            _kernel = None
    return _kernel is not None


def cache_dir() -> str:
    """Our default for NUMBA_CACHE_DIR (`load` sets it where it is not set): a directory
    of ours under the user's cache, never beside the sources, which a read-only install
    cannot write.
    Numba reads it when it is imported: whoever imports a kernel module first sets it.
    One directory per version of the package's sources (a hash of every module): numba
    looks only at a function's own file to tell whether what it cached is stale, so a
    kernel whose file did not change would otherwise keep the code of a function it
    calls, or a constant it uses, from another file that did. Those of versions no
    process has started with for a while are removed (`prune_cache`)."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                        "vhostuser-numba", _sources_hash())


CACHE_KEEP_DAYS = 30


def prune_cache(ours: str, keep_days: float = CACHE_KEEP_DAYS) -> list[str]:
    """Mark `ours` (a `cache_dir()`) as in use now and remove the directories beside it
    that other versions of the sources compiled into and no process has started with for
    `keep_days` days (a directory's time is set when a process loads from it): each
    version has its own, which nothing else would ever remove. Only directories named as
    `cache_dir` names them (16 hex digits, not symbolic links) are touched; a failure
    (another user's directory, a read-only cache) leaves that one as it is. Returns what
    it removed. A process of a version unused for that long that starts in the instant
    another prunes may find its directory gone: it then serves with the Python walk,
    with a warning, until it restarts."""
    import shutil
    import time

    parent = os.path.dirname(ours)
    try:
        os.utime(ours)
    except OSError:
        pass  # (not made yet, or not ours to mark)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    horizon = time.time() - keep_days * 86400
    for name in names:
        path = os.path.join(parent, name)
        if (path == ours or len(name) != 16
                or any(ch not in "0123456789abcdef" for ch in name)):
            continue
        try:
            if os.path.isdir(path) and not os.path.islink(path) and \
                    os.stat(path).st_mtime < horizon:
                shutil.rmtree(path)
                removed.append(path)
        except OSError as e:
            log.debug("numba cache %s left as it is: %s", path, e)
    return removed


def _sources_hash() -> str:
    import hashlib
    from pathlib import Path

    h = hashlib.sha256()
    package = Path(__file__).resolve().parent.parent
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def warm() -> None:
    """Compile (or load from the cache) now, in the engine's process, before any worker
    forks: a worker then has it without paying for it."""
    if available():
        from . import ring_jit

        ctx, _arrays = ring_jit.dummy_ctx()
        ring_jit.walk_at(ctx, 0, 0)


def _compile() -> Any:
    global _jit
    from . import ring_jit

    _jit = ring_jit
    return ring_jit.walk_at


class KernelWalk:
    """One queue's arrays for the kernels (numpy views of its ring and of guest memory)
    and their context (the kernels' one argument for all of them: views_jit.py), made
    when the queue starts; `None` from `for_queue` where the kernel cannot serve it (no
    regions, more than MAX_REGIONS, a read-only one, ring areas not aligned where they
    are mapped)."""

    def __init__(self, q: SplitQueue | PackedQueue) -> None:
        import numpy as np

        from .split import SplitQueue  # (which imports this module)

        regions = q._regions
        self.views = [view for _, _, view in regions]
        # each region as 64-bit words (indirect tables are read as such), its last 1-7
        # bytes left out: a buffer or table there is the Python walk's
        whole = [len(v) // 8 * 8 for v in self.views]
        self.regions = np.array([(lo, n) for (lo, _, _), n in zip(regions, whole,
                                                                 strict=True)],
                                dtype=np.uint64)  # start and length: a region may end at 2^64
        # the regions' addresses (the views hold them mapped while the kernels use them)
        self.mem8: Any = tuple(np.frombuffer(v[:n], dtype=np.uint8)
                               for v, n in zip(self.views, whole, strict=True))
        self.bases: Any = np.array([b.ctypes.data for b in self.mem8], dtype=np.uint64)
        self.desc: Any = np.frombuffer(q.desc, dtype=np.uint64)
        self.packed = not isinstance(q, SplitQueue)
        if isinstance(q, SplitQueue):
            self.used: Any = np.frombuffer(q.used, dtype=np.uint32, count=1 + 2 * q.size)[1:]
            self.avail: Any = np.frombuffer(q.avail_ring, dtype=np.uint16)
        else:  # (no avail or used ring: arrays of their size that nothing reads)
            self.used = np.zeros(2 * q.size, np.uint32)
            self.avail = np.zeros(q.size, np.uint16)
        if self.desc.shape != (2 * q.size,) or self.avail.shape != (q.size,):
            raise ValueError("the ring's views are not of its size")  # the kernel trusts them
        self.size = q.size
        self.indirect = q.indirect
        self.heads = np.zeros(q.size, np.int64)
        self.meta = np.zeros((q.size, 4), np.int64)  # ring_jit.py's FIRST..NDESC
        self.segs = np.zeros((q.size * SEGS_PER_CHAIN, 3), np.int64)
        self.state: Any = np.zeros(_jit.state_len(q.size), np.int64)
        # what the kernels are given: the addresses of all of the above
        self.ctx: Any = _jit.ring_ctx(self.desc, self.avail, self.used, self.regions,
                                      self.bases, self.heads, self.meta, self.segs,
                                      self.indirect, self.packed, self.state)

    @staticmethod
    def for_queue(q: SplitQueue | PackedQueue, asked: bool | None = None) -> KernelWalk | None:
        """The kernel's arrays for `q`, if it is on (`asked`: regardless of VHOSTUSER_JIT)
        and can serve the queue's memory."""
        if not (available() if asked is None else asked and load()):
            return None
        if not 0 < len(q._regions) <= MAX_REGIONS or any(v.readonly for _, _, v in q._regions):
            log.info("compiled chain walk not used: %d memory regions (at most %d, writable)",
                     len(q._regions), MAX_REGIONS)
            return None
        try:
            return KernelWalk(q)
        except ValueError as e:  # ring arrays the kernels cannot take (not aligned)
            log.info("compiled chain walk not used: %s", e)
            return None

    def walk(self, cur: int, n: int) -> list[Chain]:
        """The first chains of `n` from cursor `cur` (ring_jit.py's) that the kernel takes
        whole (all of them, those before the first it leaves to the Python walk, or on a
        packed ring those before the first not available); on a packed ring each knows
        the descriptors it takes (`ndesc`)."""
        n = min(n, self.size)  # the output arrays' room (the kernel does not bound-check)
        assert self.ctx is not None  # (not released)
        taken = _kernel(self.ctx, cur, n)
        views = self.views
        if not taken:
            return []
        heads, meta = self.heads[:taken].tolist(), self.meta[:taken].tolist()
        end = meta[-1][0] + meta[-1][1] + meta[-1][2]
        flat = self.segs[:end].tolist()
        out = []
        for k in range(taken):
            first, nr, nw, ndesc = meta[k]
            bufs = [views[r][o : o + ln] for r, o, ln in flat[first : first + nr + nw]]
            out.append(Chain(heads[k], bufs[:nr], bufs[nr:], ndesc=ndesc))
        return out

    def used_cursor(self) -> int:
        """The used cursor the last kernel left (ring_jit.done)."""
        return int(self.state[0])

    def release(self) -> None:
        """Drop the numpy views (they hold exports of the queue's memoryviews)."""
        self.ctx = None  # first: its addresses are the arrays'
        self.mem8 = self.bases = None
        self.desc = self.avail = self.used = self.state = None
        self.views = []
