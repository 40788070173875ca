"""virtio-net bursts served by compiled kernels (net_serve_jit.py), a burst per call:

- transmit: every chain walked (the compiled split walk), its header and frame checked,
  the frame copied into the port's frame array, its used element written; with offloads
  negotiated a header that asks for a checksum is checked there too, one that asks for
  segmentation (or that it finds wrong) by net_offload.check_tx (`_checked`);
- receive: frames copied from a `Frames` array into the guests' buffers behind their
  header (each frame's own, where they carry one the port takes), spread over several
  chains with MRG_RXBUF, used elements written.

No Python per frame but for those segmentation headers. The used index, barriers and
the notification stay the engine's (`DeviceQueue.run_kernel`, which publishes a burst at
once, or `serve_compiled`); the counters stay net_rings.py's `Counters`. The kernels stop
before a chain the compiled walk does not take (it stops before anything unusual), and
net_rings.py's frame-by-frame loops — the reference — take it on, with their error
messages. Used only where the compiled walk is on (VHOSTUSER_JIT=1, kernel_walk.py), on
either ring layout, while writes are not logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..virtq.kernel_walk import available as walk_available
from .net_frames import EMPTY, Frames, frames_ctx
from .net_offload import F_CSUM, HDR_SIZE, MAX_GSO_FRAME

Check = Callable[[bytes, bytes], "bytes | None"]  # (header, frame) -> its header, or None

if TYPE_CHECKING:
    from ..engine.queue import DeviceQueue
    from ..virtq.ring import DeviceRing
    from .net import NetPort
    from .net_rings import Counters

log = logging.getLogger(__name__)

# the kernels' drop counts (net_serve_jit.py's indices), as Counters names them
DROPS = ("bad_header", "runt", "oversize", "bad_source_mac", "no_rx_buffer",
         "rx_buffer_too_small")
ARENA = 512 << 10  # bytes of frames a transmit burst may take (and one of the largest)

_jit: Any = None  # net_serve_jit, once loaded
_tried = False


def available() -> bool:
    """Whether the kernels are on (the compiled walk is, and these load too); loaded and
    run once the first time: call it in the engine's process, before workers fork."""
    global _jit, _tried
    if not _tried and walk_available():
        _tried = True
        try:
            from . import net_serve_jit

            _jit = net_serve_jit
            _scratch.made()
            _rx.made()
            _warm()
        except Exception as e:  # it cannot compile here: net_rings.py serves every frame
            log.warning("compiled net kernels unavailable (%s): net_rings.py serves", e)
            _jit = None
    return _jit is not None


def _warm() -> None:
    """Compile (or load from the cache) both kernels."""
    from ..virtq import ring_jit

    ring, _arrays = ring_jit.dummy_ctx()
    arena = small_arena()
    _jit.take_at(ring, arena.ctx, 0, 0, 0, 12, 1514, False)
    _jit.put_at(ring, _rx.ctx, 0, 0, 0, 12, True, 1514, arena.fx, 0, False)
    _scratch.results(None)
    _rx.results(None)


class _Scratch:
    """A kernel's small outputs, made once per process: one for the transmit kernel, one
    for the receive kernel (switch/pair.py runs both in one call). The switch and a TAP
    worker serve their queues from one thread; a caller with threads would need a pair
    of them for each thread."""

    def __init__(self) -> None:
        self.drops = np.zeros(len(DROPS), np.int64)  # added to, cleared once counted
        self.out = np.zeros(0, np.int64)  # net_serve_jit.py's CHAINS..TX_CSUM (`made`)
        self.hdr = np.zeros(12, np.uint8)
        self.ctx: Any = None  # a receive context over them (net_serve_jit.put_ctx:
        # `_rx`'s is the receive kernel's; the transmit kernel's is each `_Arena`'s)

    def made(self) -> None:
        """The kernels are loaded: their outputs and context."""
        self.out = np.zeros(_jit.NOUT, np.int64)
        self.ctx = _jit.put_ctx(self.hdr, self.drops, self.out)

    def results(self, c: Counters | None) -> list[int]:
        """The last call's `out`; its drops counted (and cleared)."""
        out = self.out.tolist()
        if out[4] > 0:
            if c is not None:
                for name, k in zip(DROPS, self.drops.tolist(), strict=True):
                    if k:
                        c.drops[name] += k
            self.drops[:] = 0
        return out


