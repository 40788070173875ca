"""The dirty log of live migration (vhost-user LOG_SHMFD, VHOST_F_LOG_ALL).

While the front-end migrates the guest, every page the back-end writes in guest memory
must be marked in a bitmap the front-end shares (SET_LOG_BASE): bit `page % 8` of byte
`page / 8`, one bit per 4 KiB page of guest-physical address space. The front-end fetches
and clears the bitmap as it copies memory; whatever is marked is copied again.

Many writers share one bitmap: our workers and their threads, and every other back-end of
the same VM (QEMU gives all its vhost devices one log): another disk's daemon, a DPDK
port. A byte read, or-ed and stored back could undo a bit another writer set meanwhile,
and that page would never be copied again. So a byte that is only partly marked is or-ed
atomically (libatomic's `__atomic_fetch_or_1`, a `lock or`); bytes wholly covered are
stored as 0xFF, which sets every bit whatever anyone else did. The front-end only clears
bits (it exchanges whole words with 0): a store of ours after its exchange may set again a
bit it has just taken, which costs one page copied twice, never a page missed. Without
libatomic the engine does not offer logging at all.
"""

from __future__ import annotations

import ctypes
from typing import Protocol

from ..memory import Buffer

PAGE_SHIFT = 12  # VHOST_LOG_PAGE: 4 KiB
_SEQ_CST = 5


def _load_fetch_or() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        lib = ctypes.CDLL("libatomic.so.1")
    except OSError:
        return None
    fn = lib.__atomic_fetch_or_1
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int]
    fn.restype = ctypes.c_uint8
    return fn


_fetch_or = _load_fetch_or()  # at import: before any sandbox hides the library


def available() -> bool:
    """Whether writes can be logged here (an atomic OR is at hand)."""
    return _fetch_or is not None


def log_bytes_for(end: int) -> int:
    """Bytes a log needs to cover guest-physical addresses below `end`."""
    pages = (end + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT
    return (pages + 7) // 8


class Signal(Protocol):
    """What SET_LOG_FD gives: signalled after writes were logged."""

    def notify(self) -> None: ...

    def fds(self) -> tuple[int, ...]: ...

    def close(self) -> None: ...


class DirtyLog:
    """The front-end's log bitmap, as every worker of a connection marks it."""

    def __init__(self, mapping: Buffer, size: int) -> None:
        if _fetch_or is None:
            raise OSError("no atomic OR (libatomic.so.1) to mark a shared log with")
        self.mapping = mapping  # kept: the views below are of it
        self.bits = memoryview(mapping).cast("B")[:size]
        self._cells = (ctypes.c_uint8 * size).from_buffer(self.bits) if size else None
        self._base = ctypes.addressof(self._cells) if self._cells is not None else 0
        self.signal: Signal | None = None  # SET_LOG_FD's
        self.missed = 0  # pages beyond the log (a front-end that gave one too small)

    def mark(self, gpa: int, length: int) -> None:
        """Pages touched by a write of `length` bytes at guest-physical `gpa` are dirty."""
        if length <= 0:
            return
        first, last = gpa >> PAGE_SHIFT, (gpa + length - 1) >> PAGE_SHIFT
        size = len(self.bits)
        if last >> 3 >= size:
            beyond = min(last + 1 - first, last + 1 - 8 * size)
            self.missed += beyond
            last -= beyond
            if last < first:
                return
        lo, hi = first >> 3, last >> 3
        if lo == hi:
            self._or(lo, (0xFF << (first & 7)) & (0xFF >> (7 - (last & 7))))
            return
        self._or(lo, (0xFF << (first & 7)) & 0xFF)
        if hi - lo > 1:
            self.bits[lo + 1 : hi] = b"\xff" * (hi - lo - 1)
        self._or(hi, 0xFF >> (7 - (last & 7)))

    def _or(self, i: int, mask: int) -> None:
        assert _fetch_or is not None
        _fetch_or(self._base + i, mask, _SEQ_CST)

    def mark_all(self, ranges: list[tuple[int, int]]) -> None:
        for gpa, length in ranges:
            self.mark(gpa, length)

    def logged(self) -> None:
        """A batch of writes is logged: tell the front-end if it asked (SET_LOG_FD)."""
        if self.signal is not None:
            self.signal.notify()

    def release(self) -> None:
        self._cells = None  # its export of the view first
        self.bits.release()
