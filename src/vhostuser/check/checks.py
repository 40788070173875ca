"""The checks of vhost-user-check, for a vhost-user-blk or vhost-user-net back-end. Each
runs on connections of its own and says PASS, FAIL (the back-end broke a rule of the spec,
crashed, stopped serving, or wrote outside the memory it was given) or SKIP (the back-end
does not offer what the check needs). The rules are the vhost-user spec's (QEMU
docs/interop/vhost-user.rst) and the virtio spec's (2.7 split virtqueues, 2.8 packed
virtqueues). Most checks are the protocol's and the rings' and run for both types (rig.py
says what a queue and the probe are for each); those that make requests of the device
are its own (the blk ones here, the net ones in net_checks.py)."""

from __future__ import annotations

import mmap
import os
import select
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..devices.blk_abi import REQ_HEADER, T_GET_ID, T_IN
from ..devices.net import F_MRG_RXBUF
from ..frontend.blk import BlkClient
from ..frontend.client import BackendError
from ..frontend.fs import FsClient
from ..frontend.net import NetClient
from ..frontend.scsi import ScsiClient
from ..fuse.abi import ROOT_ID, Op
from ..protocol import FrontendReq, HeaderFlag, ProtocolFeature, VirtioFeature, request
from ..protocol import payloads as p
from ..virtq.ring import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE
from .rig import (
    INQUIRY,
    KIND,
    KINDS,
    PATTERN,
    PROBE_FRAME,
    RAM,
    WANT,
    WANT_PROTOCOL,
    Session,
    attacked,
    serves,
    session,
)

F = FrontendReq
_DESC = struct.Struct("<QIHH")
SETTLE = 2.0  # s an attack is given to complete, fail or be ignored


@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str


class Failed(Exception):
    pass


class Skipped(Exception):
    pass


CHECKS: list[tuple[str, str, Callable[[str], str]]] = []
FOR: dict[str, tuple[str, ...]] = {}  # check name -> the device types it is for


def check(name: str, what: str, kinds: tuple[str, ...] = KINDS,
          ) -> Callable[[Callable[[str], str]], Callable[[str], str]]:
    def register(fn: Callable[[str], str]) -> Callable[[str], str]:
        CHECKS.append((name, what, fn))
        FOR[name] = kinds
        return fn
    return register


def checks_for(kind: str) -> list[tuple[str, str, Callable[[str], str]]]:
    from . import fs_checks, net_checks, scsi_checks  # noqa: F401 - register theirs

    return [c for c in CHECKS if kind in FOR[c[0]]]


def run(path: str, only: list[str] | None = None, kind: str = "blk") -> list[Result]:
    token = KIND.set(kind)
    try:
        return _run(path, only, kind)
    finally:
        KIND.reset(token)


def _run(path: str, only: list[str] | None, kind: str) -> list[Result]:
    out = []
    for name, _what, fn in checks_for(kind):
        if only and name not in only:
            continue
        try:
            detail = fn(path)
            out.append(Result(name, "PASS", detail))
        except Skipped as e:
            out.append(Result(name, "SKIP", str(e)))
        except Failed as e:
            out.append(Result(name, "FAIL", str(e)))
        except Exception as e:  # whatever broke is the finding
            gone = serves(path)
            out.append(Result(name, "FAIL", f"{type(e).__name__}: {e}"
                              + (f"; then {gone}" if gone else "")))
    return out


def _alive(path: str, s: Session | None = None) -> None:
    if s is not None and not s.ram.guards_intact():
        raise Failed("the back-end wrote outside the memory region it was given")
    gone = serves(path)
    if gone is not None:
        raise Failed(gone)


# -- protocol ---------------------------------------------------------------------------------

@check("features", "GET_FEATURES offers VIRTIO_F_VERSION_1; the protocol features handshake")
def _features(path: str) -> str:
    with session(path) as s:
        offered = s.fe.get_u64(F.GET_FEATURES)
        if not offered & VirtioFeature.VERSION_1:
            raise Failed(f"features {offered:#x} lack VERSION_1")
        if not offered & VirtioFeature.PROTOCOL_FEATURES:
            return f"features {offered:#x}, no protocol features"
        pf = s.fe.get_u64(F.GET_PROTOCOL_FEATURES)
        return f"features {offered:#x}, protocol features {pf:#x}"


