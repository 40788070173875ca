"""What the compiled kernels' differential fuzz tests share (test_blk_kernel.py,
test_net_kernel.py): a seed to replay, and guest memory in two adjoining regions filled
with random bytes, a driver ring in the first (split, or packed), buffers placed mostly
inside the first, sometimes in the second, across the two or outside memory."""

from __future__ import annotations

import os
import random
import struct

from vhostuser.memory import GuestMemory, mmap_region
from vhostuser.virtq.guest_ram import GuestRam
from vhostuser.virtq.packed import (
    DESC_F_AVAIL,
    DESC_F_USED,
    EVENT_DISABLE,
    PackedQueue,
    join_base,
)
from vhostuser.virtq.packed_driver import PackedDriverRing
from vhostuser.virtq.split import AVAIL_F_NO_INTERRUPT, SplitQueue
from vhostuser.virtq.split_driver import DriverRing

A = 0x100000  # the first region's guest address; the second follows it


def seed() -> int:
    env = os.environ.get("VHOSTUSER_FUZZ_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "little")


class TwoRegions:
    """Regions of `ram` bytes at A and B = A + ram; a split ring of `size` in the first
    (and with `packed` a packed one, which the device is given), half of which is the
    arena buffers come from."""

    def __init__(self, rng: random.Random, ram: int, size: int, event_idx: bool,
                 packed: bool = False) -> None:
        self.rng, self.ram_size = rng, ram
        self.size, self.event_idx = size, event_idx
        self.b = A + ram
        self.rams = [GuestRam(ram, guest_addr=A), GuestRam(ram, guest_addr=self.b,
                                                            user_addr=0x7F10_0000_0000)]
        for r in self.rams:
            r.view[:] = rng.randbytes(ram)
        self.mem = GuestMemory()
        for r in self.rams:
            self.mem.add(r.region(), mmap_region(r.region(), r.fd))
        self.drv = DriverRing(self.rams[0], size, event_idx)
        self.drv.start_at(65536 - 3 * size)  # the 16-bit indices wrap early on
        self.arena = self.rams[0].alloc(ram // 2, 4096)
        self.pdrv: PackedDriverRing | None = None
        if packed:  # a few places before its end (the memory is random: made as a driver
            # makes it, its descriptors there used on the first pass)
            self.pdrv = PackedDriverRing(self.rams[0], size, event_idx)
            for gpa, n in ((self.pdrv.desc_gpa, 16 * size), (self.pdrv.driver_gpa, 4),
                           (self.pdrv.device_gpa, 4)):
                self.write(gpa, bytes(n))
            for pos in range(size - 3):
                self.write(self.pdrv.desc_gpa + 16 * pos + 14,
                           struct.pack("<H", DESC_F_AVAIL | DESC_F_USED))
            self.pdrv.start_at(join_base(size - 3, 1, size - 3, 1))

    # -- the driver ring, whichever layout -----------------------------------------------

    def ring(self, last: int) -> SplitQueue | PackedQueue:
        """The device side of the ring, from `last` (`position`'s first)."""
        if self.pdrv is not None:
            return PackedQueue(self.mem, self.pdrv.layout(), last, self.event_idx)
        return SplitQueue(self.mem, self.drv.layout(), last, self.event_idx)

    def start(self) -> int:
        """Where the device starts on a fresh ring."""
        return self.drv.avail_idx if self.pdrv is None else self.pdrv.base()

    @staticmethod
    def position(ring: SplitQueue | PackedQueue) -> tuple[int, int]:
        """Where the device stands: (what it starts from next time, its used position)."""
        if isinstance(ring, SplitQueue):
            return ring.last_avail, ring.used_idx
        return ring.base(), ring.base() >> 16

    def used_position(self, last: int) -> int:
        """The used position of a device that stopped at `last` (`position`'s second)."""
        return self.drv.used_idx() if self.pdrv is None else last >> 16

    def room(self, bufs: int) -> tuple[bool, bool]:
        """Whether a chain of `bufs` buffers can be added now, and whether only as an
        indirect table."""
        if self.pdrv is not None:
            return bool(self.pdrv.free_ids and self.pdrv.free_descs), bufs > self.pdrv.free_descs
        return bool(self.drv.free), bufs > len(self.drv.free)

    def add(self, bufs: list[tuple[int, int, bool]], indirect: bool) -> None:
        (self.drv if self.pdrv is None else self.pdrv).add(bufs, indirect)

    def interrupts(self, on: bool) -> None:
        (self.drv if self.pdrv is None else self.pdrv).set_interrupts(on)

    def asks_interrupts(self) -> bool:
        """Whether the driver wants a notification for what is used (with event_idx a
        fresh ring's first publish does)."""
        if self.pdrv is not None:
            return self.event_idx or self.pdrv.driver16.load(1) != EVENT_DISABLE
        return self.event_idx or not self.drv.avail16.load(0) & AVAIL_F_NO_INTERRUPT

    def take_used(self) -> None:
        (self.drv if self.pdrv is None else self.pdrv).take_used()

    def buf(self, n: int, odds: tuple[float, float, float] = (0.75, 0.93, 0.995)) -> int:
        """Where a buffer of `n` bytes goes: in the arena, in the second region, across
        the two, or outside memory, with these cumulative odds."""
        rng, ram, b = self.rng, self.ram_size, self.b
        pick = rng.random()
        if pick < odds[0]:
            return self.arena + rng.randrange(ram // 2 - n)
        if pick < odds[1]:
            return b + rng.randrange(ram - n)
        if pick < odds[2]:
            return b - rng.randrange(1, n + 1) if n else b
        return rng.choice([0, A + 2 * ram, 2**64 - 8])

    def write(self, gpa: int, data: bytes) -> None:
        """`data` at `gpa`, as far as it lies in the regions."""
        for r, lo in zip(self.rams, (A, self.b), strict=True):
            start, end = max(gpa, lo), min(gpa + len(data), lo + self.ram_size)
            if start < end:
                r.at(start, end - start)[:] = data[start - gpa : end - gpa]

    def contents(self) -> list[bytes]:
        return [bytes(r.view) for r in self.rams]

    def restore(self, contents: list[bytes]) -> None:
        for r, c in zip(self.rams, contents, strict=True):
            r.view[:] = c

    def differ(self, got: object, want: object) -> list[str]:
        """Where two `contents` differ, per region."""
        out = []
        for base, g, w in zip((A, self.b), got, want, strict=True):  # type: ignore[call-overload]
            at = [i for i in range(len(g)) if g[i] != w[i]]
            if at:
                out.append(f"{base + at[0]:#x}..{base + at[-1]:#x} ({len(at)} bytes)")
        return out

    def close(self) -> None:
        if self.pdrv is not None:
            self.pdrv.release()
        self.drv.release()
        self.mem.clear()
        for r in self.rams:
            r.close()