_scratch = _Scratch()  # the transmit kernel's (its `out` is every port's `_Arena`'s)
_rx = _Scratch()  # the receive kernel's


class _Arena:
    """A port's transmit frame array, its frames' offsets, lengths and headers (a ring's
    worth), and the transmit kernel's context over them."""

    def __init__(self, size: int, frames: int, burst: int | None = None) -> None:
        self.data = np.zeros(size, np.uint8)
        self.offs = np.zeros(frames, np.int64)
        self.lens = np.zeros(frames, np.int64)
        self.asks = np.zeros(frames, np.uint8)  # 0, or a frame's header is net_serve_jit's
        # ASKS (to check) or CHECKSUM (checked)
        self.vnet = np.zeros((frames, HDR_SIZE), np.uint8)  # each frame's header
        self.srcs = np.zeros(frames, np.uint64)  # where a frame taken `direct` lies
        self.srcs_at = self.srcs.ctypes.data  # (net_serve_jit.take; switch/pair_jit.py)
        self.ctx = _jit.take_ctx(self.data, self.offs, self.lens, self.asks, self.vnet,
                                 _scratch.drops, _scratch.out)
        if burst is not None and burst < ARENA:  # the kernel sees a shorter array: a
            # burst stops before the chain (header and frame) that would take it past
            # `burst` bytes, but takes a first one whatever it holds (the array is ARENA
            # and the room of one chain: `_arena_size`)
            assert burst > 0
            self.ctx[_jit.DATA_LEN] = max(burst, size - ARENA)
        self.fx = frames_ctx(self.data, self.offs, self.lens, self.vnet)  # its frames'


def small_arena() -> _Arena:
    """A frame array of one frame of 16 bytes: what kernels are warmed with."""
    return _Arena(16, 1)


def take(q: DeviceQueue, dev: NetPort, c: Counters, limit: int,
         check: Check | None = None) -> Frames | None:
    """The frames of up to `limit` chains of transmit queue `q`, their buffers completed
    (published now, or at the next notify: `_serve`); none if it stopped before the first
    chain (the chain-by-chain path then takes that one, and reports it if it is broken);
    None if the kernel cannot serve the queue now (`DeviceQueue.serve_compiled` says when). `check`:
    offloads are negotiated (F_CSUM), and this says what header a frame that asks for
    one travels with (net_offload.check_tx), or None: dropped (it counted why). The
    frames stay valid until the port takes again."""
    max_frame = dev.max_frame()
    offloads = check is not None
    arena: _Arena | None = dev.tx_arena
    size = _arena_size(dev.hdr_len, max_frame, offloads)
    if arena is None or len(arena.data) < size or len(arena.offs) < q.ring.size:
        arena = dev.tx_arena = _Arena(size, max(q.ring.size, 1024), dev.tx_burst_bytes)
    out = _serve(q, _jit.take_at, arena.ctx, (dev.hdr_len, max_frame, offloads), limit, c,
                 _scratch)
    return None if out is None else _taken(arena, out, dev.hdr_len, c, check)


