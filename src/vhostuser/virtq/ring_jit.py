"""Either ring layout, for the compiled kernels (numba): a ring's context (views_jit.py)
and what a kernel does with a ring — walk chains from a cursor, return a chain at a used
cursor — whichever layout it is. Imported only by the *_jit.py modules, and only where
numba is installed.

Cursors: on a split ring, the walk's is a free-running avail index and the used one a
used ring slot; on a packed ring both are descriptor positions with their wrap counter
(position | wrap << 15). A kernel walks chains from the first cursor and writes their
used elements from the second, in order; it leaves the used cursor past the last chain
it returned in the ring's `state` (what a packed ring's caller moves its positions by,
since a packed chain may take several descriptors).

What stays in Python: a split ring's indices (the avail index read before the kernel
runs, the used index stored after), and every barrier but those a packed ring's
descriptors carry themselves: a descriptor's flags say whether it is available and
whether it was used, so the walk loads them first (`load_acquire_u16`) and a used
descriptor is stored in one piece after the bytes written into its buffers
(`store_release_u64`). On x86 both are plain moves that only keep the compiler from
reordering around them.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import numpy as np
from numba import njit

from . import packed_walk_jit, split_walk_jit
from .packed import DESC_F_AVAIL, DESC_F_USED
from .ring import DESC_F_WRITE
from .views_jit import i64_rows, i64s, store_release_u64, u16s, u32s, u64_rows, u64s

# A ring's context: the addresses and lengths of the arrays the kernels use, made once
# per ring by `ring_ctx`, read by `ring_views`. A packed ring has no avail or used ring:
# its context names arrays of their size that nothing reads.
DESC, AVAIL, USED, REGIONS, BASES, HEADS, META, SEGS, SIZE, NREGIONS, NSEGS, INDIRECT, \
    PACKED, STATE = range(14)
FIRST, NR, NW, NDESC = range(4)  # a walked chain's `meta`: its first segment, readable
# and writable segments, ring descriptors it takes (1 on a split ring)



def state_len(size: int) -> int:
    """`state`'s length for a ring of `size`: the used cursor a kernel left, then (on a
    packed ring) how many used descriptors wait to be stored and each one's offset in the
    ring and its second word (`put_used`, `done`)."""
    return 2 + 2 * size

Ring = namedtuple("Ring", "desc avail used regions bases heads meta segs size indirect "
                          "packed state")

_USED_FLAGS = np.uint64(DESC_F_AVAIL | DESC_F_USED) << np.uint64(48)
_WRITTEN_FLAG = np.uint64(DESC_F_WRITE) << np.uint64(48)


def ring_ctx(desc: Any, avail: Any, used: Any, regions: Any, bases: Any, heads: Any,
             meta: Any, segs: Any, indirect: bool, packed: bool = False,
             state: Any = None) -> Any:
    """The context of a ring of len(avail) entries whose arrays these are (the caller
    keeps them while the context is used); `desc`: its descriptors as pairs of words;
    `used`: a split ring's used elements as pairs of uint32; `state`: state_len(size)
    int64 (a packed ring's caller reads the used cursor there)."""
    size = len(avail)
    if state is None:
        state = np.zeros(state_len(size), np.int64)
    shapes = ((desc, np.uint64, (2 * size,)), (avail, np.uint16, (size,)),
              (used, np.uint32, (2 * size,)), (regions, np.uint64, (len(regions), 2)),
              (bases, np.uint64, (len(regions),)), (heads, np.int64, (size,)),
              (meta, np.int64, (size, 4)), (segs, np.int64, (len(segs), 3)),
              (state, np.int64, (state_len(size),)))
    for a, dtype, shape in shapes:
        if a.dtype != dtype or a.shape != shape or not a.flags.c_contiguous:
            raise ValueError(f"a ring array is {a.dtype}{a.shape}, not {np.dtype(dtype)}{shape}")
        # (the views the kernels make from a context are typed aligned and writable)
        if not a.flags.aligned or not a.flags.writeable:
            raise ValueError(f"a ring array of {a.dtype} is not aligned and writable")
    ctx = np.zeros(14, np.uint64)
    for i, (a, _, _) in enumerate(shapes[:8]):
        ctx[i] = a.ctypes.data
    ctx[SIZE], ctx[NREGIONS], ctx[NSEGS], ctx[INDIRECT] = size, len(regions), len(segs), indirect
    ctx[PACKED], ctx[STATE] = packed, state.ctypes.data
    return ctx


def dummy_ctx() -> tuple[Any, tuple[Any, ...]]:
    """The context of a ring of 2 entries with nothing available, and the arrays it names
    (kept as long as it is used): what the kernels are warmed with."""
    arrays = (np.zeros(4, np.uint64), np.zeros(2, np.uint16), np.zeros(4, np.uint32),
              np.zeros((1, 2), np.uint64), np.zeros(1, np.uint64), np.zeros(2, np.int64),
              np.zeros((2, 4), np.int64), np.zeros((1, 3), np.int64),
              np.zeros(state_len(2), np.int64))
    return ring_ctx(*arrays[:8], True, state=arrays[8]), arrays


@njit(cache=True, nogil=True, inline="always")
def ring_views(ctx: Any) -> Any:
    """The `Ring` of a context. Its entry point unpacks the fields a kernel needs by name
    and passes them as arrays (the kernels' own argument order): a loop that reads them
    out of the tuple measured twice as slow (the take kernel, 23 to 45 ns a frame)."""
    size = np.intp(ctx[SIZE])
    nreg = np.intp(ctx[NREGIONS])
    return Ring(u64s(ctx[DESC], 2 * size), u16s(ctx[AVAIL], size), u32s(ctx[USED], 2 * size),
                u64_rows(ctx[REGIONS], nreg, 2), u64s(ctx[BASES], nreg),
                i64s(ctx[HEADS], size), i64_rows(ctx[META], size, 4),
                i64_rows(ctx[SEGS], np.intp(ctx[NSEGS]), 3), size, ctx[INDIRECT] != 0,
                ctx[PACKED] != 0, i64s(ctx[STATE], 2 + 2 * size))


@njit(cache=True, nogil=True, inline="always")
def walk(desc: Any, avail: Any, size: int, indirect: bool, packed: bool, regions: Any,
         bases: Any, cur: int, n: int, heads: Any, meta: Any,
         segs: Any) -> tuple[int, bool, int]:
    """Walk up to `n` chains from cursor `cur` into `heads`, `meta` (FIRST..NDESC) and
    `segs`: (how many it took whole, whether it ended at a chain not available — a
    packed ring's walk finds where they end; a split ring's caller knows, and `n` is at
    most that — the cursor past the last one taken). Fewer than `n` and not ended: it
    stopped before a chain it leaves to the Python walk."""
    if packed:
        return packed_walk_jit.walk(desc, cur, n, size, indirect, regions, bases, heads, meta,
                                    segs)
    k = split_walk_jit.walk(desc, avail, cur, n, size, indirect, regions, bases, heads, meta,
                            segs)
    return k, False, cur + k


@njit(cache=True, nogil=True)
def walk_more(desc: Any, avail: Any, size: int, indirect: bool, packed: bool, regions: Any,
              bases: Any, heads: Any, meta: Any, segs: Any, cur: int, k: int, n: int,
              want: int) -> tuple[int, bool, int, int]:
    """Walk up to `want` more chains into `heads`, `meta` and `segs` (the `k` walked
    already kept, the walk going on from `cur`, past them), of at most `n` in all.
    Returns (chains walked in all, whether the walk stopped before one it leaves to the
    Python walk, how many chains there are at most now — fewer than `n` where a packed
    ring's walk found where the available ones end — and the cursor past the last)."""
    m = min(want, n - k)
    base = 0 if k == 0 else meta[k - 1, FIRST] + meta[k - 1, NR] + meta[k - 1, NW]
    got, ended, cur = walk(desc, avail, size, indirect, packed, regions, bases, cur, m,
                           heads[k:], meta[k:], segs[base:])
    for j in range(k, k + got):
        meta[j, FIRST] += base
    if ended:
        n = k + got
    return k + got, got < m and not ended, n, cur


@njit(cache=True, nogil=True, inline="always")
def put_used(used: Any, state: Any, size: int, packed: bool, cur: int, head: int,
             written: int, ndesc: int) -> int:
    """Return chain `head` (buffer id) at used cursor `cur` with `written` bytes stored in
    its buffers; the cursor past it (a packed chain took `ndesc` descriptors). On a split
    ring the used element is written now (the driver looks at it once the used index,
    stored later, says so); on a packed ring the used descriptor waits in `state` for
    `done`: the driver looks at the descriptors themselves, and a line it reads between
    two of our stores would go back and forth between the CPUs for each."""
    if packed:
        pos, wrap = cur & packed_walk_jit.POS, cur >> 15
        word = np.uint64(written) | np.uint64(head) << np.uint64(32)
        if wrap:
            word |= _USED_FLAGS
        if written:
            word |= _WRITTEN_FLAG
        w = state[1]
        state[2 + 2 * w] = 16 * pos + 8
        state[3 + 2 * w] = np.int64(word)
        state[1] = w + 1
        pos += ndesc
        if pos >= size:
            pos -= size
            wrap ^= 1
        return int(pos | wrap << 15)
    used[2 * cur] = np.uint32(head)
    used[2 * cur + 1] = np.uint32(written)
    return int((cur + 1) & (size - 1))


@njit(cache=True, nogil=True)
def done(desc: Any, state: Any, cur: int) -> None:
    """A kernel's last word: the used cursor past the chains it returned; on a packed ring
    their used descriptors stored, each in one piece after the bytes written into its
    buffers (a release store), the first one last, so that the driver sees them at once."""
    state[0] = cur
    n = state[1]
    if n:
        at = np.uint64(desc.ctypes.data)
        for j in range(1, n):
            store_release_u64(at + np.uint64(state[2 + 2 * j]), np.uint64(state[3 + 2 * j]))
        store_release_u64(at + np.uint64(state[2]), np.uint64(state[3]))
        state[1] = 0


@njit(cache=True, nogil=True)
def walk_at(ctx: Any, last: int, n: int) -> int:
    """`walk` over a ring's context into its own arrays (what kernel_walk.KernelWalk
    calls): how many chains it took whole."""
    r = ring_views(ctx)
    k, _, _ = walk(r.desc, r.avail, r.size, r.indirect, r.packed, r.regions, r.bases, last, n,
                   r.heads, r.meta, r.segs)
    return int(k)
