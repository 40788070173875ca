"""The virtio-net data path on the device side: frames out of a transmit queue, frames into
a receive queue (virtio 1.x §5.1.6), with the counters a port keeps. Whoever moves the
frames (the switch, a TAP) calls these with the queues the engine runs (the switch's
ports try net_kernel.py's one-call bursts first, then `take_rest` and `put_rest`).

Transmit: every chain is one frame behind the virtio-net header; a frame whose header asks
for an offload not negotiated (or does not match its packet: net_offload.py), a runt, an
oversized frame or one from a multicast source is dropped and counted; every buffer goes
back at once. A frame that asks for an offload travels with its header (`Frames.vnet`);
delivered, it keeps it where the port negotiated the offload, else it is finished first.
Receive: each frame gets one chain (or, with MRG_RXBUF, as many as it needs: num_buffers
says how many); a frame that finds no buffer is dropped (a guest that does not post
buffers must not make us queue frames).
Bursts of one-descriptor chains take the numpy path (virtq/burst.py); with the compiled
walk on, kernels take and deliver whole bursts (net_kernel.py). Frames travel as `Frames`.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..engine.queue import DeviceQueue
from ..ratelog import Limited
from ..virtq.burst import DirectBurst, scatter_frames
from ..virtq.iov import iov_write
from ..virtq.ring import DESC_F_WRITE, Chain
from . import net_kernel
from .net import F_MRG_RXBUF, NetPort, rx_header, tx_header_ok
from .net_frames import EMPTY, Frames
from .net_offload import (
    F_CSUM,
    GSO_NONE,
    MAX_GSO_FRAME,
    NEEDS_CSUM,
    PLAIN,
    OffloadError,
    accepts,
    check_tx,
    finish,
)

log = logging.getLogger(__name__)
_bad_offload = Limited(log)

MAX_BURST = 256


@dataclass
class Counters:
    """Seen from the switch: `rx` is what the port sent into the switch, `tx` what the
    switch delivered to it; drops are counted by reason."""

    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    # rx_gso/rx_csum: frames that came with a GSO (checksum) request; tx_gso/tx_csum: ones
    # delivered with theirs; segmented: GSO frames cut into `segments` frames for the port,
    # checksummed: checksums finished for it
    offloads: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return {"rx_packets": self.rx_packets, "rx_bytes": self.rx_bytes,
                "tx_packets": self.tx_packets, "tx_bytes": self.tx_bytes,
                "drops": dict(self.drops), "offloads": dict(self.offloads)}


def take_frames(q: DeviceQueue, dev: NetPort, c: Counters) -> Frames:
    """Frames the guest transmitted on `q` (at most a burst); the buffers go back to the
    guest at once (notified). Invalid frames are dropped and counted. The compiled kernel
    (net_kernel.py) takes what it can (a burst in one call: `take_burst`, else in
    `take_rest`); bursts of one-descriptor chains take the numpy path; `take_rest`'s
    loop is the reference for both."""
    taken = net_kernel.take_burst(q, dev, c, MAX_BURST, tx_check(q, dev, c))
    return take_rest(q, dev, c) if taken is None else taken


def tx_check(q: DeviceQueue, dev: NetPort, c: Counters) -> net_kernel.Check | None:
    """What the transmit kernel is given to check a header that asks for an offload
    (`_offload`), where F_CSUM is negotiated (which every other transmit offload needs);
    else None."""
    return functools.partial(_offload, q, dev, c) if dev.negotiated & F_CSUM else None


def take_rest(q: DeviceQueue, dev: NetPort, c: Counters) -> Frames:
    """`take_frames` where net_kernel.take_burst did not serve."""
    n = min(q.available(), MAX_BURST)  # (an idle queue costs one look)
    if not n:
        return EMPTY
    offloads = dev.negotiated & F_CSUM  # (which every other transmit offload needs)
    if net_kernel.available():
        before = q.popped
        taken = net_kernel.take(q, dev, c, n, tx_check(q, dev, c))
        if taken is not None:
            if q.popped != before:
                q.notify()
                return taken
            n = 1  # it stopped before this chain (or had no room): the loop below
    burst = q.pop_direct(n)
    if burst is not None:
        return _take_direct(q, burst, dev, c)
    chains = q.pop_batch(n)
    hl, max_frame = dev.hdr_len, dev.max_frame()
    frames, headers = [], []
    for chain in chains:
        r = chain.readable
        buf = bytes(r[0]) if len(r) == 1 else b"".join(r)  # a copy: every check is on
        # what is passed on, whatever the guest writes meanwhile
        size = len(buf) - hl
        hdr = buf[:hl]
        if size < 0 or (not offloads and not tx_header_ok(hdr)):
            c.drops["bad_header"] += 1
        elif size < 14:
            c.drops["runt"] += 1
        elif size > (MAX_GSO_FRAME if offloads and hdr[1] != GSO_NONE else max_frame):
            c.drops["oversize"] += 1
        elif buf[hl + 6] & 1:
            c.drops["bad_source_mac"] += 1
        else:
            frame = buf[hl:]
            vnet = PLAIN
            if offloads and (hdr[0] & NEEDS_CSUM or hdr[1] != GSO_NONE):
                checked = _offload(q, dev, c, hdr, frame)
                if checked is None:
                    continue
                vnet = checked
            frames.append(frame)
            headers.append(vnet)
            c.rx_bytes += size
    c.rx_packets += len(frames)
    q.complete_batch(chains, [0] * len(chains))
    q.notify()
    return Frames.of(frames, headers)


def _offload(q: DeviceQueue, dev: NetPort, c: Counters, hdr: bytes,
             frame: bytes) -> bytes | None:
    """The header a frame that asks for an offload travels with (net_offload.check_tx), or
    None: dropped and counted. `hdr` and `frame` are copies: the guest cannot change them
    between the checks."""
    try:
        vnet = check_tx(hdr, frame, dev.negotiated)
    except OffloadError as e:
        c.drops["bad_offload"] += 1
        _bad_offload.log(logging.WARNING, "queue %d: frame dropped: %s", q.index, e)
        return None
    gso = vnet[1] != GSO_NONE
    if not gso and len(frame) > dev.max_frame():
        c.drops["oversize"] += 1
        return None
    c.offloads["rx_gso" if gso else "rx_csum"] += 1
    return vnet


def _take_direct(q: DeviceQueue, b: DirectBurst, dev: NetPort, c: Counters) -> Frames:
    """`take_frames` for a burst of one-descriptor chains: the same checks, as array
    operations over the whole burst; then one copy per valid frame (and a look at each
    header that asks for an offload). The source address is checked on the copy (the
    guest may write its buffers meanwhile: what is passed on is what was checked); a
    header that asks, `_offload` reads once and checks against the copy."""
    u8 = b.u8
    hl, max_frame = dev.hdr_len, dev.max_frame()
    offloads = bool(dev.negotiated & F_CSUM)
    size = b.lengths - hl
    has_hdr = size >= 0
    at = np.where(has_hdr, b.offsets, 0)  # in bounds whatever the buffer's length
    gso = u8[at + 1] != GSO_NONE
    asks = has_hdr & ((u8[at] & NEEDS_CSUM != 0) | gso)
    bad = ~has_hdr | (asks & (not offloads))
    runt = ~bad & (size < 14)
    limit = np.where(gso, MAX_GSO_FRAME, max_frame) if offloads else max_frame
    over = ~bad & ~runt & (size > limit)
    ok = ~(bad | runt | over)
    for reason, mask in (("bad_header", bad), ("runt", runt), ("oversize", over)):
        k = int(np.count_nonzero(mask))
        if k:
            c.drops[reason] += k
    view = b.view
    starts = b.offsets[ok] + hl
    frames = [bytes(view[s:e]) for s, e in zip(starts.tolist(),
                                               (b.offsets + b.lengths)[ok].tolist(),
                                               strict=True)]
    asked_ok = asks[ok].tolist()
    starts_ok = starts.tolist()
    if any(f[6] & 1 for f in frames):  # from a multicast source: never a station
        kept_i = [i for i, f in enumerate(frames) if not f[6] & 1]
        c.drops["bad_source_mac"] += len(frames) - len(kept_i)
        frames = [frames[i] for i in kept_i]
        asked_ok = [asked_ok[i] for i in kept_i]
        starts_ok = [starts_ok[i] for i in kept_i]
    headers = None
    if offloads and any(asked_ok):
        headers, kept = [], []
        for frame, s, asked in zip(frames, starts_ok, asked_ok, strict=True):
            vnet = PLAIN
            if asked:
                checked = _offload(q, dev, c, bytes(view[s - hl : s]), frame)
                if checked is None:
                    continue
                vnet = checked
            kept.append(frame)
            headers.append(vnet)
        frames = kept
    c.rx_packets += len(frames)
    c.rx_bytes += sum(map(len, frames))
    q.complete_burst(b.heads)
    return Frames.of(frames, headers)


def put_frames(q: DeviceQueue, dev: NetPort, c: Counters, frames: Frames) -> None:
    """Deliver `frames` into receive queue `q` (notified), dropping what does not fit. A
    burst of complete frames goes in one call where it can (net_kernel.put_burst)."""
    done = net_kernel.put_burst(q, dev, c, frames, bool(dev.negotiated & F_MRG_RXBUF))
    if done != len(frames):
        put_rest(q, dev, c, frames, done)


def put_rest(q: DeviceQueue, dev: NetPort, c: Counters, frames: Frames,
             done: int | None) -> None:
    """`put_frames` where net_kernel.put_burst delivered the first `done` frames (None:
    it did not serve)."""
    if done:
        frames = frames.pick(slice(done, None))
    if frames.vnet is None:
        _put_complete(q, dev, c, frames)
    else:
        _put_offloaded(q, dev, c, frames)
    q.notify()


def _put_offloaded(q: DeviceQueue, dev: NetPort, c: Counters, frames: Frames) -> None:
    """`put_frames` for a burst where frames ask for offloads: each goes with its header
    if the port negotiated that offload, else finished in software (its checksum filled
    in, or segmented); in burst order. Where the port takes every frame's header as it
    is (the usual case: ports that negotiated the same offloads), the compiled kernel
    delivers them with their headers; `_put_each` is the reference."""
    assert frames.vnet is not None
    if net_kernel.available():
        kinds = _kinds(frames.vnet)
        if all(accepts(bytes([k >> 8, k & 0xFF]), dev.negotiated) for k in kinds):
            left = _put_compiled(q, dev, c, frames, lambda one: _put_each(q, dev, c, one))
            if left is None:
                return
            frames = left
    _put_each(q, dev, c, frames)


def _put_compiled(q: DeviceQueue, dev: NetPort, c: Counters, frames: Frames,
                  reference: Callable[[Frames], object]) -> Frames | None:
    """The compiled kernel delivers `frames` in turns with `reference`, which delivers
    each frame it stops before. Returns None once all are delivered, or the frames left
    when it cannot serve the queue now (for the caller's other paths)."""
    mrg = bool(dev.negotiated & F_MRG_RXBUF)
    while len(frames):
        done = net_kernel.put(q, dev, c, frames, mrg)
        if done is None:
            return frames
        if done == len(frames):
            break
        reference(frames.pick(slice(done, done + 1)))
        frames = frames.pick(slice(done + 1, None))
    return None


def _kinds(vnet: np.ndarray) -> list[int]:
    """The (flags, GSO type) pairs of a burst's headers, as flags << 8 | type (what
    net_offload.accepts looks at); a burst usually has one."""
    both = vnet[:, :2].copy().view(">u2").ravel()
    first = int(both[0]) if len(both) else 0
    if not (both != first).any():
        return [first] if len(both) else []
    return [int(k) for k in np.unique(both)]


def _put_each(q: DeviceQueue, dev: NetPort, c: Counters, frames: Frames) -> None:
    """`_put_offloaded` frame by frame."""
    assert frames.vnet is not None
    mrg = bool(dev.negotiated & F_MRG_RXBUF)
    complete: list[bytes] = []  # complete frames waiting to go, in order
    for i, vnet in enumerate(frames.vnet.tobytes()[k : k + 10]
                             for k in range(0, 10 * len(frames), 10)):
        if vnet == PLAIN:
            complete.append(frames[i])
        elif accepts(vnet, dev.negotiated):
            if complete:
                _put_complete(q, dev, c, Frames.of(complete))
                complete = []
            hdr = (vnet + b"\1\0")[: dev.hdr_len]  # num_buffers 1 (more: _spread)
            gso = vnet[1] != GSO_NONE
            before = c.tx_packets
            _put_one(q, dev, c, frames[i], q.available(), hdr, mrg,
                     MAX_GSO_FRAME if gso else dev.max_frame())
            if c.tx_packets != before and (gso or vnet[0] & NEEDS_CSUM):
                c.offloads["tx_gso" if gso else "tx_csum"] += 1
        elif q.available() <= len(complete):  # no buffer left for it: why cut it up?
            c.drops["no_rx_buffer"] += 1
        else:
            try:
                done = finish(frames[i], vnet)
            except OffloadError:  # (a TAP's frame, not one check_tx passed)
                c.drops["bad_offload"] += 1
                continue
            if vnet[1] != GSO_NONE:
                c.offloads["segmented"] += 1
                c.offloads["segments"] += len(done)
            else:
                c.offloads["checksummed"] += 1
            complete.extend(done)
    if complete:
        _put_complete(q, dev, c, Frames.of(complete))


def _put_complete(q: DeviceQueue, dev: NetPort, c: Counters, frames: Frames) -> None:
    """`put_frames` for complete frames. The compiled kernel (net_kernel.py) delivers what
    it can, then the numpy burst path; the loop below is the reference for both."""
    mrg = bool(dev.negotiated & F_MRG_RXBUF)
    max_frame = dev.max_frame()
    if net_kernel.available():  # (it looks at what is available itself)
        left = _put_compiled(q, dev, c, frames, lambda one: _put_one(
            q, dev, c, one[0], q.available(), rx_header(dev.hdr_len, 1), mrg, max_frame))
        if left is None:
            return
        frames = left
    hdr1 = rx_header(dev.hdr_len, 1)
    avail = q.available()
    if not avail:  # no buffer at all: every frame dropped (counted as the loop would)
        over = int(np.count_nonzero(frames.lens > max_frame))
        for reason, k in (("oversize", over), ("no_rx_buffer", len(frames) - over)):
            if k:
                c.drops[reason] += k
        return
    while avail and len(frames):  # the burst path, as far as it goes; the rest below
        done = _put_direct(q, frames, hdr1, avail, max_frame, c)
        if not done:
            break
        frames, avail = frames.pick(slice(done, None)), avail - done
    for frame in frames:
        avail = _put_one(q, dev, c, frame, avail, hdr1, mrg, max_frame)


def _put_one(q: DeviceQueue, dev: NetPort, c: Counters, frame: bytes, avail: int,
             hdr1: bytes, mrg: bool, max_frame: int) -> int:
    """One frame behind header `hdr1` (num_buffers 1) into the chain (or with MRG_RXBUF,
    chains) it needs, `avail` of them available; returns how many are left."""
    hl = dev.hdr_len
    need = hl + len(frame)
    if len(frame) > max_frame:
        c.drops["oversize"] += 1
        return avail
    chain = q.pop() if avail else None
    if chain is None:
        c.drops["no_rx_buffer"] += 1
        return 0
    avail -= 1
    w = chain.writable
    w0 = w[0] if w else None
    if w0 is not None and len(w0) >= need:  # the usual case: one buffer
        w0[:hl] = hdr1
        w0[hl:need] = frame
        q.complete(chain, need)
    elif sum(map(len, w)) >= need:
        iov_write(w, hdr1 + frame)
        q.complete(chain, need)
    elif mrg:
        left = _spread(q, chain, hdr1, frame, avail)
        if left < 0:  # too few buffers for it: they stay for the frames behind
            c.drops["no_rx_buffer"] += 1
            return avail + 1
        avail = left
    else:  # dropped; the buffer stays for a frame that fits (as DPDK does)
        q.unpop()
        c.drops["rx_buffer_too_small"] += 1
        return avail + 1
    c.tx_packets += 1
    c.tx_bytes += len(frame)
    return avail


def _put_direct(q: DeviceQueue, frames: Frames, hdr: bytes, avail: int,
                max_frame: int, c: Counters) -> int:
    """`put_frames` for the leading frames that each get a one-descriptor buffer they fit:
    buffers taken, headers written and buffers returned with array operations (burst.py),
    one copy per frame. Returns how many frames it delivered (0: none, nothing done; the
    chain walk in `put_frames` takes the rest, with its drop counting)."""
    n = min(len(frames), avail)
    if not n or int(frames.lens[:n].max()) > max_frame:
        return 0
    burst = q.pop_direct(n, DESC_F_WRITE)
    if burst is None:
        return 0
    k = len(burst.heads)
    written = scatter_frames(burst, hdr, frames.data, frames.offs[:k], frames.lens[:k])
    if written is None:
        q.unpop(k)  # give the buffers back
        return 0
    q.complete_burst(burst.heads, written)
    c.tx_packets += k
    c.tx_bytes += int(written.sum()) - k * len(hdr)
    return k


def _spread(q: DeviceQueue, first: Chain, hdr: bytes, frame: bytes, avail: int) -> int:
    """MRG_RXBUF: lay one frame behind `hdr` over as many chains as it takes; the header's
    num_buffers says how many. Returns the chains still available, -1 if they ran out
    (the chains taken are given back untouched, for the frames behind it)."""
    hl = len(hdr)
    data = bytearray(hdr + frame)
    chains = [first]
    room = sum(len(v) for v in first.writable)
    while room < len(data):
        chain = q.pop() if avail else None
        if chain is None:
            q.unpop(len(chains))
            return -1
        avail -= 1
        chains.append(chain)
        room += sum(len(v) for v in chain.writable)
    data[hl - 2 : hl] = len(chains).to_bytes(2, "little")  # num_buffers
    off = 0
    for chain in chains:
        n = iov_write(chain.writable, memoryview(data)[off:])
        q.complete(chain, n)
        off += n
    return avail
