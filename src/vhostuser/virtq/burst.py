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
    """A burst of single-descriptor chains, all in the region `view`/`u8`."""

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
    """Pop `n` available chains if every one is a single direct descriptor with exactly
    `flags` (0: readable; DESC_F_WRITE: writable) in the same region; otherwise pop
    nothing and return None."""
    a = q.burst_arrays()
    size = q.size
    start = q.last_avail % size
    if start + n <= size:
        heads = a.avail[start : start + n].copy()  # a snapshot: the driver may write on
    else:
        heads = np.concatenate((a.avail[start:], a.avail[: start + n - size]))
    if int(heads.max()) >= size:
        return None
    d = a.desc[heads]  # gathered copies: checked and used values are the same
    if (d["flags"] != flags).any():
        return None
    addr = d["addr"]
    lengths = d["len"].astype(np.int64)
    lo_addr, hi_addr = int(addr.min()), int(addr.max())
    for lo, hi, u8, view in a.regions:
        if lo <= lo_addr and hi_addr <= hi:
            if (lengths > (hi - addr).astype(np.int64)).any():  # addr <= hi: no wrap
                return None
            q.last_avail = (q.last_avail + n) & 0xFFFF
            return DirectBurst(heads, (addr - lo).astype(np.int64), lengths, u8, view)
    return None


def scatter_frames(b: DirectBurst, header: bytes, frames: list[bytes]) -> np.ndarray | None:
    """Write `header` + frame i into buffer i of a writable burst: the headers with one
    array store, each frame with one copy (a byte-indexed numpy scatter of the frames was
    measured slower from 128 B up, and no faster at 64 B). Returns the lengths written, or
    None (nothing written) if a frame does not fit its buffer."""
    hl = len(header)
    lens = np.fromiter(map(len, frames), np.int64, len(frames))
    need = lens + hl
    if (need > b.lengths[: len(frames)]).any():
        return None
    offs = b.offsets[: len(frames)]
    if hl:
        b.u8[offs[:, None] + np.arange(hl)] = np.frombuffer(header, np.uint8)
    view = b.view
    for o, f in zip((offs + hl).tolist(), frames, strict=True):
        view[o : o + len(f)] = f
    return need


def push_heads(q: SplitQueue, heads: np.ndarray, written: np.ndarray | int = 0) -> None:
    """Write used elements (head, written) for a burst; visible at the next publish."""
    a = q.burst_arrays()
    pos = (q.used_idx + np.arange(len(heads))) % q.size
    a.used[1 + 2 * pos] = heads
    a.used[2 + 2 * pos] = written
    q.used_idx = (q.used_idx + len(heads)) & 0xFFFF