@check("io", "a read and GET_ID on a set-up queue complete with status OK", kinds=("blk",))
def _io(path: str) -> str:
    with session(path) as s:
        blk = s.setup()
        assert blk is not None
        status, _ = blk.read(0, 4096)
        if status != 0:
            raise Failed(f"read status {status}")
        status, _ = blk.get_id()
        if status not in (0, 2):  # GET_ID may be unsupported (S_UNSUPP)
            raise Failed(f"GET_ID status {status}")
        indirect = bool(s.fe.features & VirtioFeature.RING_INDIRECT_DESC)
        if indirect:
            status, _ = blk.request(T_IN, 0, in_len=4096, indirect=True)
            if status != 0:
                raise Failed(f"read through an indirect table: status {status}")
        return "read, GET_ID" + (", indirect read" if indirect else "")


@check("stop-drains", "GET_VRING_BASE returns once every request the back-end took is "
                      "used (base == used idx), and the ring goes on from that base",
                      kinds=("blk",))
def _stop_drains(path: str) -> str:
    with session(path) as s:
        blk = s.setup()
        assert blk is not None
        for i in range(16):
            blk.submit(T_IN, i * 8, in_len=4096, kick=False)
        s.fe.kick(0)
        base = s.fe.get_vring_base(0)
        ring = s.ring()
        used = ring.used_idx()
        if used != base or not 0 <= base <= 16:
            raise Failed(f"after GET_VRING_BASE: base {base}, used idx {used}, 16 requests "
                         "made available (a request taken but not used is lost on restart)")
        s.fe.start_queue(0, base)
        os_kick = s.fe.queues[0].kick
        os.eventfd_write(os_kick, 1)
        done = blk.complete(16)
        if any(status != 0 for status, _, _ in done.values()):
            raise Failed(f"statuses after the restart: {[v[0] for v in done.values()]}")
        return f"base {base} = used idx; the other {16 - base} served after the restart"


@check("reconnect", "a new connection after one that went away is served", kinds=("blk",))
def _reconnect(path: str) -> str:
    for _ in range(3):
        with session(path) as s:
            blk = s.setup()
            assert blk is not None
            blk.submit(T_IN, 0, in_len=4096)  # left in flight as the front-end goes
    _alive(path)
    return "three connections dropped with a request in flight, the fourth served"


# -- malformed messages -----------------------------------------------------------------------

def _expect_refusal(path: str, send: Callable[[Session], int], what: str) -> str:
    """Send something malformed (`send` returns the request number it used): the back-end
    must refuse it (a NACK, or it disconnects; a back-end without REPLY_ACK may stay
    silent) and serve the next front-end. An ack of success is a FAIL."""
    with session(path) as s:
        s.setup(queue=False)
        acks = bool(s.fe.protocol_features & ProtocolFeature.REPLY_ACK)
        code = send(s)
        outcome = "ignored"
        try:
            s.fe.sock.timeout = SETTLE
            header, body, fds = s.fe.sock.recv_raw()
            for fd in fds:
                os.close(fd)
            if header.request != code or not header.flags & HeaderFlag.REPLY:
                raise Failed(f"{what}: answered with message {header.request} "
                             f"(flags {header.flags:#x})")
            value = struct.unpack("<Q", body)[0] if len(body) == 8 else None
            if acks and value == 0:
                raise Failed(f"{what}: acknowledged as done")
            outcome = f"answered {value}"
        except (ConnectionError, OSError) as e:
            outcome = f"disconnected ({type(e).__name__})"
        except TimeoutError:
            outcome = "no answer"
    _alive(path)
    return f"{what}: {outcome}; still serves"


@check("unknown-request", "a request of an unknown number (NEED_REPLY) is refused")
def _unknown(path: str) -> str:
    def send(s: Session) -> int:
        s.fe.sock.send_bytes(struct.pack("<III", 9999, 1 | HeaderFlag.NEED_REPLY, 0))
        return 9999
    return _expect_refusal(path, send, "request 9999")


@check("short-payload", "a request whose payload is shorter than its type is refused")
def _short(path: str) -> str:
    def send(s: Session) -> int:
        s.fe.sock.send_bytes(struct.pack("<III", F.SET_VRING_NUM, 1 | HeaderFlag.NEED_REPLY,
                                         4) + b"\x00" * 4)
        return F.SET_VRING_NUM
    return _expect_refusal(path, send, "SET_VRING_NUM with 4 bytes")


