"""vhost-user-check's checks that make requests of a virtio-fs back-end: FUSE requests on
the first request queue, after FUSE_INIT (a server may refuse anything before it). What
is checked: that a well-formed session works; that requests no kernel sends (a header cut
short, lengths that lie, an opcode that does not exist, a reply buffer too small or
missing) are answered or dropped without writing outside memory or ending the service;
and that no name takes a lookup out of the shared directory ("..", "../..", an absolute
path, a name with a slash). The rules: virtio 1.x §5.11 (virtio-fs), the FUSE protocol
(linux/fuse.h: a request is a fuse_in_header of `len` bytes in all, a name ends with a
NUL; ENOSYS for an opcode the server does not know)."""

from __future__ import annotations

import errno
import os
import select
import stat
import time
from collections.abc import Callable

from ..frontend.fs import FuseError
from ..fuse import abi
from ..fuse.abi import ROOT_ID, Op
from ..protocol import FrontendReq
from ..protocol import payloads as p
from .checks import SETTLE, Failed, _alive, check
from .rig import FS_REQUESTS, Session, session

UNKNOWN_OPCODE = 4321


@check("fs-io", "FUSE_INIT, then GETATTR, OPENDIR, READDIR, RELEASEDIR and STATFS of the "
                "root answer", kinds=("fs",))
def _fs_io(path: str) -> str:
    with session(path) as s:
        fs = s.setup_fs()
        major, minor, *_ = fs.init()
        attr = fs.getattr(ROOT_ID)
        if not stat.S_ISDIR(attr.mode):
            raise Failed(f"the root's mode is {attr.mode:#o}, not a directory")
        entries = fs.listdir(ROOT_ID)
        fs.statfs()
        return f"FUSE {major}.{minor}; the root is a directory of {len(entries)} entries"


@check("fs-before-init", "GETATTR of the root before FUSE_INIT", kinds=("fs",))
def _fs_before_init(path: str) -> str:
    with session(path) as s:
        fs = s.setup_fs()
        try:
            fs.getattr(ROOT_ID)
            outcome = "served"
        except FuseError as e:
            outcome = f"refused ({errno.errorcode.get(e.errno or 0, e.errno)})"
        except TimeoutError:
            raise Failed("never answered (a guest's request would hang)") from None
    _alive(path)
    return outcome


@check("fs-unknown-opcode", f"a request with opcode {UNKNOWN_OPCODE}, which FUSE does not "
                            "have: ENOSYS", kinds=("fs",))
def _fs_unknown(path: str) -> str:
    with session(path) as s:
        fs = s.setup_fs()
        fs.init()
        try:
            fs.request(UNKNOWN_OPCODE, ROOT_ID, bytes(16))
        except FuseError as e:
            if e.errno != errno.ENOSYS:
                raise Failed(f"answered {errno.errorcode.get(e.errno or 0)}, not ENOSYS"
                             ) from None
            return "ENOSYS"
        except TimeoutError:
            raise Failed("never answered") from None
    raise Failed("answered as if it were a request it knows")


def _header(length: int, opcode: int = Op.GETATTR, nodeid: int = ROOT_ID) -> bytes:
    return abi.IN_HEADER.pack(length, opcode, 2, nodeid, 0, 0, os.getpid(), 0, 0)


def _chain(s: Session, readable: bytes, reply: int) -> None:
    """A request chain: `readable` in one buffer, then a writable one of `reply` bytes (none
    if 0), on the request queue."""
    gpa = s.ram.alloc(max(len(readable), 1))
    s.ram.at(gpa, len(readable))[:] = readable
    bufs = [(gpa, len(readable), False)]
    if reply:
        bufs.append((s.ram.alloc(reply), reply, True))
    s.ring(FS_REQUESTS).add(bufs)


