"""A burst from one port of a two-port switch to the other in one compiled call
(pair_jit.py), where the usual path makes three (`VhostPort.take_tx`, `Switch.forward`'s
decisions, `VhostPort.deliver`) with Python between them (bench/RESULTS.md, net_dpdk
2026-12-02 14:12 and the entries after it). The same kernels run in the same order on
the same arrays, so the usual path is the reference; this serves only its plainest
case — no transmit offloads on the ingress port, one receive queue on the other, both
rings with their compiled walk on and nothing staged — and leaves everything else to
it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..devices import net_kernel
from ..devices.net import F_MRG_RXBUF
from ..devices.net_frames import EMPTY, Frames
from ..devices.net_rings import MAX_BURST
from . import route
from .mac_table import MacTable

if TYPE_CHECKING:
    from .vhost_port import InlineQueue, VhostPort

log = logging.getLogger(__name__)

_jit: Any = None  # pair_jit, once loaded
_tried = False


def available() -> bool:
    """Whether the kernel is on (the transmit, receive and forwarding kernels are, and it
    loads); loaded the first time, before the switch's loop runs."""
    global _jit, _tried
    if not _tried and net_kernel.available() and route.available():
        _tried = True
        try:
            from ..virtq import ring_jit
            from . import pair_jit

            ring, _arrays = ring_jit.dummy_ctx()
            arena = net_kernel.small_arena()
            table, dest_at = route.kernel_args(MacTable(1), 1)
            pair_jit.forward_at(ring, arena.ctx, 0, 0, 0, 12, 1514, arena.srcs_at, table,
                                arena.fx, dest_at, 0, 0.0, 0.0, 1, ring, net_kernel.rx_ctx(),
                                0, 0, 0, 12, True, 1514)
            _jit = pair_jit
        except Exception as e:  # it cannot compile here: the usual path serves
            log.warning("compiled port-to-port bursts unavailable (%s): the usual path "
                        "serves", e)
            _jit = None
    return _jit is not None


def move(a: VhostPort, iq: InlineQueue, b: VhostPort, table: MacTable, at: int, now: float,
         until: float) -> tuple[int, Frames] | None:
    """Move a burst of port `a`'s transmit queue `iq` (at index `at` of a switch of two
    ports) to port `b` as `take_tx`, `Switch.forward` (sources learned until `until`,
    destinations looked up at `now`) and `b.deliver` would: (chains taken, the frames
    still to deliver to `b`, in order: all of those kept where one is not for `b` —
    hairpins, counted and left out —, or those behind a frame that needs a chain the
    walk does not take). None where it is not this case, or the kernel stopped before
    the first chain: nothing was taken, the usual path serves (b's receive ring may
    have been found broken and stopped, as its next delivery would find it)."""
    qa, dev_a = iq.q, a.device
    rx = b.rx_queues()
    if len(rx) != 1:
        return None
    arena = net_kernel.burst_arena(qa, dev_a, False)
    if arena is None:
        return None
    if not qa.waiting():  # (as take_burst)
        return None if qa.error is not None else (0, EMPTY)
    qb, dev_b = rx[0].q, b.device
    cursors_a = qa.kernel_cursors(MAX_BURST)
    if cursors_a is None:
        return None
    cursors_b = qb.kernel_cursors(qb.ring.size)
    if cursors_b is None:
        rx[0].check()
        return None
    table_ctx, dest_at = route.kernel_args(table, len(arena.offs))
    ring_a, ring_b = qa.ring.kernel, qb.ring.kernel
    assert ring_a is not None and ring_b is not None  # (kernel_cursors says so)
    target = 1 - at
    k, used = _jit.forward_at(ring_a.ctx, arena.ctx, *cursors_a, dev_a.hdr_len,
                              dev_a.max_frame(), arena.srcs_at, table_ctx, arena.fx, dest_at,
                              at, now, until, target, ring_b.ctx, net_kernel.rx_ctx(),
                              *cursors_b, dev_b.hdr_len, bool(dev_b.negotiated & F_MRG_RXBUF),
                              dev_b.max_frame())
    if not k:  # it stopped before the first chain: the usual path takes it (and reports
        return None  # what is wrong with it), as after take_burst
    try:
        qa.kernel_ran(k)
        frames = net_kernel.taken(arena, dev_a, a.counters)
    finally:  # b's chains are published whatever happens on a's side
        done = -1 if used < 0 else _delivered(b, rx[0], used)
    if done is None:  # (b is gone)
        return k, EMPTY
    if done < 0:
        dest = route.destinations(len(frames))
        back = dest == route.HAIRPIN
        if back.any():
            a.counters.drops["to_ingress_port"] += int(back.sum())
        return k, frames.pick((dest == target) | (dest == route.FLOOD))
    return k, EMPTY if done >= len(frames) else frames.pick(slice(done, None))


def _delivered(b: VhostPort, iq: InlineQueue, used: int) -> int | None:
    """Port `b`'s side of a burst the kernel delivered into `iq` with `used` chains:
    published and counted; how many frames it handled. An internal error here ends b's
    connection, not the ingress port's (as `Switch.forward`'s delivery does): None."""
    try:
        iq.q.kernel_ran(used)
        return net_kernel.delivered(b.counters)
    except Exception:
        log.exception("%s: internal error delivering frames; dropping the front-end",
                      b.name)
        b.disconnect()
        return None