@check("region-wraps", "a memory region whose end wraps past 2^64 is refused")
def _wrap_region(path: str) -> str:
    def send(s: Session) -> int:
        region = p.MemRegion(2**64 - 4096, 8192, s.ram.user_addr, 1 << 20)
        if s.fe.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            msg = request(F.ADD_MEM_REG, p.SingleMemRegion(region), need_reply=True)
        else:
            msg = request(F.SET_MEM_TABLE, p.MemTable((region,)), need_reply=True)
        s.fe.sock.send(msg, (s.ram.fd,))
        return msg.request
    return _expect_refusal(path, send, "a region at 2^64-4096 of 8 KiB")


@check("mem-slots-limit", "as many memory regions as GET_MAX_MEM_SLOTS says, then one more: "
                          "the last is refused, the others serve")
def _slots(path: str) -> str:
    with session(path) as s:
        s.setup(queue=False)
        if not s.fe.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            raise Skipped("CONFIGURE_MEM_SLOTS not offered")
        slots = s.fe.get_u64(F.GET_MAX_MEM_SLOTS)
        if not 1 <= slots <= 4096:
            raise Failed(f"GET_MAX_MEM_SLOTS says {slots}")
        # the memory table holds one region already; the others: a page each, one page
        # apart in guest-physical and user address, from the same file's guard zone
        base, page = 1 << 40, 4096
        outcome = ""
        for i in range(slots):
            at = base + 2 * i * page
            region = p.MemRegion(at, page, s.ram.user_addr + at, 0)
            msg = request(F.ADD_MEM_REG, p.SingleMemRegion(region), need_reply=True)
            last = i == slots - 1  # region slots + 1
            try:
                s.fe.sock.send(msg, (s.ram.fd,))
                _, body, fds = s.fe.sock.recv_raw()
            except (ConnectionError, OSError) as e:
                if not last:
                    raise Failed(f"region {i + 2} of {slots}: disconnected") from e
                outcome = f"region {slots + 1}: disconnected ({type(e).__name__})"
                break
            for fd in fds:
                os.close(fd)
            value = struct.unpack("<Q", body)[0] if len(body) == 8 else None
            if not last and value != 0:
                raise Failed(f"region {i + 2} of {slots} refused ({value})")
            if last:
                if value == 0:
                    raise Failed(f"region {slots + 1} accepted: GET_MAX_MEM_SLOTS said {slots}")
                outcome = f"region {slots + 1} refused ({value})"
    _alive(path)
    return f"{slots} slots: {outcome}; still serves"


@check("ring-crosses-region", "a used ring that starts 4 bytes before the end of its memory "
                              "region (its elements past it), then a request kicked")
def _ring_crosses(path: str) -> str:
    q = attacked()
    with session(path) as s:
        s.setup(queue=False)
        if q:  # the queues before it as usual (net's receive queue, fs's hiprio, scsi's
            s.fe.negotiate(WANT | F_MRG_RXBUF, WANT_PROTOCOL)  # control and events)
            s.fe.set_mem_table()
            for before in range(q):
                s.fe.setup_queue(before, 64)
        s.fe.setup_queue(q, 64, enable=False)
        lay = s.ring().layout()
        used = s.ram.uva(s.ram.guest_addr + s.ram.size - 4)
        outcome = "accepted"
        try:
            s.fe.call(F.SET_VRING_ADDR, p.VringAddr(q, 0, lay.desc, used, lay.avail, 0))
            s.fe.call(F.SET_VRING_ENABLE, p.VringState(q, 1))
            if KIND.get() == "net":
                NetClient(s.fe, rx_buffers=8).send([PROBE_FRAME])
            elif KIND.get() == "fs":  # (before FUSE_INIT: answered anyway, with EIO)
                FsClient(s.fe, q, arena=1 << 20).submit(Op.GETATTR, ROOT_ID, bytes(16))
            elif KIND.get() == "scsi":
                ScsiClient(s.fe, q, arena=1 << 20).submit(INQUIRY, data_in=96)
            else:
                BlkClient(s.fe, 0, arena=1 << 20).submit(T_IN, 0, in_len=512)
            # the ring's idx is the region's last 2 bytes, its elements all past the end:
            # a back-end that moves idx has written an element outside the region (into
            # whatever it has mapped there, where no guard of ours can see it)
            deadline = time.monotonic() + SETTLE
            while time.monotonic() < deadline and _idx_at_end(s) == 0:
                time.sleep(0.02)
            if _idx_at_end(s) != 0:
                raise Failed("the request completed: a used element written past the "
                             "region's end")
        except BackendError as e:
            outcome = f"refused ({e})"
        except (ConnectionError, OSError) as e:
            outcome = f"disconnected ({type(e).__name__})"
        if not s.ram.guards_intact():
            raise Failed("the back-end wrote outside the memory region it was given")
    _alive(path)
    return f"SET_VRING_ADDR: {outcome}; memory outside the region untouched; still serves"


