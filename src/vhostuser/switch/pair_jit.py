"""A burst from one port of a two-port switch to the other in one compiled call (numba):
imported only by pair.py, and only where numba is installed. It runs the kernels the
usual path calls one by one — the transmit kernel (devices/net_serve_jit.py), the
forwarding decisions (route_jit.py), the receive kernel — and nothing else, so the
rules are theirs; what it saves is the Python between them."""

from __future__ import annotations

from typing import Any

from numba import njit

from ..devices.net_serve_jit import NOUT, OUT, PASSED, put_at, take_at
from ..virtq.views_jit import i32s, i64s
from .route_jit import FLOOD, route_at


@njit(cache=True, nogil=True)
def forward_at(ring_a: Any, port_a: Any, last_a: int, n_a: int, used_a: int, hl_a: int,
               max_frame_a: int, table: Any, fx: Any, dest_at: int, ingress: int, now: float,
               until: float, target: int, ring_b: Any, rx: Any, last_b: int, n_b: int,
               used_b: int, hl_b: int, mrg_b: bool,
               max_frame_b: int) -> tuple[int, int]:
    """Take up to `n_a` chains of port A's transmit ring (`take_at`, into the frame array
    of transmit context `port_a`, whose frames' context is `fx`; no offloads), decide
    where each frame kept goes (`route_at`: sources learned at port `ingress`, the
    destinations at `dest_at`) and, where every one goes to port `target` or floods (the
    switch has two ports: flooding is to `target`), deliver them into port B's receive
    ring (`put_at`, receive context `rx`). Returns (how many chains of A it took, how
    many of B it used: -1 where it delivered nothing, the frames kept waiting in the
    frame array and their destinations at `dest_at`)."""
    k = take_at(ring_a, port_a, last_a, n_a, used_a, hl_a, max_frame_a, False)
    kept = i64s(port_a[OUT], NOUT)[PASSED]
    if kept == 0:
        return k, -1
    route_at(table, fx, kept, dest_at, ingress, now, until)
    dest = i32s(dest_at, kept)
    for f in range(kept):
        if dest[f] != target and dest[f] != FLOOD:
            return k, -1
    return k, put_at(ring_b, rx, last_b, n_b, used_b, hl_b, mrg_b, max_frame_b, fx, kept,
                     False)