def take_burst(q: DeviceQueue, dev: NetPort, c: Counters, limit: int,
               check: Check | None) -> Frames | None:
    """`take` in one call for a caller that counts each (the switch, where each Python
    call a burst makes costs: bench/RESULTS.md, net_dpdk 2026-12-02 04:31): the port's
    frame array made for its ring and frame size, the kernel free to publish at once
    (`DeviceQueue.run_kernel`). `check` as for `take`, given exactly where F_CSUM is
    negotiated. The frames of up to `limit` chains, published (valid until the port
    takes again); EMPTY where none is available; None where it is not that case, or the
    kernel stopped before the first chain (nothing was taken): net_rings.take_rest then
    serves (which tries the kernel once more before its chain-by-chain loop). It never
    returns frames with the ring's error set (run_kernel sets it only where it returns
    None)."""
    offloads = check is not None
    arena = burst_arena(q, dev, offloads)
    if arena is None:
        return None
    if not q.waiting():  # (counting them is a walk on a packed ring: run_kernel's)
        return None if q.error is not None else EMPTY
    hl = dev.hdr_len
    if not q.run_kernel(_jit.take_at, arena.ctx, (hl, dev.max_frame(), offloads), limit):
        return None
    return _taken(arena, _scratch.results(c), hl, c, check)


def burst_arena(q: DeviceQueue, dev: NetPort, offloads: bool) -> _Arena | None:
    """The port's frame array where the transmit kernel may take a burst of `q` into it in
    one call (`take_burst`, or a kernel that goes on in the same call: switch/pair.py),
    `offloads` as negotiated (F_CSUM); None where it may not (`take` makes it)."""
    arena: _Arena | None = dev.tx_arena
    if (_jit is None or arena is None or offloads != bool(dev.negotiated & F_CSUM)
            or len(arena.offs) < q.ring.size
            or len(arena.data) < _arena_size(dev.hdr_len, dev.max_frame(), offloads)):
        return None
    return arena


def taken(arena: _Arena, dev: NetPort, c: Counters) -> Frames:
    """The frames the transmit kernel's last run kept in `arena` (with no offloads:
    `burst_arena`'s), counted in `c` (valid until the port takes again)."""
    return _taken(arena, _scratch.results(c), dev.hdr_len, c, None)


def rx_ctx() -> Any:
    """The receive kernel's context (net_serve_jit.put_ctx)."""
    return _rx.ctx


def _arena_size(hl: int, max_frame: int, offloads: bool) -> int:
    """Bytes a transmit burst's frame array needs (a GSO frame may be larger than any
    frame the port's MTU allows)."""
    return ARENA + hl + (max(MAX_GSO_FRAME, max_frame) if offloads else max_frame)


def _taken(arena: _Arena, out: list[int], hl: int, c: Counters,
           check: Check | None) -> Frames:
    """The frames the transmit kernel took into `arena` (its outputs `out`), counted."""
    _, _, kept, nbytes, _, asked, checked, _, _ = out
    c.rx_packets += kept
    c.rx_bytes += nbytes
    if not asked and not checked:
        return Frames(arena.data, arena.offs[:kept], arena.lens[:kept], ctx=arena.fx)
    if checked:
        c.offloads["rx_csum"] += checked
    frames = Frames(arena.data, arena.offs[:kept], arena.lens[:kept], arena.vnet[:kept],
                    arena.fx)
    if asked:
        assert check is not None  # (the kernel passes on such frames only then)
        return _checked(frames, arena.asks[:kept], hl, c, check)
    return frames


def _checked(frames: Frames, asks: np.ndarray, hl: int, c: Counters,
             check: Check) -> Frames:
    """`frames` (their headers as the kernel left them) with the headers it did not check
    (ASKS) as `check` finds them (each frame and header read from the arena, where the
    guest cannot change them meanwhile); those it refuses left out."""
    vnet = frames.vnet
    assert vnet is not None
    keep: np.ndarray | None = None
    data = frames.data
    for i in np.flatnonzero(asks == _jit.ASKS).tolist():
        off, length = int(frames.offs[i]), int(frames.lens[i])
        header = check(data[off - hl : off].tobytes(), data[off : off + length].tobytes())
        if header is None:  # dropped (and counted)
            if keep is None:
                keep = np.ones(len(frames), bool)
            keep[i] = False
            vnet[i] = 0  # (so that `vnet` says whether the frames kept ask for anything)
            c.rx_packets -= 1
            c.rx_bytes -= length
        else:
            vnet[i] = np.frombuffer(header, np.uint8)
    out = Frames(frames.data, frames.offs, frames.lens, vnet if vnet[:, :2].any() else None)
    return out if keep is None else out.pick(keep)