def _idx_at_end(s: Session) -> int:
    return int.from_bytes(s.ram.view[s.ram.size - 2 : s.ram.size], "little")


# -- malicious rings --------------------------------------------------------------------------

def _attack(path: str, build: Callable[[Session], None], what: str,
            packed: bool = False) -> str:
    """Make `build`'s chain available (on a split ring of 64, or a packed ring of 8) and
    kick: whatever the back-end does with it (complete it with an error, ignore it, drop
    the connection), it must not write outside its memory and must serve the next
    front-end."""
    err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        with session(path) as s:
            if packed:
                _packed_session(s, 8)
            else:
                s.setup()
            # a back-end that stops the queue may say so (the spec's err eventfd): the
            # check then ends at once instead of waiting the whole SETTLE
            s.fe.call(F.SET_VRING_ERR, p.VringFile.make(attacked()), fds=(err,))
            build(s)
            os.eventfd_write(s.fe.queues[attacked()].kick, 1)
            def completed() -> bool:
                return _packed_used_at_0(s) if packed else s.ring().used_idx() != 0

            deadline = time.monotonic() + SETTLE
            outcome = "not completed"
            try:
                while time.monotonic() < deadline:
                    if completed():
                        outcome = "completed"
                        break
                    if select.select([err], [], [], 0)[0]:
                        outcome = "the queue stopped (its err eventfd signalled)"
                        break
                    s.fe.sock.timeout = 0.02
                    try:
                        s.fe.sock.recv_raw()
                    except TimeoutError:
                        continue
            except (ConnectionError, OSError):
                outcome = "disconnected"
            if not s.ram.guards_intact():
                raise Failed(f"{what}: the back-end wrote outside the memory region it was "
                             "given")
    finally:  # also when the check is skipped or the back-end cannot be reached
        os.close(err)
    _alive(path)
    return f"{what}: {outcome}; memory outside the region untouched; still serves"


def _header(s: Session) -> tuple[int, int]:
    """A read request's header and status buffers (guest addresses)."""
    hdr, status = s.ram.alloc(16), s.ram.alloc(16)
    s.ram.at(hdr, 16)[:] = REQ_HEADER.pack(T_IN, 0, 0)
    s.ram.at(status, 1)[0] = 0xFF
    return hdr, status


def _chain(s: Session, descs: list[tuple[int, int, int, int]]) -> None:
    """Descriptors 0.. as given (addr, len, flags, next); descriptor 0 made available."""
    ring = s.ring()
    for i, (addr, n, flags, nxt) in enumerate(descs):
        ring.write_desc(i, addr, n, flags, nxt)
    ring.publish(0)


@check("desc-loop", "a descriptor chain that loops on itself")
def _loop(path: str) -> str:
    def build(s: Session) -> None:
        hdr, _ = _header(s)
        _chain(s, [(hdr, 16, DESC_F_NEXT, 1), (s.ram.alloc(512), 512,
                                                DESC_F_WRITE | DESC_F_NEXT, 1)])
    return _attack(path, build, "descriptor 1 -> 1")


@check("desc-outside", "a data buffer outside every memory region")
def _outside(path: str) -> str:
    def build(s: Session) -> None:
        hdr, status = _header(s)
        _chain(s, [(hdr, 16, DESC_F_NEXT, 1),
                   (s.ram.size + (1 << 30), 4096, DESC_F_WRITE | DESC_F_NEXT, 2),
                   (status, 1, DESC_F_WRITE, 0)])
    return _attack(path, build, "a 4 KiB buffer 1 GiB past the region")


@check("desc-below", "a data buffer just below the region (where the guard zone is)")
def _below(path: str) -> str:
    def build(s: Session) -> None:
        hdr, status = _header(s)
        _chain(s, [(hdr, 16, DESC_F_NEXT, 1),
                   (2**64 - 4096, 4096, DESC_F_WRITE | DESC_F_NEXT, 2),
                   (status, 1, DESC_F_WRITE, 0)])
    return _attack(path, build, "a 4 KiB buffer at guest address -4096")


@check("desc-wraps", "a data buffer whose end wraps past 2^64")
def _wraps(path: str) -> str:
    def build(s: Session) -> None:
        hdr, status = _header(s)
        _chain(s, [(hdr, 16, DESC_F_NEXT, 1),
                   (2**64 - 512, 4096, DESC_F_WRITE | DESC_F_NEXT, 2),
                   (status, 1, DESC_F_WRITE, 0)])
    return _attack(path, build, "a buffer from 2^64-512 of 4 KiB")


