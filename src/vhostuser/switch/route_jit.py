"""The switch's forwarding decisions in a compiled kernel (numba): imported only by
route.py, and only where numba is installed. The rules are core.py's `Switch.forward`
(frame by frame: learn the source, then look the destination up); the table is
mac_table.py's, whose hash and probing this repeats."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from ..devices.net_frames import FX_DATA, FX_DATA_LEN, FX_LENS, FX_OFFS
from ..virtq.views_jit import f64s, i32s, i64s, load_u64, u8s, u64s
from .mac_table import PRESENT, SLOTS_LOG2

SHIFT = np.uint64(64 - SLOTS_LOG2)
FLOOD, HAIRPIN, MIXED, SHORT = -1, -2, -3, -4  # a frame's destination besides a port's
# index; MIXED: the burst's frames do not all go to the same one; SHORT: not a frame of
# `data` with an Ethernet header (never from a port: they drop runts; dropped here too)


@njit(cache=True, nogil=True)
def _mac(data: Any, at: int) -> Any:
    k = np.uint64(PRESENT)
    for j in range(6):
        k |= np.uint64(data[at + j]) << np.uint64(8 * (5 - j))
    return k


@njit(cache=True, nogil=True)
def _slot(keys: Any, multiplier: Any, key: Any) -> Any:
    mask = keys.shape[0] - 1
    i = np.int64((key * multiplier) >> SHIFT)
    while True:
        k = keys[i]
        if k == key or k == 0:
            return i
        i = (i + 1) & mask


@njit(cache=True, nogil=True)
def _same_addresses(base: Any, a: int, b: int) -> bool:
    """Whether the 12 bytes at `base + a` and `base + b` are equal (as bytes 0-7 and 4-11:
    two loads each: 5.7 ns a frame where a loop over bytes took 14.5, hot, on one core)."""
    pa, pb = base + np.uintp(a), base + np.uintp(b)
    return bool(load_u64(pa) == load_u64(pb) and load_u64(pa + 4) == load_u64(pb + 4))


@njit(cache=True, nogil=True)
def route(data: Any, offs: Any, lens: Any, keys: Any, ports: Any, expiry: Any, count: Any,
          multiplier: Any, limit: Any, ingress: int, now: float, until: float,
          dest: Any) -> tuple[int, int]:
    """For each frame (at data[offs[f]:], an Ethernet header at least) in order: learn its
    unicast source at port `ingress` until `until` (a new station only while the table
    holds fewer than `limit`), then set dest[f] to its destination's port, HAIRPIN if that
    is `ingress`, FLOOD if it is multicast, unknown or expired at `now`. Returns (how
    many are HAIRPIN, the destination all frames share or MIXED). `dest`, `offs` and
    `lens` are of one length (route.py makes them so)."""
    hairpins = 0
    prev = -1
    base = np.uintp(data.ctypes.data)
    for f in range(dest.shape[0]):
        at = offs[f]
        if at < 0 or lens[f] < 12 or at > data.shape[0] - 12:
            dest[f] = SHORT
            prev = -1
            continue
        if prev >= 0 and _same_addresses(base, at, prev):
            # as the frame before (learning its source again changes nothing, and the
            # table is as that frame's look-up left it): a flow's frames come in a row
            dest[f] = dest[f - 1]
            if dest[f] == HAIRPIN:
                hairpins += 1
            continue
        prev = at
        if not data[at + 6] & 1:
            src = _mac(data, at + 6)
            i = _slot(keys, multiplier, src)
            if keys[i] == src or count[0] < limit:
                if keys[i] != src:
                    keys[i] = src
                    count[0] += 1
                ports[i] = ingress
                expiry[i] = until
        if data[at] & 1:
            dest[f] = FLOOD
            continue
        dst = _mac(data, at)
        i = _slot(keys, multiplier, dst)
        if keys[i] == dst and expiry[i] >= now:
            if ports[i] == ingress:
                dest[f] = HAIRPIN
                hairpins += 1
            else:
                dest[f] = ports[i]
        else:
            dest[f] = FLOOD
    common = dest[0] if dest.shape[0] else MIXED
    for f in range(1, dest.shape[0]):
        if dest[f] != common:
            common = MIXED
            break
    return hairpins, common


# A table's context (virtq/views_jit.py): its arrays' addresses, their length, its hash
# multiplier and its limit.
KEYS, PORTS, EXPIRY, COUNT, SLOTS, MULTIPLIER, LIMIT = range(7)


def table_ctx(keys: Any, ports: Any, expiry: Any, count: Any, multiplier: int,
              limit: int) -> Any:
    """The context of a table of these arrays (the caller keeps them while it is used)."""
    n = len(keys)
    if not (keys.dtype == np.uint64 and ports.dtype == np.int32 and expiry.dtype == np.float64
            and count.dtype == np.int64 and len(ports) == len(expiry) == n and len(count) == 1
            and n == 1 << SLOTS_LOG2
            and all(a.flags.c_contiguous and a.ndim == 1 for a in (keys, ports, expiry, count))):
        raise ValueError("not the arrays of a MAC table")
    return np.array([keys.ctypes.data, ports.ctypes.data, expiry.ctypes.data,
                     count.ctypes.data, n, multiplier, limit], np.uint64)


@njit(cache=True, nogil=True)
def route_at(table: Any, fx: Any, nframes: int, dest_at: int, ingress: int, now: float,
             until: float) -> tuple[int, int]:
    """`route` over a table's context, the context of `nframes` frames (net_frames.py's)
    and the address of `dest` (room for `nframes`)."""
    n = table[SLOTS]
    return route(u8s(fx[FX_DATA], fx[FX_DATA_LEN]), i64s(fx[FX_OFFS], nframes),
                 i64s(fx[FX_LENS], nframes), u64s(table[KEYS], n), i32s(table[PORTS], n),
                 f64s(table[EXPIRY], n), i64s(table[COUNT], 1), table[MULTIPLIER],
                 np.int64(table[LIMIT]), ingress, now, until, i32s(dest_at, nframes))
