"""A burst's forwarding decisions in a compiled kernel (route_jit.py), where the compiled
walk is on (VHOSTUSER_JIT=1, virtq/kernel_walk.py): one call learns every source and
finds every destination, frame by frame. `Switch.forward`'s array version is the
reference."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..devices.net_frames import Frames
from ..virtq.kernel_walk import available as walk_available
from .mac_table import MacTable

log = logging.getLogger(__name__)

FLOOD, HAIRPIN, MIXED, SHORT = -1, -2, -3, -4  # route_jit.py's

_jit: Any = None  # route_jit, once loaded
_tried = False


def available() -> bool:
    """Whether the kernel is on; loaded the first time (before the switch's loop runs)."""
    global _jit, _tried
    if not _tried and walk_available():
        _tried = True
        try:
            from . import route_jit

            _jit = route_jit
            assert (route_jit.FLOOD, route_jit.HAIRPIN, route_jit.MIXED,
                    route_jit.SHORT) == (FLOOD, HAIRPIN, MIXED, SHORT)
            route(Frames.of([bytes(14)]), MacTable(1), 0, 0.0, 0.0)
        except Exception as e:  # it cannot compile here: the array version decides
            log.warning("compiled forwarding unavailable (%s): the array version serves", e)
            _jit = None
    return _jit is not None


def route(frames: Frames, table: MacTable, ingress: int, now: float,
          until: float) -> tuple[np.ndarray, int, int]:
    """Each frame's destination: a port's index, FLOOD, HAIRPIN or SHORT (sources learned
    at `ingress` until `until`); how many are HAIRPIN; the destination all share, or
    MIXED. The destinations are valid until the next call."""
    n = min(len(frames.offs), len(frames.lens))
    ctx, dest_at = kernel_args(table, n)
    hairpins, common = _jit.route_at(ctx, frames.kernel_ctx(), n, dest_at, ingress, now,
                                     until)
    return _dest[:n], hairpins, common


def kernel_args(table: MacTable, n: int) -> tuple[Any, int]:
    """What route_jit.route_at is given for `n` frames besides them: `table`'s context
    and the address of the destinations (`destinations`)."""
    global _dest, _dest_at
    if len(_dest) < n:
        _dest = np.empty(max(n, 2 * len(_dest)), np.int32)
        _dest_at = _dest.ctypes.data
    if table.kernel_ctx is None:  # (made once: the table keeps its arrays)
        table.kernel_ctx = _jit.table_ctx(table.keys, table.ports, table.expiry, table.count,
                                          table.multiplier, table.limit)
    return table.kernel_ctx, _dest_at


def destinations(n: int) -> np.ndarray:
    """The first `n` destinations the last kernel run decided (valid until the next)."""
    return _dest[:n]


_dest = np.empty(1024, np.int32)  # the destinations (one thread: the switch's loop)
_dest_at: int = _dest.ctypes.data
