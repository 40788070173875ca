"""I/O on a disk image file, straight between the file and guest memory (shared by the
block and SCSI disks): preadv/pwritev into and out of guest buffers, hole punching and
zeroing with fallocate."""

from __future__ import annotations

import ctypes
import errno
import os

from ..virtq.iov import iov_slice, iov_write

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


def read_into(fd: int, bufs: list[memoryview], offset: int, n: int) -> int:
    """preadv of `n` bytes straight into guest memory, resumed after a short read; returns
    the bytes read (fewer only at the end of the file). Memory the kernel cannot pin for a
    zero-copy read (a device BAR: the virtio-vhost-user window inside an appliance VM, read
    from a 9p or O_DIRECT file) fails with EFAULT: then the bytes bounce through a buffer."""
    got = 0
    while got < n:
        part = bufs if not got else iov_slice(bufs, got)
        try:
            k = os.preadv(fd, part, offset + got)
        except OSError as e:
            if e.errno != errno.EFAULT:
                raise
            data = os.pread(fd, n - got, offset + got)
            k = iov_write(part, data)
        if not k:
            break
        got += k
    return got


def write_from(fd: int, bufs: list[memoryview], offset: int, n: int) -> None:
    """pwritev of `n` bytes straight from guest memory (bouncing on EFAULT, as above)."""
    done = 0
    while done < n:
        part = bufs if not done else iov_slice(bufs, done)
        try:
            k = os.pwritev(fd, part, offset + done)
        except OSError as e:
            if e.errno != errno.EFAULT:
                raise
            k = os.pwrite(fd, b"".join(part), offset + done)
        if not k:
            raise OSError(errno.EIO, f"short write ({done} of {n} bytes)")
        done += k
