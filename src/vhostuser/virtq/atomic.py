"""Tear-free access to shared 16-bit ring fields, and a full memory barrier.

CPython's struct.pack_into zeroes a field before writing it, so the peer can read 0
for an instant (see ../shared/docs/peers.md). A store through a memoryview cast to 'H'
is a single 16-bit store on an aligned address, and a load a single 16-bit load. Every
shared ring index (avail->idx, used->idx, flags, used_event, avail_event) goes through
`U16Array`.
"""

from __future__ import annotations

import threading

from ..memory import Buffer


class U16Array:
    """Native-endian u16 cells over a shared buffer, loaded and stored whole."""

    __slots__ = ("_cells",)

    def __init__(self, buf: Buffer) -> None:
        view = memoryview(buf).cast("B")
        if len(view) % 2:
            view = view[: len(view) - 1]
        self._cells = view.cast("H")

    def load(self, i: int) -> int:
        return self._cells[i]

    def store(self, i: int, value: int) -> None:
        self._cells[i] = value & 0xFFFF

    def release(self) -> None:
        self._cells.release()


_fence = threading.Lock()


def full_barrier() -> None:
    """A full memory barrier: acquiring a lock is a locked read-modify-write (x86: a
    `lock cmpxchg`), which orders all earlier loads and stores before later ones."""
    _fence.acquire()
    _fence.release()
