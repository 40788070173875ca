"""A FUSE file server exporting one host directory (what virtiofsd does), request by
request: `FileServer.handle` takes one request's guest buffers and writes the reply.

Confinement, as virtiofsd defines it: the client names files only as (node id, one name
component); every node is an O_PATH fd, names are resolved beneath their directory with
openat2 (no `..`, no symlinks, no magic links: a symlink the guest planted is never
followed here, the guest's kernel follows it in the guest), `..` of the shared root is the
root, and files are reopened through /proc/self/fd/N of our own fds, never by path. Only
regular files and directories are ever opened (a FIFO would block us, a device node the
guest made with mknod would reach host hardware).

Requests may run on several threads at once; the tables (inodes.py) hold what they share.
Files are created with the caller's uid/gid (per-thread fsuid/fsgid) when we run as root,
and with mode as the client sent it (the client applies its umask; ours is 0).
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ..fileio import fallocate, read_into, write_from
from ..procfs import own_fd
from ..ratelog import Limited
from ..virtq.iov import iov_len, iov_read, iov_slice, iov_write
from . import abi
from .abi import Op
from .inodes import Inode, Tables
from .syscalls import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    UTIME_NOW,
    UTIME_OMIT,
    chown_fd,
    getdents,
    open_beneath,
    rename2,
    set_fs_creds,
    syncfs,
    utimens_fd,
)

log = logging.getLogger(__name__)

CacheMode = Literal["auto", "always", "never"]
MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // 4096
MAX_BODY = 65536 + 4096  # the largest request but WRITE: SETXATTR's value and name
NAME_MAX = 255
_TIMEOUTS = {"never": 0.0, "auto": 1.0, "always": 86400.0}
_WRITE_OPS = frozenset({Op.SETATTR, Op.SYMLINK, Op.MKNOD, Op.MKDIR, Op.UNLINK, Op.RMDIR,
                        Op.RENAME, Op.RENAME2, Op.LINK, Op.WRITE, Op.SETXATTR, Op.REMOVEXATTR,
                        Op.CREATE, Op.FALLOCATE, Op.COPY_FILE_RANGE})
_NO_REPLY = frozenset({Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT})
# O_NOFOLLOW: the client resolved the name already, and our reopen through /proc/self/fd/N
# (a magic link) fails with ELOOP under it; a symlink node is never reopened anyway
_OPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT | os.O_NOFOLLOW
_ACC = os.O_ACCMODE
_OPS = {int(op): op for op in Op}  # opcode -> Op, without Op()'s exception for unknown ones
_IN_SIZE, _IN_UNPACK = abi.IN_HEADER.size, abi.IN_HEADER.unpack_from
_OUT_SIZE, _OUT_PACK = abi.OUT_HEADER.size, abi.OUT_HEADER.pack_into
_WRITE, _WRITE_IN_SIZE = int(Op.WRITE), abi.WRITE_IN.size


@dataclass(frozen=True)
class ServerOptions:
    readonly: bool = False
    cache: CacheMode = "auto"
    xattr: bool = False
    announce_submounts: bool = False


class Request:
    """One request: its header fields and body (WRITE's data stays in guest memory)."""

    __slots__ = ("body", "gid", "nodeid", "opcode", "pid", "readable", "uid", "unique",
                 "writable")

    def __init__(self, hdr: tuple[int, ...], body: bytes, readable: list[memoryview],
                 writable: list[memoryview]) -> None:
        _, self.opcode, self.unique, self.nodeid, self.uid, self.gid, self.pid, _, _ = hdr
        self.body = body
        self.readable, self.writable = readable, writable


def _name(raw: bytes) -> bytes:
    """A single path component the client sent (NUL-terminated in the request)."""
    if not raw or b"/" in raw:
        raise OSError(errno.EINVAL, "not a file name")
    if len(raw) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "file name too long")
    return raw


def _new_name(raw: bytes) -> bytes:
    name = _name(raw)
    if name in (b".", b".."):
        raise OSError(errno.EEXIST, "file exists")
    return name


def _strings(body: bytes, n: int) -> list[bytes]:
    parts = body.split(b"\0")
    if len(parts) <= n:
        raise OSError(errno.EINVAL, "a name is not NUL-terminated")
    return parts[:n]


def _unpack(s: struct.Struct, body: bytes) -> tuple[Any, ...]:
    if len(body) < s.size:
        raise OSError(errno.EINVAL, f"request body of {len(body)} bytes, {s.size} needed")
    return s.unpack_from(body)


def _dev_decode(rdev: int) -> int:
    """The kernel's new_encode_dev() form (what FUSE carries) to a dev_t."""
    return os.makedev((rdev & 0xFFF00) >> 8, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00))


