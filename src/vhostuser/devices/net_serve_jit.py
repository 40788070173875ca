"""virtio-net's transmit and receive bursts in compiled kernels (numba): imported only by
net_kernel.py, and only where numba is installed. The rules are net_rings.py's
`take_frames` and `put_frames` (the frame-by-frame loops there are the reference) over
ring_jit.py's walk (either ring layout); see net_kernel.py."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, types

from ..virtq.prefetch_jit import prefetch, prefetch_write
from ..virtq.ring_jit import NDESC, put_used, ring_views, walk, walk_more
from ..virtq.ring_jit import done as ring_done
from ..virtq.views_jit import i64s, u8_rows, u8s
from .net_frames import FX_DATA, FX_DATA_LEN, FX_LENS, FX_OFFS, FX_VNET
from .net_offload import GSO_NONE, MAX_GSO_FRAME, NEEDS_CSUM

# void *memcpy(void *dest, const void *src, size_t n): addresses as integers (as for
# blk_serve_jit.py's preadv); every range is checked before it is called
memcpy: Any = types.ExternalFunction("memcpy", types.voidptr(types.uintp, types.uintp,
                                                             types.uintp))

ETH_HLEN = 14
# indices of the drop counts both kernels add to (net_kernel.DROPS names them)
BAD_HEADER, RUNT, OVERSIZE, BAD_SOURCE, NO_RX_BUFFER, RX_TOO_SMALL = range(6)
NDROPS = 6
ASKS, CHECKSUM = 1, 2  # `asks`: a frame's header to check, or one checked here
AHEAD = 4  # chains ahead whose buffers are prefetched
# a frame is taken `direct` from this size on: below it the copy saved is worth less than
# the receive kernel's second write of its addresses (PVP at 64 B, 3 pairs alternating:
# 8.2/8.2/6.6 Mpps copying every frame, 7.1/7.1/5.5 taking every one `direct`)
DIRECT_MIN = 512
LINE = np.uint64(64)

# both kernels' results, in `out`: chains used, frames handled (taken or dropped), frames
# passed on, their bytes, frames dropped
# (and for the transmit kernel, how many of those passed on have a header to check, how
# many one it checked; for the receive kernel, how many of those delivered went with a
# GSO header, how many with a checksum to finish)
CHAINS, FRAMES, PASSED, PASSED_BYTES, DROPPED, ASKED, CHECKED, TX_GSO, TX_CSUM = range(9)
NOUT = 9


@njit(cache=True, nogil=True)
def _total(segs: Any, first: int, count: int) -> int:
    t = 0
    for s in range(first, first + count):
        t += segs[s, 2]
    return t


@njit(cache=True, nogil=True)
def _gather(bases: Any, segs: Any, first: int, count: int, limit: int, out: Any) -> None:
    """Copy the first `limit` bytes of the buffers segs[first : first + count], taken as
    one, to address `out` (the caller has checked the room)."""
    for s in range(first, first + count):
        if limit <= 0:
            break
        length = min(segs[s, 2], limit)
        memcpy(out, bases[segs[s, 0]] + np.uint64(segs[s, 1]), length)
        out += length
        limit -= length


@njit(cache=True, nogil=True)
def _checksum_ok(arena: Any, pos: int, hl: int, body: int) -> bool:
    """Whether the header at arena[pos] asks for a checksum (no segmentation) that
    net_offload.check_tx passes as it stands: start and offset inside the frame behind it
    (`body` bytes), past its Ethernet header (and VLAN tag). If so, the header is made
    the one check_tx returns: NEEDS_CSUM alone, the start and offset."""
    start = np.int64(arena[pos + 6]) | np.int64(arena[pos + 7]) << 8
    offset = np.int64(arena[pos + 8]) | np.int64(arena[pos + 9]) << 8
    etype = np.int64(arena[pos + hl + 12]) << 8 | np.int64(arena[pos + hl + 13])
    l2 = 18 if etype == 0x8100 or etype == 0x88A8 else 14
    if start + offset + 2 > body or start < l2:
        return False  # (check_tx says why)
    arena[pos] = NEEDS_CSUM
    for j in range(1, 6):  # no GSO, hdr_len, gso_size
        arena[pos + j] = 0
    return True


@njit(cache=True, nogil=True)
def take(desc: Any, avail: Any, used: Any, size: int, indirect: bool, packed: bool,
         regions: Any, bases: Any, heads: Any, meta: Any, segs: Any, state: Any, last: int,
         n: int, used_at: int, hl: int, max_frame: int, offloads: bool, arena: Any,
         offs: Any, lens: Any, asks: Any, vnet: Any, drops: Any, out: Any,
         direct: bool, srcs: Any) -> None:
    """Take up to `n` transmitted chains of a ring (its arrays, ring_jit.ring_views's)
    from avail cursor `last`: each one
    frame behind a header of `hl` bytes. A chain's bytes are copied into `arena` (as far
    as a frame may go) and checked there; a valid frame stays (its offset and length into
    `offs`, `lens`), an invalid one is counted in `drops`; every chain's used element
    (written 0) goes from used cursor `used_at` on (the cursor past them left in the
    ring's state). Stops before the first chain the walk does not take and before one
    the arena has no room left for. With `offloads` (F_CSUM
    negotiated) a frame whose header asks for one (a checksum, segmentation: up to
    MAX_GSO_FRAME bytes then) stays with its header in front of it and `asks` set for it:
    CHECKSUM where the kernel found the header good (a checksum alone, inside the frame:
    the header is then made what net_offload.check_tx would make it), else ASKS:
    net_kernel.py has that header checked against its frame (check_tx). Each frame kept
    has its header in `vnet` (10 bytes: zeros where it asks for nothing). The heads
    taken are the walk's, in `heads`; `out` says how many, and how many frames were
    kept. With `direct` (taken only without offloads on a split ring, whose chains are
    not the driver's again until the caller stores the used index after the call: the
    caller must not store it before it has copied what it left there), a frame of
    DIRECT_MIN bytes or more that lies in one buffer is left there: only its header and
    Ethernet header are copied (its place in the arena is kept as for a frame copied
    whole), srcs[m] is its address (0 for a frame copied whole: no guest memory is
    mapped at 0); switch/pair_jit.py delivers it from there or copies the rest."""
    n = min(n, offs.shape[0])
    k, _, _ = walk(desc, avail, size, indirect, packed, regions, bases, last, n, heads, meta,
                   segs)
    cur = used_at
    cap = arena.shape[0]
    base = arena.ctypes.data
    dropped = drops.sum()
    pos = 0
    m = 0
    nbytes = 0
    nasked = 0
    nchecked = 0
    for i in range(k):
        if i + AHEAD < k and meta[i + AHEAD, 1]:
            at = bases[segs[meta[i + AHEAD, 0], 0]] + np.uint64(segs[meta[i + AHEAD, 0], 1])
            prefetch(at)
            prefetch(at + LINE)
        first, nr = meta[i, 0], meta[i, 1]
        total = _total(segs, first, nr)
        body = total - hl
        if body < 0:
            drops[BAD_HEADER] += 1
        else:
            # as far as a frame may go (an oversize frame: what shows it is one)
            copy = min(total, hl + (max(MAX_GSO_FRAME, max_frame) if offloads else max_frame))
            if pos + copy > cap:
                k = i  # the arena is full: the rest at the next call
                break
            src = np.uint64(0)
            if direct and not packed and not offloads and body >= DIRECT_MIN:
                last_seg = first + nr - 1
                starts = total - segs[last_seg, 2]  # where the last buffer starts
                if starts <= hl:  # (it holds the whole frame)
                    src = (bases[segs[last_seg, 0]] + np.uint64(segs[last_seg, 1])
                           + np.uint64(hl - starts))
                    copy = min(copy, hl + ETH_HLEN)
            _gather(bases, segs, first, nr, copy, base + pos)
            gso = arena[pos + 1] != GSO_NONE
            asked = (arena[pos] & NEEDS_CSUM) != 0 or gso
            if asked and not offloads:
                drops[BAD_HEADER] += 1
            elif body < ETH_HLEN:
                drops[RUNT] += 1
            elif body > (MAX_GSO_FRAME if gso else max_frame):
                drops[OVERSIZE] += 1
            elif arena[pos + hl + 6] & 1:
                drops[BAD_SOURCE] += 1
            else:
                offs[m] = pos + hl
                lens[m] = body
                if direct:
                    srcs[m] = src
                asks[m] = ASKS if asked else 0
                if asked and not gso and _checksum_ok(arena, pos, hl, body):
                    asks[m] = CHECKSUM
                    nchecked += 1
                elif asked:
                    nasked += 1
                for j in range(10):
                    vnet[m, j] = arena[pos + j] if asked else 0
                m += 1
                nbytes += body
                pos += total
        cur = put_used(used, state, size, packed, cur, heads[i], 0, meta[i, NDESC])
    ring_done(desc, state, cur)
    out[CHAINS] = k
    out[FRAMES] = k
    out[PASSED] = m
    out[PASSED_BYTES] = nbytes
    out[DROPPED] = drops.sum() - dropped
    out[ASKED] = nasked
    out[CHECKED] = nchecked


@njit(cache=True, nogil=True)
def _fill(bases: Any, segs: Any, first: int, count: int, hdr: Any, hl: int, frame: Any,
          start: int, stop: int) -> int:
    """Write bytes [start, stop) of the stream header (`hl` bytes at address `hdr`) + frame
    (at address `frame`) into the buffers segs[first : first + count], in order, as far as they go;
    returns how many bytes were written."""
    p = start
    for s in range(first, first + count):
        if p >= stop:
            break
        dst = bases[segs[s, 0]] + np.uint64(segs[s, 1])
        end = min(p + segs[s, 2], stop)
        if p < hl:
            h = min(end, hl) - p
            memcpy(dst, hdr + np.uint64(p), h)
            dst += np.uint64(h)
            p += h
        if p < end:
            memcpy(dst, frame + np.uint64(p - hl), end - p)
            p = end
    return p - start


@njit(cache=True, nogil=True)
def put(desc: Any, avail: Any, used: Any, size: int, indirect: bool, packed: bool,
        regions: Any, bases: Any, heads: Any, meta: Any, segs: Any, state: Any, last: int,
        n: int, used_at: int, hl: int, mrg: bool, max_frame: int, data: Any, offs: Any,
        lens: Any, vnet: Any, has_vnet: bool, hdr: Any, drops: Any, out: Any,
        srcs: Any) -> None:
    """Deliver frames (frame f is data[offs[f] : offs[f] + lens[f]]) into the chains of a ring
    (its arrays, ring_jit.ring_views's) available from avail cursor `last` (`n` at most), in
    order, frame by frame as `put_frames` does: each behind the header `hdr` (`hl` bytes;
    num_buffers, with `mrg` a frame spread over as many chains as it takes), its used element
    at the next used cursor from `used_at` on (the cursor past them left in the ring's state).
    With `has_vnet`, frame f goes with the header vnet[f] (10 bytes, one the port takes as it
    is: net_offload.accepts) and may be up to MAX_GSO_FRAME long if it is a GSO frame. Stops
    before a frame that would need a chain the walk did not take (the chain-by-chain path takes
    that frame on). Where srcs[f] (`srcs` may be empty) is not 0, frame f is read from that
    address (a guest's buffer: `take`'s `direct`) but for its first 12 bytes, which are
    data[offs[f]:][:12] as the forwarding decisions saw them, whatever the guest wrote
    there since."""
    # chains are walked as frames need them (a ring's worth of buffers waits there
    # usually, for far fewer frames): k walked so far; `stopped`: the walk left the next
    dropped = drops.sum()
    hdr_at = np.uint64(hdr.ctypes.data)
    data_at = np.uint64(data.ctypes.data)
    cur = used_at
    k = 0
    stopped = False
    c = 0
    f = 0
    delivered = 0
    nbytes = 0
    ngso = 0
    ncsum = 0
    nframes = lens.shape[0]
    if has_vnet:
        nframes = min(nframes, vnet.shape[0])
    while f < nframes:
        length = lens[f]
        if offs[f] < 0 or length < 0 or offs[f] > data.shape[0] - length:
            break  # not a frame of `data`: the reference loop's (a bug, not a guest's)
        gso = has_vnet and vnet[f, 1] != GSO_NONE
        if length > (MAX_GSO_FRAME if gso else max_frame):
            drops[OVERSIZE] += 1
            f += 1
            continue
        need = hl + length
        frame_at = data_at + np.uint64(offs[f])
        src = frame_at
        if f < srcs.shape[0] and srcs[f] != 0:
            src = np.uint64(srcs[f])
        if c >= k and not stopped and k < n:
            k, stopped, n, last = walk_more(desc, avail, size, indirect, packed, regions,
                                            bases, heads, meta, segs, last, k, n,
                                            max(nframes - f, 32))
        if c >= k:
            if stopped:
                break
            drops[NO_RX_BUFFER] += 1  # every available chain is used
            f += 1
            continue
        ahead = c + AHEAD
        if ahead < k and meta[ahead, 2]:
            at = bases[segs[meta[ahead, 0] + meta[ahead, 1], 0]] + np.uint64(
                segs[meta[ahead, 0] + meta[ahead, 1], 1])
            prefetch_write(at)
            prefetch_write(at + LINE)
        room = _total(segs, meta[c, 0] + meta[c, 1], meta[c, 2])
        if has_vnet:
            for j in range(10):
                hdr[j] = vnet[f, j]
        if room >= need:
            if hl >= 12:
                hdr[10] = 1
                hdr[11] = 0
            _fill(bases, segs, meta[c, 0] + meta[c, 1], meta[c, 2], hdr_at, hl, src, 0, need)
            if src != frame_at:  # the addresses as they were decided on
                _fill(bases, segs, meta[c, 0] + meta[c, 1], meta[c, 2], hdr_at, hl,
                      frame_at, 0, hl + 12)
            cur = put_used(used, state, size, packed, cur, heads[c], need, meta[c, NDESC])
            c += 1
        elif mrg:
            j = c
            while room < need:
                if j + 1 >= k and not stopped and k < n:
                    k, stopped, n, last = walk_more(desc, avail, size, indirect, packed,
                                                    regions, bases, heads, meta, segs, last,
                                                    k, n, 32)
                if j + 1 >= k:
                    break
                j += 1
                room += _total(segs, meta[j, 0] + meta[j, 1], meta[j, 2])
            if room < need:
                if stopped:
                    break
                drops[NO_RX_BUFFER] += 1  # the chains stay for the frames behind
                f += 1
                continue
            nb = j - c + 1
            hdr[10] = nb & 0xFF
            hdr[11] = nb >> 8
            p = 0
            for x in range(c, j + 1):
                w = _fill(bases, segs, meta[x, 0] + meta[x, 1], meta[x, 2], hdr_at, hl,
                          src, p, need)
                if src != frame_at and p < hl + 12:
                    _fill(bases, segs, meta[x, 0] + meta[x, 1], meta[x, 2], hdr_at, hl,
                          frame_at, p, min(p + w, hl + 12))
                cur = put_used(used, state, size, packed, cur, heads[x], w, meta[x, NDESC])
                p += w
            c = j + 1
        else:  # the buffer stays for a frame that fits
            drops[RX_TOO_SMALL] += 1
            f += 1
            continue
        delivered += 1
        nbytes += length
        if gso:
            ngso += 1
        elif has_vnet and vnet[f, 0] & NEEDS_CSUM:
            ncsum += 1
        f += 1
    if has_vnet:
        hdr[:10] = 0  # (the header of complete frames)
    ring_done(desc, state, cur)
    out[TX_GSO] = ngso
    out[TX_CSUM] = ncsum
    out[CHAINS] = c
    out[FRAMES] = f
    out[PASSED] = delivered
    out[PASSED_BYTES] = nbytes
    out[DROPPED] = drops.sum() - dropped


# What `take_at` and `put_at` are given besides a ring's context (ring_jit.py): the
# addresses and lengths of the other arrays they use. A transmit context: the port's frame
# array, offsets, lengths, `asks`, header rows, and the drop counts and results; a receive
# one: the header, the drop counts and results.
DATA, DATA_LEN, OFFS, LENS, ASKS_AT, VNET, FRAMES_LEN, DROPS, OUT = range(9)
HDR = DATA


def take_ctx(data: Any, offs: Any, lens: Any, asks: Any, vnet: Any, drops: Any,
             out: Any) -> Any:
    """A transmit context (the caller keeps the arrays while it is used)."""
    if not (data.dtype == asks.dtype == vnet.dtype == np.uint8
            and offs.dtype == lens.dtype == np.int64
            and len(offs) == len(lens) == len(asks) and vnet.shape == (len(offs), 10)
            and drops.dtype == out.dtype == np.int64
            and len(drops) == NDROPS and len(out) == NOUT
            and all(a.flags.c_contiguous for a in (data, offs, lens, asks, vnet, drops, out))
            and all(a.ndim == 1 for a in (data, offs, lens, asks, drops, out))):
        raise ValueError("not the arrays of a transmit context")
    return np.array([data.ctypes.data, len(data), offs.ctypes.data, lens.ctypes.data,
                     asks.ctypes.data, vnet.ctypes.data, len(offs), drops.ctypes.data,
                     out.ctypes.data], np.uint64)


def put_ctx(hdr: Any, drops: Any, out: Any) -> Any:
    """A receive context (the caller keeps the arrays while it is used)."""
    if not (hdr.dtype == np.uint8 and len(hdr) == 12 and drops.dtype == out.dtype == np.int64
            and len(drops) == NDROPS and len(out) == NOUT
            and all(a.flags.c_contiguous and a.ndim == 1 for a in (hdr, drops, out))):
        raise ValueError("not the arrays of a receive context")
    return np.array([hdr.ctypes.data, 0, 0, 0, 0, 0, 0, drops.ctypes.data, out.ctypes.data],
                    np.uint64)


@njit(cache=True, nogil=True)
def take_at(ring: Any, port: Any, last: int, n: int, used_at: int, hl: int, max_frame: int,
            offloads: bool) -> int:
    """`take` over a ring's context and a transmit context; how many chains it took."""
    nf = port[FRAMES_LEN]
    r = ring_views(ring)
    take(r.desc, r.avail, r.used, r.size, r.indirect, r.packed, r.regions, r.bases, r.heads,
         r.meta, r.segs, r.state, last, n, used_at, hl, max_frame, offloads,
         u8s(port[DATA], port[DATA_LEN]),
         i64s(port[OFFS], nf), i64s(port[LENS], nf), u8s(port[ASKS_AT], nf),
         u8_rows(port[VNET], nf, 10), i64s(port[DROPS], NDROPS), i64s(port[OUT], NOUT),
         False, np.empty(0, np.uint64))
    return int(i64s(port[OUT], NOUT)[CHAINS])


@njit(cache=True, nogil=True)
def put_at(ring: Any, scratch: Any, last: int, n: int, used_at: int, hl: int, mrg: bool,
           max_frame: int, fx: Any, nframes: int, has_vnet: bool) -> int:
    """`put` over a ring's context, a receive context and the context of `nframes` frames
    (net_frames.py's; their headers with `has_vnet`); how many chains it used."""
    r = ring_views(ring)
    put(r.desc, r.avail, r.used, r.size, r.indirect, r.packed, r.regions, r.bases, r.heads,
        r.meta, r.segs, r.state, last, n, used_at, hl, mrg, max_frame,
        u8s(fx[FX_DATA], fx[FX_DATA_LEN]),
        i64s(fx[FX_OFFS], nframes), i64s(fx[FX_LENS], nframes),
        u8_rows(fx[FX_VNET], nframes if has_vnet else 0, 10), has_vnet,
        u8s(scratch[HDR], 12), i64s(scratch[DROPS], NDROPS), i64s(scratch[OUT], NOUT),
        np.empty(0, np.uint64))
    return int(i64s(scratch[OUT], NOUT)[CHAINS])