@check("desc-straddles", "a data buffer that starts in the region and runs past its end")
def _straddles(path: str) -> str:
    def build(s: Session) -> None:
        hdr, status = _header(s)
        _chain(s, [(hdr, 16, DESC_F_NEXT, 1),
                   (s.ram.size - 512, 8192, DESC_F_WRITE | DESC_F_NEXT, 2),
                   (status, 1, DESC_F_WRITE, 0)])
    return _attack(path, build, "8 KiB from 512 bytes before the region's end")


@check("indirect-nested", "an indirect table that points to another indirect table")
def _nested(path: str) -> str:
    def build(s: Session) -> None:
        if not s.fe.features & VirtioFeature.RING_INDIRECT_DESC:
            raise Skipped("RING_INDIRECT_DESC not offered")
        hdr, status = _header(s)
        inner = s.ram.alloc(48, 16)
        for i, d in enumerate([(hdr, 16, DESC_F_NEXT, 1),
                               (s.ram.alloc(512), 512, DESC_F_WRITE | DESC_F_NEXT, 2),
                               (status, 1, DESC_F_WRITE, 0)]):
            _DESC.pack_into(s.ram.at(inner, 48), 16 * i, *d)
        outer = s.ram.alloc(16, 16)
        _DESC.pack_into(s.ram.at(outer, 16), 0, inner, 48, DESC_F_INDIRECT, 0)
        _chain(s, [(outer, 16, DESC_F_INDIRECT, 0)])
    return _attack(path, build, "an indirect descriptor inside an indirect table")


@check("indirect-outside", "an indirect table outside every memory region")
def _indirect_outside(path: str) -> str:
    def build(s: Session) -> None:
        if not s.fe.features & VirtioFeature.RING_INDIRECT_DESC:
            raise Skipped("RING_INDIRECT_DESC not offered")
        _chain(s, [(s.ram.size + (1 << 30), 64, DESC_F_INDIRECT, 0)])
    return _attack(path, build, "a 4-entry table 1 GiB past the region")


@check("indirect-loop", "an indirect table whose chain loops")
def _indirect_loop(path: str) -> str:
    def build(s: Session) -> None:
        if not s.fe.features & VirtioFeature.RING_INDIRECT_DESC:
            raise Skipped("RING_INDIRECT_DESC not offered")
        hdr, _ = _header(s)
        table = s.ram.alloc(32, 16)
        _DESC.pack_into(s.ram.at(table, 32), 0, hdr, 16, DESC_F_NEXT, 1)
        _DESC.pack_into(s.ram.at(table, 32), 16, s.ram.alloc(512), 512,
                        DESC_F_WRITE | DESC_F_NEXT, 0)
        _chain(s, [(table, 32, DESC_F_INDIRECT, 0)])
    return _attack(path, build, "entry 1 -> entry 0 in a 2-entry table")


@check("head-out-of-range", "an avail ring entry naming a descriptor past the ring's size")
def _head(path: str) -> str:
    def build(s: Session) -> None:
        ring = s.ring()
        ring.publish(ring.size + 7)
    return _attack(path, build, "head 71 in a ring of 64")


@check("avail-flood", "an avail index 2^15 ahead of the used index (more than the ring holds)")
def _flood(path: str) -> str:
    def build(s: Session) -> None:
        ring = s.ring()
        ring.avail_idx = 0x8000
        ring.avail16.store(1, 0x8000)
    return _attack(path, build, "avail idx 32768 in a ring of 64")


@check("short-header", "a request header of 8 bytes (shorter than virtio-blk's 16)", kinds=("blk",))
def _short_header(path: str) -> str:
    def build(s: Session) -> None:
        hdr, status = _header(s)
        _chain(s, [(hdr, 8, DESC_F_NEXT, 1), (status, 1, DESC_F_WRITE, 0)])
    return _attack(path, build, "an 8-byte header")


@check("no-status", "a request with no device-writable status byte", kinds=("blk",))
def _no_status(path: str) -> str:
    def build(s: Session) -> None:
        hdr, _ = _header(s)
        s.ram.at(hdr, 16)[:] = REQ_HEADER.pack(T_GET_ID, 0, 0)
        _chain(s, [(hdr, 16, DESC_F_NEXT, 1), (s.ram.alloc(20), 20, 0, 0)])
    return _attack(path, build, "GET_ID whose buffers are all read-only")