def _fs_attack(path: str, build: Callable[[Session], None], what: str) -> str:
    """After FUSE_INIT, `build`'s chain made available and kicked: whatever the back-end
    does with it (an error reply, ignoring it, stopping the queue, dropping the
    connection), it must not write outside its memory and must serve the next
    front-end."""
    err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        with session(path) as s:
            fs = s.setup_fs()
            s.fe.call(FrontendReq.SET_VRING_ERR, p.VringFile.make(FS_REQUESTS), fds=(err,))
            fs.init()
            ring = s.ring(FS_REQUESTS)
            before = ring.used_idx()
            build(s)
            s.fe.kick(FS_REQUESTS)
            outcome = "not completed"
            deadline = time.monotonic() + SETTLE
            while time.monotonic() < deadline:
                if ring.used_idx() != before:
                    outcome = "completed"
                    break
                if select.select([err], [], [], 0.02)[0]:
                    outcome = "the queue stopped (its err eventfd signalled)"
                    break
            if not s.ram.guards_intact():
                raise Failed("the back-end wrote outside the memory region it was given")
    finally:
        os.close(err)
    _alive(path)
    return f"{what}: {outcome}; memory outside the region untouched; still serves"


@check("fs-short-header", "a request of 24 bytes, shorter than the 40-byte fuse_in_header",
       kinds=("fs",))
def _fs_short_header(path: str) -> str:
    return _fs_attack(path, lambda s: _chain(s, _header(24)[:24], 256), "a 24-byte request")


@check("fs-length-past-the-buffer", "a GETATTR whose header says 1 GiB, in a 56-byte "
                                    "buffer", kinds=("fs",))
def _fs_len_long(path: str) -> str:
    return _fs_attack(path, lambda s: _chain(s, _header(1 << 30) + bytes(16), 256),
                      "len 2^30")


@check("fs-length-under-the-header", "a GETATTR whose header says 8 bytes, less than the "
                                     "header itself", kinds=("fs",))
def _fs_len_short(path: str) -> str:
    return _fs_attack(path, lambda s: _chain(s, _header(8) + bytes(16), 256), "len 8")


@check("fs-reply-too-small", "a GETATTR with an 8-byte reply buffer, less than the 16-byte "
                             "fuse_out_header", kinds=("fs",))
def _fs_reply_small(path: str) -> str:
    body = abi.GETATTR_IN.pack(0, 0, 0)
    req = _header(abi.IN_HEADER.size + len(body)) + body
    return _fs_attack(path, lambda s: _chain(s, req, 8), "an 8-byte reply buffer")


@check("fs-no-reply-buffer", "a GETATTR with no writable buffer at all", kinds=("fs",))
def _fs_no_reply(path: str) -> str:
    body = abi.GETATTR_IN.pack(0, 0, 0)
    req = _header(abi.IN_HEADER.size + len(body)) + body
    return _fs_attack(path, lambda s: _chain(s, req, 0), "no reply buffer")


@check("fs-name-unterminated", "a LOOKUP whose name has no terminating NUL", kinds=("fs",))
def _fs_unterminated(path: str) -> str:
    name = b"no-nul-" + b"x" * 40
    req = _header(abi.IN_HEADER.size + len(name), Op.LOOKUP) + name
    return _fs_attack(path, lambda s: _chain(s, req, 256), "a name without NUL")


# names that must not lead out of the shared directory
_ESCAPES = [b"..", b"../..", b"../../../../../../..", b"/", b"/etc", b"./../.."]


@check("fs-lookup-escapes", "LOOKUPs of the root's \"..\", \"../..\", \"/\", \"/etc\" and "
                            "more: none may lead out of the shared directory", kinds=("fs",))
def _fs_escapes(path: str) -> str:
    with session(path) as s:
        fs = s.setup_fs()
        fs.init()
        root = fs.getattr(ROOT_ID)
        seen = []
        for name in _ESCAPES:
            try:
                entry = fs.lookup(ROOT_ID, name)
            except FuseError as e:
                seen.append(f"{name.decode()}: {errno.errorcode.get(e.errno or 0)}")
                continue
            if (entry.attr.ino, entry.attr.mode) != (root.ino, root.mode):
                raise Failed(f"LOOKUP {name.decode()!r} gave inode {entry.attr.ino} "
                             f"(mode {entry.attr.mode:#o}), not the root's {root.ino}: out "
                             "of the shared directory")
            seen.append(f"{name.decode()}: the root itself")
    _alive(path)
    return "; ".join(seen)
