"""A virtio-fs driver over the Python front-end: FUSE requests as Linux's virtio_fs builds
them (the header and arguments readable, the reply header and reply writable), to any
vhost-user-fs back-end (ours, virtiofsd)."""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

from ..fuse import abi
from ..fuse.abi import Op
from .client import Frontend

_REPLY_ROOM = 4096 + abi.OUT_HEADER.size


class FuseError(OSError):
    """The server answered a request with an error."""


@dataclass(frozen=True)
class Attr:
    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int

    @classmethod
    def unpack(cls, data: bytes) -> Attr:
        return cls(*abi.ATTR.unpack_from(data))


@dataclass(frozen=True)
class Entry:
    nodeid: int
    generation: int
    attr: Attr

    @classmethod
    def unpack(cls, data: bytes) -> Entry:
        nodeid, gen, *_ = abi.ENTRY_OUT.unpack_from(data)
        return cls(nodeid, gen, Attr.unpack(data[abi.ENTRY_OUT.size :]))


@dataclass(frozen=True)
class Dirent:
    ino: int
    off: int
    type: int
    name: bytes
    entry: Entry | None  # READDIRPLUS


class FsClient:
    """FUSE over the queues of a vhost-user-fs back-end set up by `fe` (hiprio 0, requests
    on `queue`)."""

    def __init__(self, fe: Frontend, queue: int = 1, arena: int = 4 << 20) -> None:
        self.fe, self.queue = fe, queue
        self.arena_size = arena
        self.arena = fe.ram.alloc(arena, 4096)
        self.unique = 0
        self.uid = self.gid = 0
        self.init_out: tuple[int, ...] = ()

    # -- the wire ---------------------------------------------------------------------------

    def submit(self, opcode: int, nodeid: int, body: bytes = b"", data: bytes = b"",
               reply: int = _REPLY_ROOM, queue: int | None = None, at: int = 0,
               kick: bool = True) -> tuple[int, int]:
        """Post one request in the arena at offset `at`; returns (head, reply address)."""
        q = self.queue if queue is None else queue
        self.unique += 2
        header = abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body) + len(data), opcode,
                                    self.unique, nodeid, self.uid, self.gid, os.getpid(), 0, 0)
        ram = self.fe.ram
        req = header + body
        need = len(req) + len(data) + reply + 64
        if at + need > self.arena_size:
            raise MemoryError("request arena exhausted")
        base = self.arena + at
        ram.at(base, len(req))[:] = req
        bufs = [(base, len(req), False)]
        pos = base + (len(req) + 15) // 16 * 16
        if data:
            ram.at(pos, len(data))[:] = data
            bufs.append((pos, len(data), False))
            pos += (len(data) + 15) // 16 * 16
        if reply:
            bufs.append((pos, abi.OUT_HEADER.size, True))
            if reply > abi.OUT_HEADER.size:
                bufs.append((pos + abi.OUT_HEADER.size, reply - abi.OUT_HEADER.size, True))
        head = self.fe.queues[q].ring.add(bufs)
        if kick:
            self.fe.kick(q)
        return head, pos

    def reply_of(self, addr: int, written: int) -> bytes:
        """The payload of a reply at `addr` (raises FuseError for an error reply)."""
        if written < abi.OUT_HEADER.size:
            raise ValueError(f"a reply of {written} bytes")
        raw = bytes(self.fe.ram.at(addr, written))
        n, error, _ = abi.OUT_HEADER.unpack_from(raw)
        if n != written:
            raise ValueError(f"reply header says {n} bytes, used length {written}")
        if error:
            raise FuseError(-error, os.strerror(-error))
        return raw[abi.OUT_HEADER.size :]

    def request(self, opcode: int, nodeid: int = abi.ROOT_ID, body: bytes = b"",
                data: bytes = b"", reply: int = _REPLY_ROOM, timeout: float = 10.0) -> bytes:
        _, addr = self.submit(opcode, nodeid, body, data, reply)
        [(_, written)] = self.fe.wait_used(self.queue, 1, timeout)
        return self.reply_of(addr, written)

    def no_reply(self, opcode: int, nodeid: int, body: bytes) -> None:
        """FORGET and friends go on the hiprio queue and get no reply."""
        self.submit(opcode, nodeid, body, reply=0, queue=0)
        self.fe.wait_used(0, 1)

    # -- operations ---------------------------------------------------------------------------

    def init(self, minor: int = abi.KERNEL_MINOR_VERSION,
             flags: int = 0xFFFFFFFF) -> tuple[int, ...]:
        out = self.request(Op.INIT, 0, abi.INIT_IN.pack(abi.KERNEL_VERSION, minor, 1 << 17,
                                                        flags) + bytes(48))
        self.init_out = abi.INIT_OUT.unpack(out.ljust(abi.INIT_OUT.size, b"\0"))
        return self.init_out

    def lookup(self, parent: int, name: bytes) -> Entry:
        return Entry.unpack(self.request(Op.LOOKUP, parent, name + b"\0"))

    def forget(self, nodeid: int, n: int = 1) -> None:
        self.no_reply(Op.FORGET, nodeid, abi.FORGET_IN.pack(n))

    def batch_forget(self, pairs: list[tuple[int, int]]) -> None:
        body = abi.BATCH_FORGET_IN.pack(len(pairs), 0) + b"".join(
            abi.FORGET_ONE.pack(*p) for p in pairs)
        self.no_reply(Op.BATCH_FORGET, 0, body)

    def getattr(self, nodeid: int, fh: int | None = None) -> Attr:
        body = abi.GETATTR_IN.pack(abi.GETATTR_FH if fh is not None else 0, 0, fh or 0)
        return Attr.unpack(self.request(Op.GETATTR, nodeid, body)[abi.ATTR_OUT.size :])

    def setattr(self, nodeid: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, fh: int | None = None,
                atime: tuple[int, int] | None = None, mtime: tuple[int, int] | None = None
                ) -> Attr:
        valid = 0
        for bit, v in ((abi.FATTR_MODE, mode), (abi.FATTR_UID, uid), (abi.FATTR_GID, gid),
                       (abi.FATTR_SIZE, size), (abi.FATTR_FH, fh), (abi.FATTR_ATIME, atime),
                       (abi.FATTR_MTIME, mtime)):
            if v is not None:
                valid |= bit
        a, m = atime or (0, 0), mtime or (0, 0)
        body = abi.SETATTR_IN.pack(valid, 0, fh or 0, size or 0, 0, a[0], m[0], 0, a[1], m[1],
                                   0, mode or 0, 0, uid or 0, gid or 0, 0)
        return Attr.unpack(self.request(Op.SETATTR, nodeid, body)[abi.ATTR_OUT.size :])

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755) -> Entry:
        return Entry.unpack(self.request(Op.MKDIR, parent,
                                         abi.MKDIR_IN.pack(mode, 0) + name + b"\0"))

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int = 0) -> Entry:
        return Entry.unpack(self.request(Op.MKNOD, parent,
                                         abi.MKNOD_IN.pack(mode, rdev, 0, 0) + name + b"\0"))

    def symlink(self, parent: int, name: bytes, target: bytes) -> Entry:
        return Entry.unpack(self.request(Op.SYMLINK, parent, name + b"\0" + target + b"\0"))

    def readlink(self, nodeid: int) -> bytes:
        return self.request(Op.READLINK, nodeid)

    def link(self, nodeid: int, parent: int, name: bytes) -> Entry:
        return Entry.unpack(self.request(Op.LINK, parent,
                                         abi.LINK_IN.pack(nodeid) + name + b"\0"))

    def unlink(self, parent: int, name: bytes) -> None:
        self.request(Op.UNLINK, parent, name + b"\0")

    def rmdir(self, parent: int, name: bytes) -> None:
        self.request(Op.RMDIR, parent, name + b"\0")

    def rename(self, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int = 0) -> None:
        if flags:
            self.request(Op.RENAME2, parent, abi.RENAME2_IN.pack(newparent, flags, 0)
                         + name + b"\0" + newname + b"\0")
        else:
            self.request(Op.RENAME, parent, abi.RENAME_IN.pack(newparent)
                         + name + b"\0" + newname + b"\0")

    def open(self, nodeid: int, flags: int = os.O_RDWR) -> int:
        fh, _, _ = abi.OPEN_OUT.unpack(self.request(Op.OPEN, nodeid, abi.OPEN_IN.pack(flags, 0)))
        return int(fh)

    def create(self, parent: int, name: bytes, mode: int = 0o644,
               flags: int = os.O_RDWR | os.O_CREAT | os.O_EXCL) -> tuple[Entry, int]:
        out = self.request(Op.CREATE, parent, abi.CREATE_IN.pack(flags, mode, 0, 0)
                           + name + b"\0")
        entry = Entry.unpack(out)
        fh, _, _ = abi.OPEN_OUT.unpack_from(out, abi.ENTRY_OUT.size + abi.ATTR.size)
        return entry, int(fh)

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        return self.request(Op.READ, nodeid, abi.READ_IN.pack(fh, offset, size, 0, 0, 0, 0),
                            reply=abi.OUT_HEADER.size + size)

    def write(self, nodeid: int, fh: int, offset: int, data: bytes) -> int:
        out = self.request(Op.WRITE, nodeid,
                           abi.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0), data)
        return int(abi.WRITE_OUT.unpack(out)[0])

    def release(self, nodeid: int, fh: int, is_dir: bool = False) -> None:
        self.request(Op.RELEASEDIR if is_dir else Op.RELEASE, nodeid,
                     abi.RELEASE_IN.pack(fh, 0, 0, 0))

    def flush(self, nodeid: int, fh: int) -> None:
        self.request(Op.FLUSH, nodeid, abi.FLUSH_IN.pack(fh, 0, 0, 0))

    def fsync(self, nodeid: int, fh: int, datasync: bool = False, is_dir: bool = False) -> None:
        self.request(Op.FSYNCDIR if is_dir else Op.FSYNC, nodeid,
                     abi.FSYNC_IN.pack(fh, abi.FSYNC_FDATASYNC if datasync else 0, 0))

    def fallocate(self, nodeid: int, fh: int, offset: int, length: int, mode: int = 0) -> None:
        self.request(Op.FALLOCATE, nodeid, abi.FALLOCATE_IN.pack(fh, offset, length, mode, 0))

    def lseek(self, nodeid: int, fh: int, offset: int, whence: int) -> int:
        return int(abi.LSEEK_OUT.unpack(self.request(
            Op.LSEEK, nodeid, abi.LSEEK_IN.pack(fh, offset, whence, 0)))[0])

    def copy_file_range(self, node_in: int, fh_in: int, off_in: int, node_out: int,
                        fh_out: int, off_out: int, length: int) -> int:
        out = self.request(Op.COPY_FILE_RANGE, node_in, abi.COPY_FILE_RANGE_IN.pack(
            fh_in, off_in, node_out, fh_out, off_out, length, 0))
        return int(abi.WRITE_OUT.unpack(out)[0])

    def statfs(self, nodeid: int = abi.ROOT_ID) -> tuple[int, ...]:
        return abi.STATFS_OUT.unpack(self.request(Op.STATFS, nodeid))

    def access(self, nodeid: int, mask: int) -> None:
        self.request(Op.ACCESS, nodeid, abi.ACCESS_IN.pack(mask, 0))

    def opendir(self, nodeid: int) -> int:
        fh, _, _ = abi.OPEN_OUT.unpack(self.request(Op.OPENDIR, nodeid, abi.OPEN_IN.pack(0, 0)))
        return int(fh)

    def readdir(self, nodeid: int, fh: int, offset: int = 0, size: int = 4096,
                plus: bool = False) -> list[Dirent]:
        out = self.request(Op.READDIRPLUS if plus else Op.READDIR, nodeid,
                           abi.READ_IN.pack(fh, offset, size, 0, 0, 0, 0),
                           reply=abi.OUT_HEADER.size + size)
        return parse_dirents(out, plus)

    def listdir(self, nodeid: int, plus: bool = False) -> list[Dirent]:
        """Every entry of a directory, READDIR by READDIR."""
        fh = self.opendir(nodeid)
        out: list[Dirent] = []
        offset = 0
        try:
            while True:
                part = self.readdir(nodeid, fh, offset, 65536, plus)
                if not part:
                    return out
                out += part
                offset = part[-1].off
        finally:
            self.release(nodeid, fh, is_dir=True)

    def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self.request(Op.SETXATTR, nodeid,
                     abi.SETXATTR_IN.pack(len(value), flags) + name + b"\0" + value)

    def getxattr(self, nodeid: int, name: bytes, size: int = 4096) -> bytes:
        out = self.request(Op.GETXATTR, nodeid, abi.GETXATTR_IN.pack(size, 0) + name + b"\0",
                           reply=abi.OUT_HEADER.size + max(size, 8))
        return out if size else struct.pack("<I", abi.GETXATTR_OUT.unpack(out)[0])

    def listxattr(self, nodeid: int, size: int = 4096) -> list[bytes]:
        """The names (size > 0: a size-0 query answers a length, not names)."""
        if size <= 0:
            raise ValueError("listxattr needs a buffer size")
        out = self.request(Op.LISTXATTR, nodeid, abi.GETXATTR_IN.pack(size, 0),
                           reply=abi.OUT_HEADER.size + max(size, 8))
        return [n for n in out.split(b"\0") if n]

    def removexattr(self, nodeid: int, name: bytes) -> None:
        self.request(Op.REMOVEXATTR, nodeid, name + b"\0")

    def destroy(self) -> None:
        self.request(Op.DESTROY, 0)


def parse_dirents(out: bytes, plus: bool) -> list[Dirent]:
    entries = []
    pos = 0
    while pos < len(out):
        entry = None
        if plus:
            entry = Entry.unpack(out[pos:])
            pos += abi.ENTRY_OUT.size + abi.ATTR.size
        ino, off, namelen, dtype = abi.DIRENT.unpack_from(out, pos)
        name = out[pos + abi.DIRENT.size : pos + abi.DIRENT.size + namelen]
        pos += abi.align8(abi.DIRENT.size + namelen)
        entries.append(Dirent(ino, off, dtype, name, entry))
    return entries


def errno_of(e: BaseException) -> int:
    return e.errno if isinstance(e, OSError) and e.errno is not None else errno.EIO