def _dev_encode(dev: int) -> int:
    ma, mi = os.major(dev), os.minor(dev)
    return ((mi & 0xFF) | (ma << 8) | ((mi & ~0xFF) << 12)) & 0xFFFFFFFF


def _split(t: float) -> tuple[int, int]:
    sec = int(t)
    return sec, int((t - sec) * 1e9)


class FileServer:
    """Serves FUSE requests for the directory open as `root_fd` (O_PATH)."""

    def __init__(self, root_fd: int, proc_fd: int, opts: ServerOptions,
                 counters: memoryview | None = None) -> None:
        self.opts = opts
        self.proc_fd = proc_fd  # /proc, open: files are reopened as self/fd/N beneath it
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        # every node and handle holds an fd: leave some for the rest of the process
        self.tables = Tables(root_fd, max(256, min(soft, 1 << 20) - 1024), counters)
        self.ttl = _split(_TIMEOUTS[opts.cache])
        self.as_root = os.geteuid() == 0
        self.initialized = False
        self.minor = 0
        # told when a session starts or ends (the device keeps it for the next worker)
        self.on_session: Callable[[bool, int], None] = lambda on, minor: None
        self.bad = Limited(log)
        self._serving_pid = 0  # the process whose umask is cleared (see handle)
        self._ops = {op: getattr(self, "op_" + op.name.lower()) for op in Op
                     if hasattr(self, "op_" + op.name.lower())}

    # -- the request loop's entry -----------------------------------------------------------

    def handle(self, readable: list[memoryview], writable: list[memoryview]) -> int:
        """Serve the request in `readable`; write the reply into `writable`. Returns the
        bytes written (0 for requests that have no reply)."""
        if self._serving_pid != os.getpid():
            # modes arrive masked by the client's umask: ours must take nothing more away.
            # Cleared in the process that serves requests (a forked worker, a new one after
            # each queue restart), never at start-up: the daemon's socket keeps the umask
            os.umask(0)
            self._serving_pid = os.getpid()
        n = len(readable)
        first = readable[0] if n else memoryview(b"")
        total = len(first) if n == 1 else iov_len(readable)
        if total < _IN_SIZE:
            self.bad.log(logging.WARNING, "a request of %d bytes has no FUSE header", total)
            return 0
        # the usual shapes: all in one buffer, or the header alone then the arguments
        hdr = (_IN_UNPACK(first, 0) if len(first) >= _IN_SIZE
               else _IN_UNPACK(iov_read(readable, _IN_SIZE), 0))
        opcode, extlen = hdr[1], hdr[7]
        if opcode == _WRITE:  # the data stays where it is
            body = iov_read(readable, _WRITE_IN_SIZE, _IN_SIZE)
        elif total - _IN_SIZE > MAX_BODY:
            return self._reply_error(hdr[2], writable, errno.EINVAL)
        else:
            if n == 1:
                body = bytes(first[_IN_SIZE:])
            elif n == 2 and len(first) == _IN_SIZE:
                body = bytes(readable[1])
            else:
                body = iov_read(readable, total - _IN_SIZE, _IN_SIZE)
            if extlen:  # extensions we never asked for (e.g. a security context)
                body = body[: max(0, len(body) - 8 * extlen)]
        req = Request(hdr, body, readable, writable)
        op = _OPS.get(opcode)
        if op is None:
            return self._reply_error(req.unique, writable, errno.ENOSYS)
        try:
            fn = self._ops.get(op)
            if fn is None:
                raise OSError(errno.ENOSYS, "not implemented")
            if not self.initialized and op is not Op.INIT:
                raise OSError(errno.EIO, "request before INIT")
            if self.opts.readonly and op in _WRITE_OPS:
                raise OSError(errno.EROFS, "read-only export")
            result = fn(req)
        except OSError as e:
            err = e.errno or errno.EIO
        except (OverflowError, ValueError, UnicodeError):  # numbers or names out of range
            err = errno.EINVAL
        except Exception:  # a bug of ours: this request fails, the others go on
            self.bad.log(logging.ERROR, "FUSE %s failed", op.name)
            log.debug("FUSE %s failed", op.name, exc_info=True)
            err = errno.EIO
        else:
            err = 0
        if err:
            return 0 if op in _NO_REPLY else self._reply_error(req.unique, writable, err)
        if result is None:
            return 0
        if isinstance(result, int):  # the payload is in place after the header
            return self._reply_header(req.unique, writable, result)
        return self._reply(req.unique, writable, result)

    def _reply(self, unique: int, writable: list[memoryview], payload: bytes) -> int:
        n = _OUT_SIZE + len(payload)
        w0 = writable[0] if writable else None
        if w0 is not None and len(w0) >= n:  # the reply fits the first buffer
            _OUT_PACK(w0, 0, n, 0, unique)
            w0[_OUT_SIZE:n] = payload
            return n
        if (w0 is not None and len(w0) == _OUT_SIZE and len(writable) > 1
                and len(writable[1]) >= len(payload)):  # header, then the reply (Linux)
            _OUT_PACK(w0, 0, n, 0, unique)
            writable[1][: len(payload)] = payload
            return n
        if n > iov_len(writable):
            self.bad.log(logging.WARNING, "a reply of %d bytes does not fit the %d bytes "
                         "the driver gave", n, iov_len(writable))
            return self._reply_error(unique, writable, errno.EIO)
        return iov_write(writable, abi.OUT_HEADER.pack(n, 0, unique) + payload)

    def _reply_header(self, unique: int, writable: list[memoryview], payload: int) -> int:
        n = abi.OUT_HEADER.size + payload
        iov_write(writable, abi.OUT_HEADER.pack(n, 0, unique))
        return n

    def _reply_error(self, unique: int, writable: list[memoryview], err: int) -> int:
        if iov_len(writable) < abi.OUT_HEADER.size:
            self.bad.log(logging.WARNING, "a request without room for the reply header")
            return 0
        return iov_write(writable, abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -err, unique))

    # -- helpers ------------------------------------------------------------------------

    def _reopen(self, ino: Inode, flags: int) -> int:
        """A real fd on a regular file or a directory node (never another kind)."""
        if ino.is_dir:
            return os.open(".", flags | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=ino.fd)
        return self._reopen_file(ino.fd, flags)

    def _reopen_file(self, path_fd: int, flags: int) -> int:
        """A real fd on the regular file open as `path_fd` (O_PATH); ELOOP for a symlink,
        ENXIO for a FIFO or a device node, EISDIR for a directory."""
        mode = os.fstat(path_fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EISDIR if stat.S_ISDIR(mode) else errno.ELOOP
                          if stat.S_ISLNK(mode) else errno.ENXIO,
                          "only regular files and directories are opened")
        return os.open(own_fd(path_fd), flags | os.O_CLOEXEC, dir_fd=self.proc_fd)

    def _attr(self, st: os.stat_result, flags: int = 0) -> bytes:
        a, m, c = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return abi.ATTR.pack(st.st_ino, st.st_size, st.st_blocks, a // 10**9, m // 10**9,
                             c // 10**9, a % 10**9, m % 10**9, c % 10**9, st.st_mode,
                             min(st.st_nlink, 0xFFFFFFFF), st.st_uid, st.st_gid,
                             _dev_encode(st.st_rdev), st.st_blksize, flags)

    def _attr_out(self, st: os.stat_result) -> bytes:
        return abi.ATTR_OUT.pack(self.ttl[0], self.ttl[1], 0) + self._attr(st)

    def _entry(self, ino: Inode, st: os.stat_result, parent: Inode | None = None) -> bytes:
        flags = 0
        if (self.opts.announce_submounts and parent is not None and ino.is_dir
                and st.st_dev != parent.dev):
            flags = abi.ATTR_SUBMOUNT
        return (abi.ENTRY_OUT.pack(ino.nodeid, 0, self.ttl[0], self.ttl[0], self.ttl[1],
                                   self.ttl[1]) + self._attr(st, flags))

    def _lookup(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        """One lookup of `name` in `parent` (the caller replies with the entry)."""
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if name == b"." or (name == b".." and parent is self.tables.root):
            fd = os.open(".", os.O_PATH | os.O_CLOEXEC | os.O_DIRECTORY, dir_fd=parent.fd)
        elif name == b"..":
            fd = os.open("..", os.O_PATH | os.O_CLOEXEC | os.O_DIRECTORY, dir_fd=parent.fd)
        else:
            fd = open_beneath(parent.fd, name, os.O_PATH)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        return self.tables.add(fd, st), st

    def _lookup_entry(self, parent: Inode, name: bytes) -> bytes:
        ino, st = self._lookup(parent, name)
        return self._entry(ino, st, parent)

    def _as_caller(self, req: Request) -> _Creds:
        return _Creds(req.uid, req.gid, self.as_root)

    # -- session ------------------------------------------------------------------------

    def op_init(self, req: Request) -> bytes:
        major, minor, readahead, flags = _unpack(abi.INIT_IN, req.body)
        if major < abi.KERNEL_VERSION:
            raise OSError(errno.EPROTO, f"FUSE {major}.{minor} is too old")
        if major > abi.KERNEL_VERSION:  # the client retries with ours
            return struct.pack("<II", abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION)
        if minor < abi.MIN_MINOR:
            raise OSError(errno.EPROTO, f"FUSE 7.{minor} is too old (7.{abi.MIN_MINOR}+)")
        if self.initialized:  # a new session (the guest rebooted): start afresh
            self.tables.clear()
        want = (abi.ASYNC_READ | abi.BIG_WRITES | abi.AUTO_INVAL_DATA | abi.DO_READDIRPLUS
                | abi.READDIRPLUS_AUTO | abi.PARALLEL_DIROPS | abi.MAX_PAGES
                | abi.ASYNC_DIO)
        if self.opts.announce_submounts:
            want |= abi.SUBMOUNTS
        if self.opts.cache == "always":
            want |= abi.CACHE_SYMLINKS
        self.minor = min(minor, abi.KERNEL_MINOR_VERSION)
        self.initialized = True
        self.on_session(True, self.minor)
        out = abi.INIT_OUT.pack(abi.KERNEL_VERSION, self.minor, readahead, flags & want,
                                64, 48, MAX_WRITE, 1, MAX_PAGES, 0, 0)
        return out  # (the 24-byte reply of clients before 7.23 is not needed: 7.27+)

    def op_destroy(self, req: Request) -> bytes:
        self.tables.clear()
        self.initialized = False
        self.on_session(False, 0)
        return b""

    def reset(self) -> None:
        self.tables.clear()
        self.initialized = False

    def export(self) -> tuple[dict[str, Any], list[int]]:
        """The session, for the next worker (no request running)."""
        tables, fds = self.tables.export()
        return {"initialized": self.initialized, "minor": self.minor, "tables": tables}, fds

    def resume_lost(self, minor: int) -> None:
        """Serve on a session whose tables are gone: the root answers, every other node
        id is ESTALE and every handle EBADF, so the client looks names up again; new
        ones go on from the last ids handed out (Tables' counters), none the client holds."""
        self.tables = Tables(self.tables.root.fd, self.tables.limit, self.tables.counters)
        self.initialized, self.minor = True, minor

    def abandon(self) -> None:
        """Drop the tables without closing anything (a restore that failed half way)."""
        self.tables = Tables(self.tables.root.fd, self.tables.limit, self.tables.counters)
        self.initialized = False

    def restore(self, state: dict[str, Any], fds: list[int]) -> None:
        self.tables.restore(state["tables"], fds)
        self.initialized, self.minor = state["initialized"], state["minor"]

    # -- names --------------------------------------------------------------------------

    def op_lookup(self, req: Request) -> bytes:
        (name,) = _strings(req.body, 1)
        with self.tables.inode(req.nodeid) as parent:
            return self._lookup_entry(parent, _name(name))

    def op_forget(self, req: Request) -> None:
        (n,) = _unpack(abi.FORGET_IN, req.body)
        self.tables.forget(req.nodeid, n)

    def op_batch_forget(self, req: Request) -> None:
        count, _ = _unpack(abi.BATCH_FORGET_IN, req.body)
        start = abi.BATCH_FORGET_IN.size
        count = min(count, (len(req.body) - start) // abi.FORGET_ONE.size)
        for nodeid, n in abi.FORGET_ONE.iter_unpack(
                req.body[start : start + count * abi.FORGET_ONE.size]):
            self.tables.forget(nodeid, n)

    def op_interrupt(self, req: Request) -> None:
        return None  # requests are never parked here: nothing to interrupt

    def op_getattr(self, req: Request) -> bytes:
        flags, _, fh = _unpack(abi.GETATTR_IN, req.body)
        if flags & abi.GETATTR_FH:
            with self.tables.handle(fh) as h:
                return self._attr_out(os.fstat(h.fd))
        with self.tables.inode(req.nodeid) as ino:
            return self._attr_out(os.fstat(ino.fd))

    def op_setattr(self, req: Request) -> bytes:
        (valid, _, fh, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _, uid, gid,
         _) = _unpack(abi.SETATTR_IN, req.body)
        with self.tables.inode(req.nodeid) as ino:
            if valid & abi.FATTR_MODE:
                if ino.is_symlink:
                    raise OSError(errno.EOPNOTSUPP, "a symlink's mode cannot change")
                os.chmod(own_fd(ino.fd), stat.S_IMODE(mode), dir_fd=self.proc_fd)
            if valid & (abi.FATTR_UID | abi.FATTR_GID):
                chown_fd(ino.fd, uid if valid & abi.FATTR_UID else -1,
                         gid if valid & abi.FATTR_GID else -1)
            if valid & abi.FATTR_SIZE:
                if valid & abi.FATTR_FH:
                    with self.tables.handle(fh) as h:
                        os.ftruncate(h.fd, size)
                else:
                    fd = self._reopen(ino, os.O_WRONLY)
                    try:
                        os.ftruncate(fd, size)
                    finally:
                        os.close(fd)
            if valid & (abi.FATTR_ATIME | abi.FATTR_MTIME):
                a = ((0, UTIME_NOW) if valid & abi.FATTR_ATIME_NOW else (atime, atimensec)
                     ) if valid & abi.FATTR_ATIME else (0, UTIME_OMIT)
                m = ((0, UTIME_NOW) if valid & abi.FATTR_MTIME_NOW else (mtime, mtimensec)
                     ) if valid & abi.FATTR_MTIME else (0, UTIME_OMIT)
                utimens_fd(ino.fd, a, m)
            return self._attr_out(os.fstat(ino.fd))

    def op_readlink(self, req: Request) -> bytes:
        with self.tables.inode(req.nodeid) as ino:
            if not ino.is_symlink:
                raise OSError(errno.EINVAL, "not a symlink")
            return os.readlink(b"", dir_fd=ino.fd)

    def op_symlink(self, req: Request) -> bytes:
        name, target = _strings(req.body, 2)
        name = _new_name(name)
        if not target or len(target) >= 4096:
            raise OSError(errno.ENAMETOOLONG if target else errno.ENOENT, "bad symlink target")
        with self.tables.inode(req.nodeid) as parent, self._as_caller(req):
            os.symlink(target, name, dir_fd=parent.fd)
        return self._created(req, name)

    def op_mknod(self, req: Request) -> bytes:
        mode, rdev, _, _ = _unpack(abi.MKNOD_IN, req.body)
        (name,) = _strings(req.body[abi.MKNOD_IN.size :], 1)
        name = _new_name(name)
        with self.tables.inode(req.nodeid) as parent, self._as_caller(req):
            os.mknod(name, mode, _dev_decode(rdev), dir_fd=parent.fd)
        return self._created(req, name)

    def op_mkdir(self, req: Request) -> bytes:
        mode, _ = _unpack(abi.MKDIR_IN, req.body)
        (name,) = _strings(req.body[abi.MKDIR_IN.size :], 1)
        name = _new_name(name)
        with self.tables.inode(req.nodeid) as parent, self._as_caller(req):
            os.mkdir(name, stat.S_IMODE(mode), dir_fd=parent.fd)
        return self._created(req, name)

    def _created(self, req: Request, name: bytes) -> bytes:
        with self.tables.inode(req.nodeid) as parent:
            return self._lookup_entry(parent, name)

    def op_unlink(self, req: Request) -> bytes:
        (name,) = _strings(req.body, 1)
        with self.tables.inode(req.nodeid) as parent:
            os.unlink(_new_name(name), dir_fd=parent.fd)
        return b""

    def op_rmdir(self, req: Request) -> bytes:
        (name,) = _strings(req.body, 1)
        with self.tables.inode(req.nodeid) as parent:
            os.rmdir(_new_name(name), dir_fd=parent.fd)
        return b""

    def op_rename(self, req: Request) -> bytes:
        (newdir,) = _unpack(abi.RENAME_IN, req.body)
        return self._rename(req, newdir, 0, req.body[abi.RENAME_IN.size :])

    def op_rename2(self, req: Request) -> bytes:
        newdir, flags, _ = _unpack(abi.RENAME2_IN, req.body)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT):
            raise OSError(errno.EINVAL, "unknown rename flags")
        return self._rename(req, newdir, flags, req.body[abi.RENAME2_IN.size :])

    def _rename(self, req: Request, newdir: int, flags: int, names: bytes) -> bytes:
        old, new = _strings(names, 2)
        old, new = _new_name(old), _new_name(new)
        with self.tables.inode(req.nodeid) as src, self.tables.inode(newdir) as dst:
            if flags:
                rename2(src.fd, old, dst.fd, new, flags)
            else:
                os.rename(old, new, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        return b""

    def op_link(self, req: Request) -> bytes:
        (oldnode,) = _unpack(abi.LINK_IN, req.body)
        (name,) = _strings(req.body[abi.LINK_IN.size :], 1)
        name = _new_name(name)
        with self.tables.inode(oldnode) as ino, self.tables.inode(req.nodeid) as parent:
            if ino.is_dir:
                raise OSError(errno.EPERM, "hard links to directories are not allowed")
            os.link(own_fd(ino.fd), name, src_dir_fd=self.proc_fd,
                    dst_dir_fd=parent.fd, follow_symlinks=True)
            return self._lookup_entry(parent, name)

    # -- files --------------------------------------------------------------------------

    def _open_flags(self, flags: int) -> int:
        flags &= ~_OPEN_DROP
        if self.opts.readonly and (flags & _ACC != os.O_RDONLY or flags & os.O_TRUNC):
            raise OSError(errno.EROFS, "read-only export")
        return flags

    def reopen(self, path_fd: int, is_dir: bool, flags: int) -> int:
        """An open file of a migrated session's, opened again as OPEN (or OPENDIR)
        opened it: `path_fd` is its node's O_PATH fd."""
        if is_dir:
            return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=path_fd)
        return self._reopen_file(path_fd, self._open_flags(flags & ~os.O_TRUNC))

    def _open_out(self, fh: int, is_dir: bool = False) -> bytes:
        flags = 0
        if self.opts.cache == "never" and not is_dir:
            flags = abi.FOPEN_DIRECT_IO
        elif self.opts.cache == "always":
            flags = abi.FOPEN_CACHE_DIR if is_dir else abi.FOPEN_KEEP_CACHE
        return abi.OPEN_OUT.pack(fh, flags, 0)

    def op_open(self, req: Request) -> bytes:
        flags, _ = _unpack(abi.OPEN_IN, req.body)
        flags = self._open_flags(flags)
        with self.tables.inode(req.nodeid) as ino:
            if ino.is_dir:
                raise OSError(errno.EISDIR, "a directory")
            fd = self._reopen(ino, flags)
            return self._open_out(self.tables.open(fd, ino, False))

    def op_create(self, req: Request) -> bytes:
        flags, mode, _, _ = _unpack(abi.CREATE_IN, req.body)
        (name,) = _strings(req.body[abi.CREATE_IN.size :], 1)
        name = _new_name(name)
        excl = flags & os.O_EXCL
        flags = self._open_flags(flags)
        with self.tables.inode(req.nodeid) as parent:
            try:  # a new file only: an existing name may be a FIFO or a device node
                with self._as_caller(req):
                    fd = open_beneath(parent.fd, name, flags | os.O_CREAT | os.O_EXCL,
                                      stat.S_IMODE(mode))
            except FileExistsError:
                if excl:
                    raise
                fd = self._open_existing(parent, name, flags)
            try:
                path_fd = os.open(own_fd(fd), os.O_PATH | os.O_CLOEXEC,
                                  dir_fd=self.proc_fd)
                st = os.fstat(path_fd)
            except OSError:
                os.close(fd)
                raise
            ino = self.tables.add(path_fd, st)
            try:  # (a FORGET racing us may have dropped the node meanwhile: ESTALE)
                fh = self.tables.open(fd, ino, False)
            except OSError:
                os.close(fd)
                raise
            return self._entry(ino, st, parent) + self._open_out(fh)

    def _open_existing(self, parent: Inode, name: bytes, flags: int) -> int:
        """CREATE without O_EXCL of a name that exists: opened as OPEN opens a node (a
        regular file only; opening a FIFO would block us, a device node reach the host's)."""
        path_fd = open_beneath(parent.fd, name, os.O_PATH)
        try:
            return self._reopen_file(path_fd, flags)
        finally:
            os.close(path_fd)

    def op_read(self, req: Request) -> int:
        fh, offset, size, *_ = _unpack(abi.READ_IN, req.body)
        room = iov_len(req.writable) - abi.OUT_HEADER.size
        if room < 0:
            raise OSError(errno.EINVAL, "no room for the reply")
        size = min(size, room, MAX_WRITE)
        with self.tables.handle(fh) as h:
            bufs = iov_slice(req.writable, abi.OUT_HEADER.size, abi.OUT_HEADER.size + size)
            return read_into(h.fd, bufs, offset, size) if size else 0

    def op_write(self, req: Request) -> bytes:
        fh, offset, size, *_ = _unpack(abi.WRITE_IN, req.body)
        start = abi.IN_HEADER.size + abi.WRITE_IN.size
        if size > iov_len(req.readable) - start or size > MAX_WRITE:
            raise OSError(errno.EINVAL, "write data missing")
        with self.tables.handle(fh) as h:
            if offset + size > 1 << 63:
                raise OSError(errno.EFBIG, "beyond the largest offset")
            write_from(h.fd, iov_slice(req.readable, start, start + size), offset, size)
        return abi.WRITE_OUT.pack(size, 0)

    def op_release(self, req: Request) -> bytes:
        fh, *_ = _unpack(abi.RELEASE_IN, req.body)
        self.tables.release(fh, False)
        return b""

    def op_flush(self, req: Request) -> bytes:
        fh, *_ = _unpack(abi.FLUSH_IN, req.body)
        with self.tables.handle(fh) as h:
            os.close(os.dup(h.fd))  # what close() of the client's file does (e.g. NFS)
        return b""

    def op_fsync(self, req: Request) -> bytes:
        fh, flags, _ = _unpack(abi.FSYNC_IN, req.body)
        with self.tables.handle(fh) as h:
            (os.fdatasync if flags & abi.FSYNC_FDATASYNC else os.fsync)(h.fd)
        return b""

    def op_fallocate(self, req: Request) -> bytes:
        fh, offset, length, mode, _ = _unpack(abi.FALLOCATE_IN, req.body)
        with self.tables.handle(fh) as h:
            fallocate(h.fd, mode, offset, length)
        return b""

    def op_lseek(self, req: Request) -> bytes:
        fh, offset, whence, _ = _unpack(abi.LSEEK_IN, req.body)
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "unknown whence")
        with self.tables.handle(fh) as h:
            return abi.LSEEK_OUT.pack(os.lseek(h.fd, offset, whence))

    def op_copy_file_range(self, req: Request) -> bytes:
        fh_in, off_in, _, fh_out, off_out, length, flags = _unpack(abi.COPY_FILE_RANGE_IN,
                                                                    req.body)
        if flags:
            raise OSError(errno.EINVAL, "copy_file_range flags")
        with self.tables.handle(fh_in) as src, self.tables.handle(fh_out) as dst:
            n = os.copy_file_range(src.fd, dst.fd, min(length, 1 << 30), off_in, off_out)
        return abi.WRITE_OUT.pack(n, 0)

    def op_statfs(self, req: Request) -> bytes:
        with self.tables.inode(req.nodeid) as ino:
            s = os.statvfs(ino.fd)
        return abi.STATFS_OUT.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
                                   s.f_bsize, s.f_namemax, s.f_frsize, 0)

    def op_access(self, req: Request) -> bytes:
        mask, _ = _unpack(abi.ACCESS_IN, req.body)
        with self.tables.inode(req.nodeid) as ino:
            st = os.fstat(ino.fd)
        if mask & os.W_OK and self.opts.readonly:
            raise OSError(errno.EROFS, "read-only export")
        if not _permits(st, req.uid, req.gid, mask):
            raise OSError(errno.EACCES, "permission denied")
        return b""

    def op_syncfs(self, req: Request) -> bytes:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                     dir_fd=self.tables.root.fd)
        try:
            syncfs(fd)  # the shared directory's file system (submounts are not walked)
        finally:
            os.close(fd)
        return b""

    # -- directories ---------------------------------------------------------------------

    def op_opendir(self, req: Request) -> bytes:
        with self.tables.inode(req.nodeid) as ino:
            if not ino.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
            fd = self._reopen(ino, os.O_RDONLY)
            return self._open_out(self.tables.open(fd, ino, True), is_dir=True)

    def op_releasedir(self, req: Request) -> bytes:
        fh, *_ = _unpack(abi.RELEASE_IN, req.body)
        self.tables.release(fh, True)
        return b""

    def op_fsyncdir(self, req: Request) -> bytes:
        fh, flags, _ = _unpack(abi.FSYNC_IN, req.body)
        with self.tables.handle(fh, is_dir=True) as h:
            (os.fdatasync if flags & abi.FSYNC_FDATASYNC else os.fsync)(h.fd)
        return b""

    def op_readdir(self, req: Request) -> bytes:
        return self._readdir(req, plus=False)

    def op_readdirplus(self, req: Request) -> bytes:
        return self._readdir(req, plus=True)

    def _readdir(self, req: Request, plus: bool) -> bytes:
        fh, offset, size, *_ = _unpack(abi.READ_IN, req.body)
        size = min(size, iov_len(req.writable) - abi.OUT_HEADER.size, MAX_WRITE)
        if offset >= 1 << 63:  # our d_off values, signed, went out as unsigned
            offset -= 1 << 64
        out = bytearray()
        with self.tables.handle(fh, is_dir=True) as h, h.lock:
            dir_ino = h.inode
            for ino, off, dtype, name in getdents(h.fd, offset):
                rec = abi.align8(abi.DIRENT.size + len(name))
                need = rec + (abi.ENTRY_OUT.size + abi.ATTR.size if plus else 0)
                if len(out) + need > size:
                    break
                if plus:
                    if name in (b".", b".."):
                        entry = bytes(abi.ENTRY_OUT.size + abi.ATTR.size)
                    else:
                        try:
                            entry = self._lookup_entry(dir_ino, name)
                        except OSError:  # gone meanwhile, or not for us (a symlink race)
                            continue
                    out += entry
                out += abi.DIRENT.pack(ino, off & 0xFFFFFFFFFFFFFFFF, len(name), dtype) + name
                out += bytes(rec - abi.DIRENT.size - len(name))
        return bytes(out)

    # -- extended attributes -------------------------------------------------------------

    def _xattr_fd(self, ino: Inode) -> int:
        """A real fd of a regular file or directory node to change its attributes on."""
        if self._no_xattrs(ino):
            raise OSError(errno.EPERM, "no extended attributes on symlinks, FIFOs and "
                          "device nodes here")
        return self._reopen(ino, os.O_RDONLY | os.O_NONBLOCK)

    def _no_xattrs(self, ino: Inode) -> bool:
        """Symlinks, FIFOs and device nodes are never opened: they read as having no
        extended attributes (what `cp -a` and `rsync -X` cope with), and refuse new ones."""
        if not self.opts.xattr:
            raise OSError(errno.ENOSYS, "extended attributes are off (--xattr)")
        return ino.is_symlink or not (ino.is_dir or stat.S_ISREG(os.fstat(ino.fd).st_mode))

    def op_setxattr(self, req: Request) -> bytes:
        size, flags = _unpack(abi.SETXATTR_IN, req.body)
        rest = req.body[abi.SETXATTR_IN.size :]
        (name,) = _strings(rest, 1)
        value = rest[len(name) + 1 :]
        if size > len(value):
            raise OSError(errno.EINVAL, "value shorter than its size")
        with self.tables.inode(req.nodeid) as ino:
            fd = self._xattr_fd(ino)
            try:
                os.setxattr(fd, name, value[:size], flags)
            finally:
                os.close(fd)
        return b""

    def op_getxattr(self, req: Request) -> bytes:
        size, _ = _unpack(abi.GETXATTR_IN, req.body)
        (name,) = _strings(req.body[abi.GETXATTR_IN.size :], 1)
        with self.tables.inode(req.nodeid) as ino:
            if self._no_xattrs(ino):
                raise OSError(errno.ENODATA, "no such attribute")
            fd = self._reopen(ino, os.O_RDONLY | os.O_NONBLOCK)
            try:
                value = os.getxattr(fd, name)
            finally:
                os.close(fd)
        return self._sized(value, size)

    def op_listxattr(self, req: Request) -> bytes:
        size, _ = _unpack(abi.GETXATTR_IN, req.body)
        with self.tables.inode(req.nodeid) as ino:
            if self._no_xattrs(ino):
                names = []
            else:
                fd = self._reopen(ino, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    names = os.listxattr(fd)
                finally:
                    os.close(fd)
        return self._sized(b"".join(n.encode("utf-8", "surrogateescape") + b"\0"
                                    for n in names), size)

    @staticmethod
    def _sized(value: bytes, size: int) -> bytes:
        if size == 0:
            return abi.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise OSError(errno.ERANGE, "value larger than the buffer")
        return value

    def op_removexattr(self, req: Request) -> bytes:
        (name,) = _strings(req.body, 1)
        with self.tables.inode(req.nodeid) as ino:
            fd = self._xattr_fd(ino)
            try:
                os.removexattr(fd, name)
            finally:
                os.close(fd)
        return b""


def _permits(st: os.stat_result, uid: int, gid: int, mask: int) -> bool:
    """ACCESS for the caller's uid/gid (its supplementary groups are not sent)."""
    mode = st.st_mode
    if uid == 0:
        return not (mask & os.X_OK) or bool(mode & 0o111) or stat.S_ISDIR(mode)
    bits = (mode >> 6) & 7 if st.st_uid == uid else (mode >> 3) & 7 if st.st_gid == gid \
        else mode & 7
    return mask & 7 & ~bits == 0


class _Creds:
    """Run a creating call as the caller (fsuid/fsgid of this thread), when we are root."""

    __slots__ = ("gid", "on", "uid")

    def __init__(self, uid: int, gid: int, on: bool) -> None:
        self.uid, self.gid, self.on = uid, gid, on and (uid != 0 or gid != 0)

    def __enter__(self) -> None:
        if self.on:
            set_fs_creds(self.uid, self.gid)

    def __exit__(self, *exc: object) -> None:
        if self.on:
            set_fs_creds(0, 0)
