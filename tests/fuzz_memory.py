"""What the compiled kernels' differential fuzz tests share (test_blk_kernel.py,
test_net_kernel.py): a seed to replay, and guest memory in two adjoining regions filled
with random bytes, a driver ring in the first, buffers placed mostly inside the first,
sometimes in the second, across the two or outside memory."""

from __future__ import annotations

import os
import random

from vhostuser.memory import GuestMemory, mmap_region
from vhostuser.virtq.guest_ram import GuestRam
from vhostuser.virtq.split_driver import DriverRing

A = 0x100000  # the first region's guest address; the second follows it


def seed() -> int:
    env = os.environ.get("VHOSTUSER_FUZZ_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "little")


class TwoRegions:
    """Regions of `ram` bytes at A and B = A + ram; a split ring of `size` in the first,
    half of which is the arena buffers come from."""

    def __init__(self, rng: random.Random, ram: int, size: int, event_idx: bool) -> None:
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
        self.drv.release()
        self.mem.clear()
        for r in self.rams:
            r.close()