__all__ = ["CHECKS", "Result", "checks_for", "run"]


# -- packed rings (virtio 1.1+ 2.8) ------------------------------------------------------------

AVAIL, USED = 1 << 7, 1 << 15  # a packed descriptor's flags


def _packed_session(s: Session, size: int) -> BlkClient | None:
    """The queues set up on packed rings of `size`; blk's client (net: None)."""
    offered = s.fe.get_u64(F.GET_FEATURES)
    if not offered & VirtioFeature.RING_PACKED:
        raise Skipped("VIRTIO_F_RING_PACKED not offered")
    return s.setup(packed=True, size=size)


@check("packed-io", "on a packed ring of 12 (not a power of 2): reads of 3-descriptor chains "
                    "and through indirect tables over several passes; GET_VRING_BASE's word "
                    "holds both positions and wrap counters, and the ring goes on from it",
                    kinds=("blk",))
def _packed_io(path: str) -> str:
    with session(path) as s:
        blk = _packed_session(s, 12)
        assert blk is not None
        ring = s.packed_ring()
        for i in range(20):  # 3 descriptors each (or 1 with a table): 3 passes and more
            status, _ = blk.request(T_IN, i * 8, in_len=4096, indirect=bool(i % 4 == 3))
            if status != 0:
                raise Failed(f"read {i}: status {status}")
        base = s.fe.get_vring_base(0)
        if base != ring.base():
            raise Failed(f"GET_VRING_BASE {base:#010x}; the driver stands at "
                         f"{ring.base():#010x} (avail and used with their wrap counters)")
        s.fe.start_queue(0, base)
        for i in range(4):
            status, _ = blk.read(i * 8, 512)
            if status != 0:
                raise Failed(f"after the restart: status {status}")
        return f"20 reads, base {base:#010x} as the driver's, 4 more after the restart"


def _packed_used_at_0(s: Session) -> bool:
    """Whether descriptor 0 was written back as used on the first pass."""
    flags: int = _DESC.unpack_from(s.packed_ring().desc, 0)[3]
    return flags & (AVAIL | USED) == AVAIL | USED


def _packed_chain(s: Session, descs: list[tuple[int, int, int]]) -> None:
    """Ring descriptors 0.. (addr, len, flags), buffer id 0, the first one's flags last."""
    ring = s.packed_ring()
    for i, (addr, n, flags) in reversed(list(enumerate(descs))):
        _DESC.pack_into(ring.desc, 16 * i, addr, n, 0, flags)


@check("packed-too-long", "a packed chain of every descriptor, NEXT on all of them")
def _packed_too_long(path: str) -> str:
    def build(s: Session) -> None:
        hdr, _ = _header(s)
        _packed_chain(s, [(hdr, 16, AVAIL | DESC_F_NEXT)]
                      + [(s.ram.alloc(512), 512, AVAIL | DESC_F_WRITE | DESC_F_NEXT)] * 7)
    return _attack(path, build, "8 chained descriptors in a ring of 8", packed=True)


@check("packed-outside", "a packed chain with a data buffer outside every memory region")
def _packed_outside(path: str) -> str:
    def build(s: Session) -> None:
        hdr, status = _header(s)
        _packed_chain(s, [(hdr, 16, AVAIL | DESC_F_NEXT),
                          (s.ram.size + (1 << 30), 4096, AVAIL | DESC_F_WRITE | DESC_F_NEXT),
                          (status, 1, AVAIL | DESC_F_WRITE)])
    return _attack(path, build, "a 4 KiB buffer 1 GiB past the region", packed=True)


@check("packed-wrong-pass", "a packed chain marked available for the second pass, then as "
                            "used, is not taken; marked right, it is served", kinds=("blk",))