def put(q: DeviceQueue, dev: NetPort, c: Counters, frames: Frames, mrg: bool) -> int | None:
    """Deliver the leading frames of `frames` into receive queue `q` (published now, or at
    the next notify: `_serve`), dropping and counting what does not fit; returns how many
    frames it handled (fewer than all: it stopped before a frame that needs a chain the
    compiled walk does not take), None if the kernel cannot serve the queue now. Frames with headers
    (`frames.vnet`) go with them: the caller has made sure the port takes each as it is
    (net_offload.accepts)."""
    hl = dev.hdr_len
    fx = frames.kernel_ctx()
    nframes = min(len(frames.offs), len(frames.lens))
    has_vnet = frames.vnet is not None
    if frames.vnet is not None:
        nframes = min(nframes, len(frames.vnet))

    out = _serve(q, _jit.put_at, _rx.ctx, (hl, mrg, dev.max_frame(), fx, nframes,
                                           has_vnet), q.ring.size, c, _rx)
    if out is None:
        return None
    _, handled, delivered, nbytes, _, _, _, gso, csum = out
    c.tx_packets += delivered
    c.tx_bytes += nbytes
    if gso:
        c.offloads["tx_gso"] += gso
    if csum:
        c.offloads["tx_csum"] += csum
    return handled


def put_burst(q: DeviceQueue, dev: NetPort, c: Counters, frames: Frames,
              mrg: bool) -> int | None:
    """`put` for complete frames, in one call (as `take_burst`), the kernel free to publish
    at once. How many of `frames` it handled, published (those behind it stopped before:
    net_rings.put_rest), or None where it is not that case (nothing done, nothing left
    staged: run_kernel publishes what a kernel served, and sets the ring's error only
    where it returns None)."""
    if _jit is None or frames.vnet is not None:
        return None
    nframes = min(len(frames.offs), len(frames.lens))
    if q.run_kernel(_jit.put_at, _rx.ctx, (dev.hdr_len, mrg, dev.max_frame(),
                                           frames.kernel_ctx(), nframes, False),
                    q.ring.size) is None:
        return None
    return delivered(c)


def delivered(c: Counters) -> int:
    """How many frames the receive kernel's last run handled (`put_burst`'s), its frames
    and bytes delivered and its drops counted in `c`."""
    _, handled, passed, nbytes, dropped, *_ = _rx.out.tolist()
    if dropped:
        _rx.results(c)  # (counted and cleared)
    c.tx_packets += passed
    c.tx_bytes += nbytes
    return int(handled)


def _serve(q: DeviceQueue, kernel: Any, ctx: Any, args: tuple[Any, ...], limit: int,
           c: Counters, scratch: _Scratch) -> list[int] | None:
    """Let `kernel(ring's context, ctx, avail cursor, n, used cursor, *args)` serve
    up to `limit` chains of `q` (its outputs in `scratch`, whose context `ctx` is where
    it is not an `_Arena`'s): published at once where
    nothing else is pending on the queue (`DeviceQueue.run_kernel`, the usual case), else
    at the next notify (`serve_compiled`). Returns the kernel's outputs (`_Scratch.results`),
    None if it could not run."""
    if q.run_kernel(kernel, ctx, args, limit) is None:
        ran = False

        def counted(ring: DeviceRing, n: int) -> int:
            nonlocal ran
            w = ring.kernel
            assert w is not None
            ran = True
            last, used_at = ring.cursors()
            return int(kernel(w.ctx, ctx, last, n, used_at, *args))

        q.serve_compiled(counted, limit)
        if not ran:
            return None
    return scratch.results(c)
