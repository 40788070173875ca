"""virtio-blk's common requests served in a compiled kernel (numba): imported only by
blk_kernel.py, and only where numba is installed. The rules are blk.py's `BlkQueue.serve`
and the ring's walk (the compiled one, ring_jit.py, is called for each chain); see
blk_kernel.py."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, types

from ..virtq.ring_jit import done as ring_done
from ..virtq.ring_jit import put_used, ring_views, walk
from ..virtq.views_jit import i64_rows, i64s, u8s, u64_rows
from .blk_abi import S_IOERR, S_OK, SECTOR, T_FLUSH, T_IN, T_OUT

# ssize_t preadv/pwritev(int fd, const struct iovec *iov, int iovcnt, off_t offset): the
# iovec pointer passed as an address (an integer of the same width on every 64-bit ABI)
_IO = types.intp(types.int32, types.uintp, types.int32, types.int64)
preadv: Any = types.ExternalFunction("preadv", _IO)
pwritev: Any = types.ExternalFunction("pwritev", _IO)
fdatasync: Any = types.ExternalFunction("fdatasync", types.intc(types.intc))
_INT_AT: Any = types.CPointer(types.intc)  # type: ignore[no-untyped-call]
errno_at: Any = types.ExternalFunction("__errno_location", _INT_AT())  # int *(void)

HEADER = 16


@njit(cache=True, nogil=True)
def _u64(m: Any, off: int, size: int) -> Any:
    """A little-endian integer of `size` bytes at `off` of byte array `m`."""
    v = np.uint64(0)
    for j in range(size - 1, -1, -1):
        v = (v << np.uint64(8)) | np.uint64(m[off + j])
    return v


@njit(cache=True, nogil=True, inline="always")
def _bytes_at(bases: Any, segs: Any, s: int) -> Any:
    """Buffer segs[s] as a byte array."""
    return u8s(bases[segs[s, 0]] + np.uint64(segs[s, 1]), segs[s, 2])


@njit(cache=True, nogil=True)
def serve(desc: Any, avail: Any, used: Any, size: int, indirect: bool, packed: bool,
          regions: Any, bases: Any, segs: Any, state: Any, last: int, n: int, heads: Any,
          meta: Any, iov: Any, used_at: int, done: Any, fd: int, capacity: int,
          writable: bool, writeback: bool, failed: Any) -> int:
    """Serve up to `n` requests of a ring (its arrays, ring_jit.ring_views's) from avail cursor
    `last`, each whole or not at all: walked by `walk`, read or written with preadv/pwritev (a
    write followed by fdatasync unless `writeback`), a flush with fdatasync (`writable` only),
    their status byte and used element (from used cursor `used_at` on) written, the cursor past
    them left in the ring's state. Stops before the first it does not serve: not a read, write
    or flush of the usual layout (header alone, data, status byte alone; a flush without data),
    out of range or not whole sectors, a write when not `writable`, a read or write that fails
    or transfers less than asked. A failed fdatasync is not retried (the error would be
    reported once): the request is completed with S_IOERR and `failed` records it: failed[0, 0]
    counts them, row i (from 1) holds the i-th one's errno, type and sector, as far as there
    are rows (blk_kernel.py logs them). Returns how many it served, their heads in `done`;
    `heads` and `meta` are room for one chain's, `iov` for the iovec of one request."""
    n = min(n, done.shape[0])
    iov_at = iov.ctypes.data  # once: numba makes it at some cost
    cur = used_at
    served = n
    for k in range(n):
        got, _, nxt = walk(desc, avail, size, indirect, packed, regions, bases, last, 1,
                           heads, meta, segs)
        if got != 1:
            served = k
            break
        last = nxt
        nr, nw = meta[0, 1], meta[0, 2]
        if nr == 0 or nw == 0 or segs[0, 2] != HEADER or segs[nr + nw - 1, 2] != 1:
            served = k
            break
        hdr = _bytes_at(bases, segs, 0)
        rtype = _u64(hdr, 0, 4)
        sector = _u64(hdr, 8, 8)
        status = S_OK
        if rtype == T_FLUSH and nr == 1 and nw == 1:
            written = 1
            sync = writable
        else:
            if rtype == T_IN and nr == 1:
                first, count = 1, nw - 1
            elif rtype == T_OUT and nw == 1 and writable:
                first, count = 1, nr - 1
            else:
                served = k
                break
            if count == 0 or count > iov.shape[0]:
                served = k
                break
            total = 0
            for j in range(count):
                reg, off, length = segs[first + j, 0], segs[first + j, 1], segs[first + j, 2]
                iov[j, 0] = bases[reg] + np.uint64(off)
                iov[j, 1] = np.uint64(length)
                total += length
            if total % SECTOR or sector > np.uint64(capacity) or np.uint64(
                    total // SECTOR) > np.uint64(capacity) - sector:
                served = k
                break
            at = np.int64(sector) * SECTOR
            if rtype == T_IN:
                moved = preadv(fd, iov_at, count, at)
                written = total + 1
            else:
                moved = pwritev(fd, iov_at, count, at)
                written = 1
            if moved != total:
                served = k
                break  # an error or a short transfer: blk.py's, which says what happened
            sync = rtype == T_OUT and not writeback
        if sync and fdatasync(fd) != 0:
            e = errno_at()[0]
            failed[0, 0] += 1
            row = failed[0, 0]
            if row < failed.shape[0]:
                failed[row, 0] = e
                failed[row, 1] = rtype
                failed[row, 2] = np.int64(sector)
            status = S_IOERR
            written = 1
        _bytes_at(bases, segs, nr + nw - 1)[0] = status
        cur = put_used(used, state, size, packed, cur, heads[0], written, meta[0, 3])
        done[k] = heads[0]
    ring_done(desc, state, cur)
    return served


# What `serve_at` is given besides a ring's context (ring_jit.py): the addresses of
# the kernel's own arrays (a chain's head and meta, the iovec, the failed syncs), the
# iovec's length and the failed syncs' rows.
HEADS, META, IOV, IOV_LEN, FAILED, FAILED_ROWS = range(6)


def serve_ctx(heads: Any, meta: Any, iov: Any, failed: Any) -> Any:
    """A context over these arrays (the caller keeps them while it is used)."""
    if not (heads.dtype == meta.dtype == failed.dtype == np.int64 and iov.dtype == np.uint64
            and heads.shape == (1,) and meta.shape == (1, 4) and iov.ndim == 2
            and iov.shape[1] == 2 and failed.ndim == 2 and failed.shape[1] == 3
            and len(failed) >= 1
            and all(a.flags.c_contiguous for a in (heads, meta, iov, failed))):
        raise ValueError("not the arrays of a blk context")
    return np.array([heads.ctypes.data, meta.ctypes.data, iov.ctypes.data, len(iov),
                     failed.ctypes.data, len(failed)], np.uint64)


@njit(cache=True, nogil=True)
def serve_at(ring: Any, own: Any, last: int, n: int, used_at: int, fd: int, capacity: int,
             writable: bool, writeback: bool) -> int:
    """`serve` over a ring's context and its own; the heads served go to the ring's
    heads array (which `serve` does not use: it walks a chain at a time into its own)."""
    r = ring_views(ring)
    return serve(r.desc, r.avail, r.used, r.size, r.indirect, r.packed, r.regions, r.bases,
                 r.segs, r.state, last, n, i64s(own[HEADS], 1), i64_rows(own[META], 1, 4),
                 u64_rows(own[IOV], own[IOV_LEN], 2), used_at, r.heads, fd, capacity,
                 writable, writeback, i64_rows(own[FAILED], own[FAILED_ROWS], 3))