def _packed_wrong_pass(path: str) -> str:
    with session(path) as s:
        _packed_session(s, 8)
        hdr, status = _header(s)
        data = s.ram.alloc(4096)
        call = s.fe.queues[0].call
        for head in (USED, AVAIL | USED):
            _packed_chain(s, [(hdr, 16, head | DESC_F_NEXT),
                              (data, 4096, AVAIL | DESC_F_WRITE | DESC_F_NEXT),
                              (status, 1, AVAIL | DESC_F_WRITE)])
            os.eventfd_write(s.fe.queues[0].kick, 1)
            select.select([call], [], [], SETTLE / 4)  # a completion would come with a call
            if s.ram.at(status, 1)[0] != 0xFF:
                raise Failed(f"a chain whose head's flags are {head:#x} on the first pass "
                             "was served")
        _packed_chain(s, [(hdr, 16, AVAIL | DESC_F_NEXT),
                          (data, 4096, AVAIL | DESC_F_WRITE | DESC_F_NEXT),
                          (status, 1, AVAIL | DESC_F_WRITE)])
        os.eventfd_write(s.fe.queues[0].kick, 1)
        deadline = time.monotonic() + SETTLE
        while not _packed_used_at_0(s) and time.monotonic() < deadline:
            select.select([call], [], [], 0.05)
        if not _packed_used_at_0(s) or s.ram.at(status, 1)[0] != 0:
            raise Failed("marked available for the first pass, the chain was not served "
                         f"(status {s.ram.at(status, 1)[0]:#x})")
    _alive(path)
    return "neither wrong-pass marking taken; the right one served"


# -- live migration's dirty log ---------------------------------------------------------------

LOG_ALL = 1 << 26  # VHOST_F_LOG_ALL
PAGE = 4096


def _logging_session(s: Session) -> BlkClient:
    """Negotiate LOG_ALL and LOG_SHMFD as QEMU does for a migration, set a queue up, each
    buffer on pages of its own (so the log says exactly what was written)."""
    offered = s.fe.get_u64(F.GET_FEATURES)
    if not offered & LOG_ALL:
        raise Skipped("VHOST_F_LOG_ALL not offered")
    s.fe.negotiate(WANT | LOG_ALL, WANT_PROTOCOL | ProtocolFeature.LOG_SHMFD)
    if not s.fe.protocol_features & ProtocolFeature.LOG_SHMFD:
        raise Skipped("LOG_SHMFD not offered")
    s.fe.features &= ~LOG_ALL  # logging goes on with the migration, below
    s.fe.call(F.SET_FEATURES, p.U64(s.fe.features))
    s.fe.set_mem_table()
    s.fe.setup_queue(0, 64)
    return BlkClient(s.fe, 0, arena=1 << 20, align=PAGE)


def _start_log(s: Session, size: int, file_size: int) -> tuple[int, mmap.mmap]:
    """SET_LOG_BASE with a log of `size` bytes at the start of a file of `file_size`, the
    rest of the file a guard pattern; then LOG_ALL on and the used ring logged. (The reply
    to SET_LOG_BASE carries no verdict: QEMU reads it and ignores its value, and
    libvhost-user answers with what it was sent.)"""
    fd = os.memfd_create("vhost-user-check-log", os.MFD_CLOEXEC)
    log = None
    try:
        os.ftruncate(fd, file_size)
        log = mmap.mmap(fd, file_size, mmap.MAP_SHARED)
        log[size:] = _guard(file_size - size)
        s.fe.call(F.SET_LOG_BASE, p.LogBase(size, 0), fds=(fd,), ack=False)
        s.fe.call(F.SET_FEATURES, p.U64(s.fe.features | LOG_ALL))
        ring = s.ring()
        lay = ring.layout()
        s.fe.call(F.SET_VRING_ADDR, p.VringAddr(0, 1, lay.desc, lay.used, lay.avail,
                                                ring.used_gpa))
        return fd, log
    except BaseException:
        if log is not None:
            log.close()
        os.close(fd)
        raise


def _guard(n: int) -> bytes:
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


def _pages(gpa: int, n: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + n - 1) // PAGE + 1))


def _inflight_session(s: Session) -> None:
    """Negotiate INFLIGHT_SHMFD as QEMU's vhost-user-blk does, memory table sent."""
    s.fe.negotiate(WANT, WANT_PROTOCOL | ProtocolFeature.INFLIGHT_SHMFD)
    if not s.fe.protocol_features & ProtocolFeature.INFLIGHT_SHMFD:
        raise Skipped("INFLIGHT_SHMFD not offered")
    s.fe.set_mem_table()


def _reads_settle(s: Session, n: int) -> str:
    """Set queue 0 up (64 entries), make `n` reads available and kick; how it went."""
    s.fe.setup_queue(0, 64)
    blk = BlkClient(s.fe, 0, arena=1 << 20)
    for i in range(n):
        blk.submit(T_IN, i, in_len=512)
    ring = s.ring()
    deadline = time.monotonic() + SETTLE
    while ring.used_idx() < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return f"{ring.used_idx()} of {n} reads completed"


