"""The Linux calls a file server needs that Python's os module lacks: openat2 (resolution
confined beneath a directory), getdents64 (directory offsets the client can resume from),
*at calls on O_PATH fds with AT_EMPTY_PATH, renameat2, per-thread fsuid/fsgid."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPENAT2 = 437  # the same number on every architecture (5.6+)
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

_libc.syscall.restype = ctypes.c_long
_libc.getdents64.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
_libc.getdents64.restype = ctypes.c_ssize_t
_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint,
                           ctypes.c_int]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.setfsuid.argtypes = [ctypes.c_uint]
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.setfsgid.argtypes = [ctypes.c_uint]
_DIRENT64 = struct.Struct("<QqHB")  # d_ino d_off d_reclen d_type; then the name, NUL-ended


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(ret: int) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


_have_openat2 = True


def open_beneath(dirfd: int, name: bytes, flags: int, mode: int = 0) -> int:
    """openat(dirfd, name) that cannot leave dirfd's tree: no `..` above it, no symlinks
    (the last component's included: O_NOFOLLOW semantics), no /proc magic links. Falls
    back to openat with O_NOFOLLOW where the kernel lacks openat2 (callers pass single
    components, never `..`)."""
    global _have_openat2
    if _have_openat2:
        how = _OpenHow(flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                       RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS)
        ret = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_long(dirfd),
                            ctypes.c_char_p(name), ctypes.byref(how),
                            ctypes.c_size_t(ctypes.sizeof(how)))
        if ret >= 0:
            return int(ret)
        e = ctypes.get_errno()
        if e != errno.ENOSYS:
            raise OSError(e, os.strerror(e))
        _have_openat2 = False
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)


def getdents(fd: int, offset: int, bufsize: int = 32768) -> Iterator[tuple[int, int, int, bytes]]:
    """Entries of the directory `fd` from `offset` (0, or an entry's d_off): (ino, the
    offset of the next entry, d_type, name), one getdents64 buffer at a time."""
    os.lseek(fd, offset, os.SEEK_SET)
    buf = ctypes.create_string_buffer(bufsize)
    while True:
        n = _check(_libc.getdents64(fd, buf, bufsize))
        if n == 0:
            return
        raw = buf.raw[:n]
        pos = 0
        while pos < n:
            ino, off, reclen, dtype = _DIRENT64.unpack_from(raw, pos)
            name = raw[pos + _DIRENT64.size : pos + reclen].split(b"\0", 1)[0]
            pos += reclen
            yield ino, off, dtype, name


def chown_fd(fd: int, uid: int, gid: int) -> None:
    """fchownat(fd, "", AT_EMPTY_PATH): works on O_PATH fds and never follows a symlink
    (-1 leaves an id as it is)."""
    _check(_libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF,
                          AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))


def utimens_fd(fd: int, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat(fd, "", AT_EMPTY_PATH) with (seconds, nanoseconds) pairs; nanoseconds may
    be UTIME_NOW or UTIME_OMIT."""
    ts = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _check(_libc.utimensat(fd, b"", ts, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))


def rename2(olddir: int, old: bytes, newdir: int, new: bytes, flags: int) -> None:
    _check(_libc.renameat2(olddir, old, newdir, new, flags))


def set_fs_creds(uid: int, gid: int) -> None:
    """This thread's fsuid/fsgid (Linux credentials are per thread: glibc's setfsuid does
    not broadcast). Needs CAP_SETUID/CAP_SETGID; the calls cannot report failure, so the
    caller checks it may."""
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)


def syncfs(fd: int) -> None:
    """Write back everything of the file system that holds `fd`."""
    _check(_libc.syncfs(fd))
