"""Helpers over scatter-gather lists of guest buffers (lists of memoryviews)."""

from __future__ import annotations


def iov_len(iov: list[memoryview]) -> int:
    return sum(len(v) for v in iov)


def iov_slice(iov: list[memoryview], start: int, end: int | None = None) -> list[memoryview]:
    """The bytes [start, end) of `iov` as views (no copy)."""
    out: list[memoryview] = []
    pos = 0
    for v in iov:
        n = len(v)
        lo = max(start - pos, 0)
        hi = n if end is None else min(end - pos, n)
        if lo < hi:
            out.append(v if lo == 0 and hi == n else v[lo:hi])
        pos += n
        if end is not None and pos >= end:
            break
    return out


def iov_read(iov: list[memoryview], n: int, start: int = 0) -> bytes:
    """Copy out up to `n` bytes starting at `start`."""
    return b"".join(bytes(v) for v in iov_slice(iov, start, start + n))


def iov_write(iov: list[memoryview], data: bytes | memoryview, start: int = 0) -> int:
    """Copy `data` into the buffers from `start`; returns the bytes written."""
    done = 0
    for v in iov_slice(iov, start, start + len(data)):
        v[:] = data[done : done + len(v)]
        done += len(v)
    return done
