"""A burst from one port of a two-port switch to the other in one compiled call (numba):
imported only by pair.py, and only where numba is installed. It runs the kernels the
usual path calls one by one — the transmit kernel (devices/net_serve_jit.py), the
forwarding decisions (route_jit.py), the receive kernel — so the rules are theirs; what
it saves is the Python between them and, on a split ring, one copy of each frame that
lies in one buffer: taken `direct`, only its headers are copied into the frame array
(where they are checked and decided on), and the receive kernel copies the frame from
the sender's buffer, its addresses from the frame array. The sender's chains are not
its own again until the used index is stored, after the call; what it writes into its
buffers meanwhile is its own frame's business, but for the addresses the decision was
made on, which go as they were seen. (Where one guest owns both ports, the two buffers may
be one memory mapped twice: the copy stays inside both, and spoils only that guest's
frame.)"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from ..devices.net_frames import FX_DATA, FX_DATA_LEN, FX_LENS, FX_OFFS
from ..devices.net_serve_jit import (
    ASKS_AT,
    CHAINS,
    DATA,
    DATA_LEN,
    DROPS,
    ETH_HLEN,
    FRAMES,
    FRAMES_LEN,
    HDR,
    LENS,
    NDROPS,
    NOUT,
    OFFS,
    OUT,
    PASSED,
    VNET,
    memcpy,
    put,
    take,
)
from ..virtq.ring_jit import ring_views
from ..virtq.views_jit import i32s, i64s, u8_rows, u8s, u64s
from .route_jit import FLOOD, route_at


@njit(cache=True, nogil=True)
def _whole(arena: Any, offs: Any, lens: Any, srcs: Any, first: int, stop: int) -> None:
    """Frames first..stop-1 whole in the frame array: the rest of those taken `direct`
    copied behind the headers that were checked and decided on."""
    base = np.uint64(arena.ctypes.data)
    for f in range(first, stop):
        if srcs[f] != 0:
            memcpy(base + np.uint64(offs[f] + ETH_HLEN), srcs[f] + np.uint64(ETH_HLEN),
                   lens[f] - ETH_HLEN)


@njit(cache=True, nogil=True)
def forward_at(ring_a: Any, port_a: Any, last_a: int, n_a: int, used_a: int, hl_a: int,
               max_frame_a: int, srcs_at: int, table: Any, fx: Any, dest_at: int,
               ingress: int, now: float, until: float, target: int, ring_b: Any, rx: Any,
               last_b: int, n_b: int, used_b: int, hl_b: int, mrg_b: bool,
               max_frame_b: int) -> tuple[int, int]:
    """Take up to `n_a` chains of port A's transmit ring (`take`, into the frame array
    of transmit context `port_a`, whose frames' context is `fx`; no offloads; `direct`
    on a split ring, the addresses at `srcs_at`), decide where each frame kept goes
    (`route_at`: sources learned at port `ingress`, the destinations at `dest_at`) and,
    where every one goes to port `target` or floods (the switch has two ports: flooding
    is to `target`), deliver them into port B's receive ring (`put`, receive context
    `rx`). Returns (how many chains of A it took, how many of B it used: -1 where it
    delivered nothing, the frames kept waiting whole in the frame array and their
    destinations at `dest_at`); the frames the receive kernel stopped before wait whole
    in the frame array too."""
    a = ring_views(ring_a)
    nf = port_a[FRAMES_LEN]
    arena = u8s(port_a[DATA], port_a[DATA_LEN])
    offs, lens = i64s(port_a[OFFS], nf), i64s(port_a[LENS], nf)
    srcs = u64s(srcs_at, nf)
    direct = not a.packed
    take(a.desc, a.avail, a.used, a.size, a.indirect, a.packed, a.regions, a.bases, a.heads,
         a.meta, a.segs, a.state, last_a, n_a, used_a, hl_a, max_frame_a, False, arena,
         offs, lens, u8s(port_a[ASKS_AT], nf), u8_rows(port_a[VNET], nf, 10),
         i64s(port_a[DROPS], NDROPS), i64s(port_a[OUT], NOUT), direct, srcs)
    k = i64s(port_a[OUT], NOUT)[CHAINS]
    kept = i64s(port_a[OUT], NOUT)[PASSED]
    if kept == 0:
        return k, -1
    route_at(table, fx, kept, dest_at, ingress, now, until)
    dest = i32s(dest_at, kept)
    to_b = True
    for f in range(kept):
        if dest[f] != target and dest[f] != FLOOD:
            to_b = False
            break
    if not to_b:
        if direct:
            _whole(arena, offs, lens, srcs, 0, kept)
        return k, -1
    b = ring_views(ring_b)
    put(b.desc, b.avail, b.used, b.size, b.indirect, b.packed, b.regions, b.bases, b.heads,
        b.meta, b.segs, b.state, last_b, n_b, used_b, hl_b, mrg_b, max_frame_b,
        u8s(fx[FX_DATA], fx[FX_DATA_LEN]), i64s(fx[FX_OFFS], kept), i64s(fx[FX_LENS], kept),
        u8_rows(0, 0, 10), False, u8s(rx[HDR], 12), i64s(rx[DROPS], NDROPS),
        i64s(rx[OUT], NOUT), srcs[:kept] if direct else srcs[:0])
    out = i64s(rx[OUT], NOUT)
    if direct:
        _whole(arena, offs, lens, srcs, out[FRAMES], kept)
    return k, out[CHAINS]
