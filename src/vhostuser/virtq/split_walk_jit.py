"""The compiled split-ring walk (numba): imported only by kernel_walk.py, and only where
numba is installed. The rules are split.py's `read_chain`; see kernel_walk.py."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from .prefetch_jit import prefetch
from .ring import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE
from .views_jit import u64s

F_NEXT, F_WRITE, F_INDIRECT = np.uint64(DESC_F_NEXT), np.uint64(DESC_F_WRITE), np.uint64(
    DESC_F_INDIRECT)
LOW32, LOW16 = np.uint64(0xFFFFFFFF), np.uint64(0xFFFF)
S4, S32, S48 = np.uint64(4), np.uint64(32), np.uint64(48)
ZERO, EIGHT, SIXTEEN = np.uint64(0), np.uint64(8), np.uint64(16)
AHEAD = 8


@njit(cache=True, nogil=True)
def find(regions: Any, addr: Any, length: Any) -> int:
    """The region (start, bytes) holding [addr, addr + length), or -1; no sum is formed,
    so nothing wraps past 2^64 (a region may end exactly there)."""
    for r in range(regions.shape[0]):
        lo, n = regions[r, 0], regions[r, 1]
        if addr >= lo and addr - lo < n and length <= n - (addr - lo):
            return r
    return -1


@njit(cache=True, nogil=True)
def walk(desc: Any, avail: Any, last: int, n: int, size: int, indirect_ok: bool,
         regions: Any, bases: Any, heads: Any, meta: Any, segs: Any) -> int:
    """Walk up to `n` chains from avail position `last`: each chain's head into `heads`,
    (first segment, readable ones, writable ones, 1) into `meta`, its buffers as (region,
    offset, length) into `segs`. Returns how many chains were taken whole. `regions`:
    (guest-physical start, bytes) of each region mapped at the address in `bases`; `desc`
    holds `size` descriptors, `avail` `size` entries (the caller makes them so)."""
    nseg = 0
    cap = segs.shape[0]
    n = min(n, heads.shape[0], meta.shape[0])  # the caller's room, whatever it asked
    # a batch: the descriptors of the chains AHEAD places on are prefetched (the driver
    # wrote them on another CPU); an address is dear to make, so not for one chain
    desc_at = np.uint64(desc.ctypes.data) if n > AHEAD else ZERO
    for k in range(n):
        if k + AHEAD < n and desc_at:
            ahead = np.uint64(avail[(last + k + AHEAD) & (size - 1)])
            if ahead < np.uint64(size):
                prefetch(desc_at + SIXTEEN * ahead)
        head = np.int64(avail[(last + k) & (size - 1)])  # a power of 2: split.py checks
        if head >= size:
            return k
        table = desc
        tlen = np.int64(size)
        in_indirect = False
        seen = 0
        nr = 0
        nw = 0
        first = nseg
        i = head
        while True:
            if i >= tlen:
                return k
            seen += 1
            if seen > tlen:
                return k  # a loop
            addr = table[2 * i]
            word = table[2 * i + 1]
            length = word & LOW32
            flags = (word >> S32) & LOW16
            if flags & F_INDIRECT:
                if (not indirect_ok or in_indirect or flags & F_NEXT or length == ZERO
                        or length % SIXTEEN != ZERO or length >> S4 > np.uint64(size)):
                    return k
                r = find(regions, addr, length)
                if r < 0:
                    return k
                at = bases[r] + (addr - regions[r, 0])  # where it is mapped here
                if at % EIGHT != ZERO:  # (read as words below)
                    return k
                tlen = np.int64(length >> S4)
                table = u64s(at, 2 * tlen)  # inside the region: find said
                in_indirect = True
                i = np.int64(0)
                seen = 0
                continue
            if length != ZERO:
                r = find(regions, addr, length)
                if r < 0 or nseg >= cap:
                    return k
                if flags & F_WRITE:
                    nw += 1
                elif nw:
                    return k  # readable after writable
                else:
                    nr += 1
                segs[nseg, 0] = r
                segs[nseg, 1] = np.int64(addr - regions[r, 0])
                segs[nseg, 2] = np.int64(length)
                nseg += 1
            elif nw and not flags & F_WRITE:
                return k
            if not flags & F_NEXT:
                break
            i = np.int64(word >> S48)
        heads[k] = head
        meta[k, 0] = first
        meta[k, 1] = nr
        meta[k, 2] = nw
        meta[k, 3] = 1  # (a split ring's chain is one entry of its avail ring)
    return n