@check("inflight-too-small", "an in-flight area (SET_INFLIGHT_FD) of 64 bytes for a queue of "
                             "64, which needs 1040: refused, or nothing written past it",
                             kinds=("blk",))
def _inflight_too_small(path: str) -> str:
    size = 64
    with session(path) as s:
        _inflight_session(s)
        fd = os.memfd_create("vhost-user-check-inflight", os.MFD_CLOEXEC)
        area: mmap.mmap | None = None
        try:
            os.ftruncate(fd, PAGE)
            area = mmap.mmap(fd, PAGE, mmap.MAP_SHARED)
            area[:] = _guard(PAGE)
            try:
                s.fe.call(F.SET_INFLIGHT_FD, p.Inflight(size, 0, 1, 64), fds=(fd,))
                outcome = "accepted; " + _reads_settle(s, 4)
            except BackendError as e:
                outcome = f"refused ({e})"
            except (ConnectionError, OSError, EOFError) as e:
                outcome = f"refused: disconnected ({type(e).__name__})"
            if area[size:] != _guard(PAGE)[size:]:
                raise Failed("the back-end wrote past the end of the in-flight area")
        finally:
            if area is not None:
                area.close()
            os.close(fd)
    _alive(path)
    return f"{outcome}; nothing written past the area; still serves"


@check("log-writes", "with LOG_ALL, every page the back-end writes (data read into guest "
                     "memory, status bytes, the used ring) is marked in the dirty log",
                     kinds=("blk",))
def _log_writes(path: str) -> str:
    with session(path) as s:
        blk = _logging_session(s)
        size = (RAM // PAGE + 7) // 8
        fd, log = _start_log(s, size, size + PAGE)
        try:
            # two pages each, one through an indirect table, and one of 12 pages (whole
            # bytes of the bitmap and the bits around them)
            heads = [blk.submit(T_IN, 8 * i, in_len=2 * PAGE, kick=False,
                                indirect=i == 3 and bool(s.fe.features
                                                         & VirtioFeature.RING_INDIRECT_DESC))
                     for i in range(4)]
            heads.append(blk.submit(T_IN, 64, in_len=12 * PAGE, kick=False))
            want: set[int] = set()
            for h in heads:
                status, data, n = blk.inflight[h]
                want |= _pages(status, 1) | _pages(data, n)
            used = s.ring().used_gpa
            want |= _pages(used, 4 + 8 * len(heads))
            s.fe.kick(0)
            done = blk.complete(len(heads))
            if any(v[0] != 0 for v in done.values()):
                raise Failed(f"statuses {[v[0] for v in done.values()]}")
            s.fe.get_vring_base(0)  # as QEMU does before its last look at the log
            marked = {8 * i + b for i, byte in enumerate(log[:size]) for b in range(8)
                      if byte >> b & 1}
            missed = sorted(want - marked)
            if missed:
                raise Failed(f"pages written but not logged: {missed} (of {sorted(want)})")
            if log[size:] != _guard(PAGE):
                raise Failed("the back-end wrote past the end of the log")
        finally:
            log.close()
            os.close(fd)
    _alive(path)
    return (f"{len(want)} pages written, all logged ({len(marked - want)} more marked); "
            "nothing past the log")


@check("log-too-small", "a dirty log too small for guest memory: refused, or at least "
                        "nothing written past it and the back-end serves on", kinds=("blk",))
def _log_too_small(path: str) -> str:
    with session(path) as s:
        _logging_session(s)
        size = 8  # 64 pages: 256 KiB of the 32 MiB
        try:
            fd, log = _start_log(s, size, PAGE)
        except (ConnectionError, OSError, EOFError) as e:
            outcome = f"refused: disconnected ({type(e).__name__})"
        else:
            try:
                # a read into the top of guest memory, far past what the log covers
                top = s.ram.size - 2 * PAGE
                hdr = s.ram.alloc(16, PAGE)
                s.ram.at(hdr, 16)[:] = REQ_HEADER.pack(T_IN, 0, 0)
                st = s.ram.alloc(1, PAGE)
                ring = s.ring()
                ring.add([(hdr, 16, False), (top, PAGE, True), (st, 1, True)])
                s.fe.kick(0)
                deadline = time.monotonic() + SETTLE
                while ring.used_idx() == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                if log[size:] != _guard(PAGE - size):
                    raise Failed("the back-end wrote past the end of the log")
                outcome = "accepted, nothing written past it"
            finally:
                log.close()
                os.close(fd)
    _alive(path)
    return f"a log of 8 bytes for 32 MiB: {outcome}; still serves"
