"""virtio-blk's common requests served in a compiled kernel (numba): imported only by
blk_kernel.py, and only where numba is installed. The rules are blk.py's `BlkQueue.serve`
and split.py's walk (the compiled one, split_walk_jit.py, is called for each chain); see
blk_kernel.py."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, types

from ..virtq.split_walk_jit import walk
from .blk_abi import SECTOR, T_IN, T_OUT

# ssize_t preadv/pwritev(int fd, const struct iovec *iov, int iovcnt, off_t offset): the
# iovec pointer passed as an address (an integer of the same width on every 64-bit ABI)
_IO = types.intp(types.int32, types.uintp, types.int32, types.int64)
preadv: Any = types.ExternalFunction("preadv", _IO)
pwritev: Any = types.ExternalFunction("pwritev", _IO)

HEADER = 16


@njit(cache=True, nogil=True)
def _u64(m: Any, off: int, size: int) -> Any:
    """A little-endian integer of `size` bytes at `off` of byte array `m`."""
    v = np.uint64(0)
    for j in range(size - 1, -1, -1):
        v = (v << np.uint64(8)) | np.uint64(m[off + j])
    return v


@njit(cache=True, nogil=True)
def serve(desc: Any, avail: Any, last: int, n: int, size: int, indirect_ok: bool,
          regions: Any, mems: Any, mem8: Any, bases: Any, heads: Any, meta: Any,
          segs: Any, iov: Any, used: Any, used_at: int, done: Any, fd: int, capacity: int,
          writes: bool) -> int:
    """Serve up to `n` requests from avail position `last`, each whole or not at all:
    walked by `walk`, read or written with preadv/pwritev, their status byte and used
    element (at used ring slots from `used_at` on) written. Stops before the first it does
    not serve: not a read or write of the usual layout (header alone, data, status byte
    alone), out of range or not whole sectors, a write when `writes` is off, an I/O that
    fails or transfers less than asked. Returns how many it served, their heads in `done`.
    `mem8`: the regions as byte arrays, `bases`: their addresses; `iov`: room for the iovec
    of one request."""
    n = min(n, done.shape[0])
    iov_at = iov.ctypes.data  # once: numba makes it at some cost
    for k in range(n):
        if walk(desc, avail, last + k, 1, size, indirect_ok, regions, mems, heads, meta,
                segs) != 1:
            return k
        nr, nw = meta[0, 1], meta[0, 2]
        if nr == 0 or nw == 0 or segs[0, 2] != HEADER or segs[nr + nw - 1, 2] != 1:
            return k
        hdr = mem8[segs[0, 0]]
        rtype = _u64(hdr, segs[0, 1], 4)
        sector = _u64(hdr, segs[0, 1] + 8, 8)
        if rtype == T_IN and nr == 1:
            first, count = 1, nw - 1
        elif rtype == T_OUT and nw == 1 and writes:
            first, count = 1, nr - 1
        else:
            return k
        if count == 0 or count > iov.shape[0]:
            return k
        total = 0
        for j in range(count):
            r, off, length = segs[first + j, 0], segs[first + j, 1], segs[first + j, 2]
            iov[j, 0] = bases[r] + np.uint64(off)
            iov[j, 1] = np.uint64(length)
            total += length
        if total % SECTOR or sector > np.uint64(capacity) or np.uint64(
                total // SECTOR) > np.uint64(capacity) - sector:
            return k
        at = np.int64(sector) * SECTOR
        if rtype == T_IN:
            moved = preadv(fd, iov_at, count, at)
            written = total + 1
        else:
            moved = pwritev(fd, iov_at, count, at)
            written = 1
        if moved != total:
            return k  # an error or a short transfer: blk.py's, which says what happened
        status = nr + nw - 1
        mem8[segs[status, 0]][segs[status, 1]] = 0  # S_OK
        slot = (used_at + k) & (size - 1)
        used[2 * slot] = np.uint32(heads[0])
        used[2 * slot + 1] = np.uint32(written)
        done[k] = heads[0]
    return n
