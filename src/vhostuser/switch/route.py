"""A burst's forwarding decisions in a compiled kernel (route_jit.py), where the compiled
walk is on (VHOSTUSER_JIT=1, virtq/split_kernel.py): one call learns every source and
finds every destination, frame by frame. `Switch.forward`'s array version is the
reference."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..devices.net_frames import Frames
from ..virtq.split_kernel import available as walk_available
from .mac_table import MacTable

log = logging.getLogger(__name__)

FLOOD, HAIRPIN, MIXED, SHORT = -1, -2, -3, -4  # route_jit.py's

_route: Any = None
_tried = False


def available() -> bool:
    """Whether the kernel is on; loaded the first time (before the switch's loop runs)."""
    global _route, _tried
    if not _tried and walk_available():
        _tried = True
        try:
            from . import route_jit

            _route = route_jit.route
            assert (route_jit.FLOOD, route_jit.HAIRPIN, route_jit.MIXED,
                    route_jit.SHORT) == (FLOOD, HAIRPIN, MIXED, SHORT)
            route(Frames.of([bytes(14)]), MacTable(1), 0, 0.0, 0.0)
        except Exception as e:  # it cannot compile here: the array version decides
            log.warning("compiled forwarding unavailable (%s): the array version serves", e)
            _route = None
    return _route is not None


def route(frames: Frames, table: MacTable, ingress: int, now: float,
          until: float) -> tuple[np.ndarray, int, int]:
    """Each frame's destination: a port's index, FLOOD, HAIRPIN or SHORT (sources learned
    at `ingress` until `until`); how many are HAIRPIN; the destination all share, or
    MIXED."""
    n = min(len(frames.offs), len(frames.lens))
    dest = np.empty(n, np.int32)
    hairpins, common = _route(frames.data, frames.offs, frames.lens, table.keys, table.ports,
                              table.expiry, table.count, np.uint64(table.multiplier),
                              table.limit, ingress, now, until, dest)
    return dest, hairpins, common
