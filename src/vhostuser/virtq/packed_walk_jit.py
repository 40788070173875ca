"""The packed ring's chain walk, compiled with numba, a batch of chains per call: the rules
of `PackedQueue._read_chain` (the reference, which stays) over numpy views of the
descriptor ring and the guest memory regions. Imported only by ring_jit.py, and only where
numba is installed.

As the split walk (split_walk_jit.py), it takes a chain only whole and only when it is
ordinary, and stops *before* the first it does not take — any broken rule, a buffer that
spans two regions, an indirect table not 8-byte aligned where it is mapped — for the
Python walk to take (raising its error, or handling the rare case). Unlike the split
ring, a packed ring has no index saying how many chains wait: each chain's first
descriptor says so in its flags, so the walk also ends, normally, at the first chain
that is not available.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from .packed import DESC_F_AVAIL, DESC_F_USED
from .ring import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE
from .split_walk_jit import find
from .views_jit import load_acquire_u16, u64s

F_NEXT, F_WRITE, F_INDIRECT = np.uint64(DESC_F_NEXT), np.uint64(DESC_F_WRITE), np.uint64(
    DESC_F_INDIRECT)
AVAIL_BITS = np.uint16(DESC_F_AVAIL | DESC_F_USED)
AVAIL, USED = np.uint16(DESC_F_AVAIL), np.uint16(DESC_F_USED)
LOW32, LOW16 = np.uint64(0xFFFFFFFF), np.uint64(0xFFFF)
S4, S32, S48 = np.uint64(4), np.uint64(32), np.uint64(48)
ZERO, EIGHT, SIXTEEN = np.uint64(0), np.uint64(8), np.uint64(16)
POS = 0x7FFF  # a cursor: position | wrap counter << 15 (as GET_VRING_BASE's halves)


@njit(cache=True, nogil=True)
def _segment(regions: Any, segs: Any, nseg: int, addr: Any, length: Any) -> bool:
    """Buffer [addr, addr + length) as segment `nseg`; False if it is not inside one
    region or there is no room."""
    r = find(regions, addr, length)
    if r < 0 or nseg >= segs.shape[0]:
        return False
    segs[nseg, 0] = r
    segs[nseg, 1] = np.int64(addr - regions[r, 0])
    segs[nseg, 2] = np.int64(length)
    return True


@njit(cache=True, nogil=True)
def walk(desc: Any, start: int, n: int, size: int, indirect_ok: bool, regions: Any,
         bases: Any, heads: Any, meta: Any, segs: Any) -> tuple[int, bool, int]:
    """Walk up to `n` chains from cursor `start`: each chain's buffer id into `heads`,
    (first segment, readable ones, writable ones, ring descriptors it takes) into `meta`,
    its buffers as (region, offset, length) into `segs`. Returns (how many it took whole,
    whether it ended at one that is not available — False: it took `n`, or stopped before
    one it leaves to the Python walk — the cursor past the last taken). `desc`: the ring's
    `size` descriptors as pairs of words (address; length, id, flags)."""
    pos, wrap = start & POS, start >> 15
    n = min(n, heads.shape[0], meta.shape[0])  # the caller's room, whatever it asked
    desc_at = np.uint64(desc.ctypes.data)
    nseg = 0
    total = 0  # descriptors taken (a ring holds no more than its size at once)
    for k in range(n):
        flags16 = load_acquire_u16(desc_at + SIXTEEN * np.uint64(pos) + np.uint64(14))
        if total >= size or flags16 & AVAIL_BITS != (AVAIL if wrap else USED):
            return k, True, pos | wrap << 15
        first = nseg
        nr = 0
        nw = 0
        count = 0
        p, w = pos, wrap
        while True:
            addr = desc[2 * p]
            word = desc[2 * p + 1]
            length = word & LOW32
            flags = word >> S48
            bid = np.int64((word >> S32) & LOW16)
            count += 1
            p += 1
            if p == size:
                p = 0
                w ^= 1
            if flags & F_INDIRECT:
                if (not indirect_ok or flags & F_NEXT or length == ZERO
                        or length % SIXTEEN != ZERO or length >> S4 > np.uint64(size)):
                    return k, False, pos | wrap << 15
                r = find(regions, addr, length)
                if r < 0:
                    return k, False, pos | wrap << 15
                at = bases[r] + (addr - regions[r, 0])  # where it is mapped here
                if at % EIGHT != ZERO:  # (read as words)
                    return k, False, pos | wrap << 15
                entries = np.int64(length >> S4)
                table = u64s(at, 2 * entries)  # inside the region: find said
                for e in range(entries):  # every entry, in order (NEXT means nothing)
                    a = table[2 * e]
                    wd = table[2 * e + 1]
                    ln = wd & LOW32
                    fl = wd >> S48
                    if fl & F_INDIRECT:
                        return k, False, pos | wrap << 15
                    if fl & F_WRITE:
                        if ln != ZERO:
                            if not _segment(regions, segs, nseg, a, ln):
                                return k, False, pos | wrap << 15
                            nseg += 1
                            nw += 1
                    elif nw:
                        return k, False, pos | wrap << 15  # readable after writable
                    elif ln != ZERO:
                        if not _segment(regions, segs, nseg, a, ln):
                            return k, False, pos | wrap << 15
                        nseg += 1
                        nr += 1
            elif length != ZERO:
                if flags & F_WRITE:
                    nw += 1
                elif nw:
                    return k, False, pos | wrap << 15  # readable after writable
                else:
                    nr += 1
                if not _segment(regions, segs, nseg, addr, length):
                    return k, False, pos | wrap << 15
                nseg += 1
            elif nw and not flags & F_WRITE:
                return k, False, pos | wrap << 15
            if not flags & F_NEXT:
                break
            if count >= size:
                return k, False, pos | wrap << 15  # longer than the ring
        heads[k] = bid
        meta[k, 0] = first
        meta[k, 1] = nr
        meta[k, 2] = nw
        meta[k, 3] = count
        pos, wrap = p, w
        total += count
    return n, False, pos | wrap << 15
