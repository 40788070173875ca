"""Whole bursts of a split ring in a few numpy operations: the fast path for the common
shape of a transmit ring, where every chain is one readable, direct descriptor (virtio-net
with VERSION_1 puts the header in front of the frame: Linux and DPDK both do).

`pop_direct` reads the heads and descriptors of a burst with array gathers and checks them
all at once — head in range, no NEXT/INDIRECT/WRITE flag, buffer inside one memory region
(computed so that a hostile address cannot wrap around). Anything else returns None and the
caller takes the chain-by-chain path (`SplitQueue.pop_batch`), which reports the precise
error. `push_heads` writes a burst of used elements with one scatter.

The arrays are views of guest memory made once per queue; `SplitQueue.release` drops them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .split import SplitQueue

DESC = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])


@dataclass
class BurstArrays:
    """numpy views of one queue's rings and of the guest memory regions."""

    desc: np.ndarray  # DESC[size]
    avail: np.ndarray  # u16[size]: the avail ring's entries
    used: np.ndarray  # u32[1 + 2 * size]: [0] is flags+idx, then (id, len) pairs
    regions: list[tuple[int, int, np.ndarray, memoryview]]  # (gpa lo, gpa hi, u8, view)


@dataclass
class DirectBurst:
    """A burst of single-descriptor chains, all in the region `view`/`u8` (maybe fewer
    than asked for: see `pop_direct`)."""

    heads: np.ndarray  # u16
    offsets: np.ndarray  # i64: each buffer's offset in the region
    lengths: np.ndarray  # i64
    u8: np.ndarray
    view: memoryview


def arrays(q: SplitQueue) -> BurstArrays:
    size = q.size
    return BurstArrays(
        np.frombuffer(q.desc, DESC, count=size),
        np.frombuffer(q.avail_ring, np.uint16, count=size),
        np.frombuffer(q.used, np.uint32, count=1 + 2 * size),
        [(lo, hi, np.frombuffer(view, np.uint8), view) for lo, hi, view in q._regions],
    )


def pop_direct(q: SplitQueue, n: int, flags: int = 0) -> DirectBurst | None:
    """Pop the longest run, from the front of the next `n` available chains, of single
    direct descriptors with exactly `flags` (0: readable; DESC_F_WRITE: writable) inside
    the memory region of the first one. None (nothing popped) if the first chain is not
    such: the chain walk then takes it, and reports it if it is broken."""
    a = q.burst_arrays()
    size = q.size
    start = q.last_avail % size
    if start + n <= size:
        heads = a.avail[start : start + n].copy()  # a snapshot: the driver may write on
    else:
        heads = np.concatenate((a.avail[start:], a.avail[: start + n - size]))
    if int(heads.max()) < size:  # the usual case first: the whole burst qualifies
        d = a.desc[heads]  # gathered copies: checked and used values agree
        if not (d["flags"] != flags).any():
            addr, lengths = d["addr"], d["len"].astype(np.uint64)
            lo_addr, hi_addr = int(addr.min()), int(addr.max())
            for lo, hi, u8, view in a.regions:
                if lo <= lo_addr and hi_addr <= hi:  # addr <= hi: hi - addr cannot wrap
                    if (lengths > np.uint64(hi) - addr).any():
                        break
                    return _take(q, n, heads, addr - np.uint64(lo), lengths, u8, view)
    return _pop_run(q, a, heads, flags)


def _pop_run(q: SplitQueue, a: BurstArrays, heads: np.ndarray,
             flags: int) -> DirectBurst | None:
    """`pop_direct` when not every chain qualifies: the leading run that does."""
    ok = heads < q.size
    d = a.desc[np.where(ok, heads, 0)]
    ok &= d["flags"] == flags
    if not ok[0]:
        return None
    addr, lengths = d["addr"], d["len"].astype(np.uint64)
    first = int(addr[0])
    for lo, hi, u8, view in a.regions:
        if lo <= first <= hi:
            top = np.uint64(hi)
            # addr <= hi first, so that hi - addr cannot wrap (nor addr + len pass 2^64)
            ok &= (addr >= np.uint64(lo)) & (addr <= top) & (lengths <= top - addr)
            k = len(ok) if ok.all() else int(np.argmin(ok))
            if not k:
                return None
            return _take(q, k, heads[:k], addr[:k] - np.uint64(lo), lengths[:k], u8, view)
    return None


def _take(q: SplitQueue, k: int, heads: np.ndarray, offsets: np.ndarray,
          lengths: np.ndarray, u8: np.ndarray, view: memoryview) -> DirectBurst:
    q.last_avail = (q.last_avail + k) & 0xFFFF
    return DirectBurst(heads, offsets.astype(np.int64), lengths.astype(np.int64), u8, view)


def scatter_frames(b: DirectBurst, header: bytes, data: np.ndarray, offs: np.ndarray,
                   lens: np.ndarray) -> np.ndarray | None:
    """Write `header` + frame i (data[offs[i] : offs[i] + lens[i]]) into buffer i of a
    writable burst: the headers with one
    array store, each frame with one copy (a byte-indexed numpy scatter of the frames was
    measured slower from 128 B up, and no faster at 64 B). Returns the lengths written, or
    None (nothing written) if a frame does not fit its buffer."""
    hl = len(header)
    need = lens + hl
    if (need > b.lengths[: len(lens)]).any():
        return None
    at = b.offsets[: len(lens)]
    if hl:
        b.u8[at[:, None] + np.arange(hl)] = np.frombuffer(header, np.uint8)
    view, src = b.view, data.data
    for o, s, n in zip((at + hl).tolist(), offs.tolist(), lens.tolist(), strict=True):
        view[o : o + n] = src[s : s + n]
    return need


def push_heads(q: SplitQueue, heads: np.ndarray, written: np.ndarray | int = 0) -> None:
    """Write used elements (head, written) for a burst; visible at the next publish."""
    a = q.burst_arrays()
    pos = (q.used_idx + np.arange(len(heads))) % q.size
    a.used[1 + 2 * pos] = heads
    a.used[2 + 2 * pos] = written
    q.used_idx = (q.used_idx + len(heads)) & 0xFFFF
