"""I/O on a disk image file, straight between the file and guest memory (shared by the
block and SCSI disks): preadv/pwritev into and out of guest buffers, hole punching and
zeroing with fallocate."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from .virtq.iov import iov_slice, iov_write

_FALLOC_KEEP_SIZE, _FALLOC_PUNCH_HOLE, _FALLOC_ZERO_RANGE = 0x1, 0x2, 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def punch(fd: int, off: int, length: int, required: bool) -> None:
    """Deallocate a range (a discard). Where the file system cannot, a `required` range
    (it must read back as zeros) is zeroed; otherwise nothing happens (a hint)."""
    try:
        fallocate(fd, _FALLOC_PUNCH_HOLE | _FALLOC_KEEP_SIZE, off, length)
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        if required:
            zero(fd, off, length)


def zero(fd: int, off: int, length: int) -> None:
    """Make a range read back as zeros (allocated)."""
    try:
        fallocate(fd, _FALLOC_ZERO_RANGE | _FALLOC_KEEP_SIZE, off, length)
        return
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    chunk = bytes(min(length, 1 << 20))
    while length:
        n = os.pwrite(fd, chunk[: min(length, len(chunk))], off)
        off += n
        length -= n


def _read_bounced(e: OSError, fd: int, buffered: int | None, n: int, offset: int) -> bytes:
    """Read what could not go straight into guest memory through a buffer of ours. Memory
    the kernel cannot pin for a zero-copy transfer (a device BAR: the virtio-vhost-user
    window inside an appliance VM) fails with EFAULT; guest buffers not aligned as O_DIRECT
    needs, with EINVAL. `buffered`: the file without O_DIRECT, if `fd` has it: a page-aligned
    buffer of ours is tried on `fd` first (the transfer stays direct: mixing cached and
    direct writes to one page from concurrent requests could lose one), the cache only for
    a range the file system cannot take directly."""
    if buffered is None:
        if e.errno != errno.EFAULT:
            raise e
        return os.pread(fd, n, offset)
    if e.errno not in (errno.EFAULT, errno.EINVAL):
        raise e
    with mmap.mmap(-1, n) as buf:
        try:
            k = os.preadv(fd, [buf], offset)
            return buf[:k]
        except OSError as again:
            if again.errno != errno.EINVAL:
                raise
    return os.pread(buffered, n, offset)


def _write_bounced(e: OSError, fd: int, buffered: int | None, data: bytes,
                   offset: int) -> int:
    """Write what could not go straight from guest memory (as `_read_bounced` reads)."""
    if buffered is None:
        if e.errno != errno.EFAULT:
            raise e
        return os.pwrite(fd, data, offset)
    if e.errno not in (errno.EFAULT, errno.EINVAL):
        raise e
    with mmap.mmap(-1, len(data)) as buf:
        buf[:] = data
        try:
            return os.pwritev(fd, [buf], offset)
        except OSError as again:
            if again.errno != errno.EINVAL:
                raise
    return os.pwrite(buffered, data, offset)


def read_into(fd: int, bufs: list[memoryview], offset: int, n: int,
              buffered: int | None = None) -> int:
    """preadv of `n` bytes straight into guest memory, resumed after a short read; returns
    the bytes read (fewer only at the end of the file). `buffered`: the file without
    O_DIRECT if `fd` has it (see `_read_bounced`)."""
    got = 0
    while got < n:
        part = bufs if not got else iov_slice(bufs, got)
        try:
            k = os.preadv(fd, part, offset + got)
        except OSError as e:
            k = iov_write(part, _read_bounced(e, fd, buffered, n - got, offset + got))
        if not k:
            break
        got += k
    return got


def write_from(fd: int, bufs: list[memoryview], offset: int, n: int,
               buffered: int | None = None) -> None:
    """pwritev of `n` bytes straight from guest memory (bouncing as `read_into` does)."""
    done = 0
    while done < n:
        part = bufs if not done else iov_slice(bufs, done)
        try:
            k = os.pwritev(fd, part, offset + done)
        except OSError as e:
            k = _write_bounced(e, fd, buffered, b"".join(part), offset + done)
        if not k:
            raise OSError(errno.EIO, f"short write ({done} of {n} bytes)")
        done += k
