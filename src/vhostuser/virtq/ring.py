"""What every virtqueue layout shares, device side: the descriptor flags, the chain a
device is handed, the error a broken ring raises, where a ring lives, and the interface
the engine runs a ring through (split.py and packed.py implement it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .dirtylog import DirtyLog
    from .kernel_walk import KernelWalk

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4


def need_event(event: int, new: int, old: int, modulus: int = 1 << 16) -> bool:
    """EVENT_IDX: whether moving an index from `old` to `new` passed `event` (the other
    side asked to be told once index `event` is used or made available), on a line that
    wraps at `modulus` (split: 2^16; packed: two passes of the ring)."""
    return (new - event - 1) % modulus < (new - old) % modulus


class RingError(Exception):
    """The driver broke the virtqueue rules; the queue cannot go on."""


@dataclass(frozen=True)
class RingLayout:
    """Where a ring of `size` entries lives (front-end virtual addresses): the descriptor
    area, the driver area (split: the avail ring; packed: the driver's event suppression)
    and the device area (split: the used ring; packed: the device's event suppression)."""

    size: int
    desc: int
    avail: int
    used: int


class Chain:
    """One available descriptor chain: its head (split: the head descriptor's index;
    packed: the buffer id) and its guest buffers, in order; `ndesc`: the ring descriptors
    it took (a packed ring's used side skips as many); while writes are logged (live
    migration), where its writable buffers are (gpa, length). `token`: the ring's own
    (packed: where the chain starts in the ring, then its entry in the in-flight area)."""

    __slots__ = ("head", "ndesc", "readable", "token", "writable", "writable_at")

    def __init__(self, head: int, readable: list[memoryview], writable: list[memoryview],
                 writable_at: list[tuple[int, int]] | None = None, ndesc: int = 1) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.writable_at = writable_at
        self.ndesc = ndesc
        self.token = 0

    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)


class DeviceRing(Protocol):
    """One running ring, device side, whatever its layout. Positions (`base`) are what
    GET/SET_VRING_BASE carry: split, the next avail index; packed, the next avail
    descriptor and the driver's wrap counter in the low half, the next used descriptor
    and the device's wrap counter in the high half."""

    size: int
    log: DirtyLog | None

    def available(self) -> int:
        """How many chains the driver has made available (RingError if it broke a rule)."""
        ...

    def has_available(self) -> bool:
        """Whether a chain is available, without counting them (RingError as above)."""
        ...

    def pop_batch(self, n: int) -> tuple[list[Chain], RingError | None]:
        """Take `n` available chains; on a broken one, those before it and the error."""
        ...

    def unpop(self, n: int = 1) -> None:
        """Give the `n` chains taken last back to the ring, unused."""
        ...

    def push_batch(self, chains: list[Chain], written: list[int]) -> None:
        """Return chains with the bytes written into each; visible at `publish`."""
        ...

    def publish(self) -> bool:
        """Make what was pushed visible; True if the driver wants a notification."""
        ...

    def disable_kicks(self) -> None: ...

    def enable_kicks(self) -> bool:
        """Ask for kicks again; True if chains arrived meanwhile."""
        ...

    def base(self) -> int:
        """Where the ring stands, as GET_VRING_BASE reports it."""
        ...

    @property
    def kernel(self) -> KernelWalk | None:
        """The compiled walk's arrays, where the compiled kernels serve the ring."""
        ...

    def cursors(self) -> tuple[int, int]:
        """Where a compiled kernel walks from and returns chains at (ring_jit.py)."""
        ...

    def kernel_served(self, k: int) -> None:
        """A compiled kernel took and returned `k` chains from the cursors on."""
        ...

    def release(self) -> None:
        """Let go of every view of guest memory the ring holds."""
        ...
