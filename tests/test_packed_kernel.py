"""The compiled packed-ring walk (virtq/packed_walk_jit.py, through kernel_walk.py) against
the Python walk it stands in for (PackedQueue._read_chain, the reference): a seeded,
bounded differential fuzz of descriptor rings as a driver may leave them — available and
not (each descriptor's AVAIL/USED bits right, wrong or of the other pass), chains that
wrap past the ring's end or run longer than the ring, indirect tables well-formed and not
(nested, with NEXT, empty, of a length not a multiple of 16, misaligned, larger than the
ring, readable after writable), buffers in two regions, across them, outside memory and
near 2^64 — over guest memory of two regions filled with random bytes, one of a size not
a multiple of 8. Both walks must agree on every batch: the same chains (buffer id, bytes,
lengths, descriptors taken, where each starts), the same error, the same position after.
Set VHOSTUSER_FUZZ_SEED to replay a run; the seed is in the failure message."""

from __future__ import annotations

import random
import struct

from test_split_kernel import SIZE, A, Rig, seed

from vhostuser.virtq.kernel_walk import KernelWalk
from vhostuser.virtq.packed import DESC_F_AVAIL, DESC_F_USED, PackedQueue, join_base
from vhostuser.virtq.ring import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, RingError, RingLayout

ROUNDS = 1500


class PackedRig(Rig):
    """A packed ring of `size` descriptors in the first region (the split ring the base
    rig makes is left unused)."""

    def __init__(self, rng: random.Random, ring_size: int) -> None:
        super().__init__(rng, ring_size)
        self.ring_gpa = self.ram.alloc(16 * ring_size, 16)
        self.events = self.ram.alloc(8, 4)

    def layout(self) -> RingLayout:
        uva = self.ram.uva
        return RingLayout(self.size, uva(self.ring_gpa), uva(self.events), uva(self.events + 4))

    def flags(self, wrap: int) -> int:
        """A descriptor's flags: mostly what makes it available on pass `wrap`."""
        rng = self.rng
        f = 0
        if rng.random() < 0.55:
            f |= DESC_F_NEXT
        if rng.random() < 0.45:
            f |= DESC_F_WRITE
        if rng.random() < 0.1:
            f |= DESC_F_INDIRECT
        pick = rng.random()
        if pick < 0.9:
            f |= DESC_F_AVAIL if wrap else DESC_F_USED  # available on this pass
        elif pick < 0.95:
            f |= DESC_F_USED if wrap else DESC_F_AVAIL  # the other pass's
        else:
            f |= rng.choice([0, DESC_F_AVAIL | DESC_F_USED])  # used, or never made so
        return f

    def buffer(self, flags: int) -> tuple[int, int]:
        rng = self.rng
        if flags & DESC_F_INDIRECT and rng.random() < 0.8:
            addr = rng.choice([*self.tables, self.misaligned])
            length = 16 * rng.choice([1, 2, 3, 8, 64, 65]) + (4 if rng.random() < 0.05 else 0)
            return addr, rng.choice([length] * 9 + [0])
        return self.addr(), rng.choice([0, 1, 16, 512, 4096, rng.randrange(1, 9000),
                                        rng.randrange(2**31, 2**32)])

    def fill_ring(self, pos: int, wrap: int) -> None:
        """The ring from `pos` on as pass `wrap` sees it: on some rounds random
        descriptors all round, on the others chains that are well-formed but for one
        defect now and then (so that each rule decides some chain); those before `pos` as
        the next pass's (not available)."""
        rng, size = self.rng, self.size
        ring = self.ram.at(self.ring_gpa, 16 * size)
        for i in range(size):  # the soup: random flags, buffers and indirect tables
            f = self.flags(wrap if i >= pos else wrap ^ 1)
            addr, length = self.buffer(f)
            if f & DESC_F_INDIRECT and rng.random() < 0.8:
                f &= ~DESC_F_NEXT
            struct.pack_into("<QIHH", ring, 16 * i, addr, length, rng.randrange(65536), f)
        for t in [*self.tables, self.misaligned]:
            for j in range(8 if t == self.misaligned else 64):
                f = self.flags(1) & ~(DESC_F_INDIRECT if rng.random() < 0.9 else 0)
                addr, length = self.buffer(0)
                self.ram.at(t + 16 * j, 16)[:] = struct.pack("<QIHH", addr, length, 0, f)
        if rng.random() < 0.7:
            p, w = pos, wrap
            for _ in range(size):
                p, w = self.chain(ring, p, w)
                if p == pos and w != wrap:
                    break
        ring.release()

    def good(self) -> tuple[int, int]:
        """A buffer inside one region."""
        rng = self.rng
        n = rng.choice([1, 16, 64, 512, 1500, 4096])
        base = A if rng.random() < 0.5 else self.ram2.region().guest_addr
        return base + rng.randrange(SIZE - 8192), n

    def chain(self, ring: memoryview, p: int, w: int) -> tuple[int, int]:
        """A chain at position `p` of pass `w`, and where the next one starts: readable
        then writable buffers, or an indirect table of them; one defect in about a third."""
        rng, size = self.rng, self.size
        defect = rng.choice(["none"] * 12 + [
            "unavailable", "other pass", "readable after writable", "empty after writable",
            "outside", "across", "near the top", "indirect with next", "indirect empty",
            "indirect odd length", "indirect too long", "indirect misaligned", "nested",
            "table readable after writable", "longer than the ring", "huge"])
        bid = rng.randrange(65536)
        nr, nw = rng.choice([0, 1, 1, 2]), rng.choice([0, 1, 1, 2])
        bufs = [(*self.good(), 0) for _ in range(nr)] + [
            (*self.good(), DESC_F_WRITE) for _ in range(nw)] or [(*self.good(), 0)]
        if defect == "readable after writable":
            bufs.append((*self.good(), 0))
            bufs.insert(0, (*self.good(), DESC_F_WRITE))
        elif defect == "empty after writable":
            bufs += [(self.good()[0], 0, 0), (*self.good(), DESC_F_WRITE)]
            bufs.insert(0, (*self.good(), DESC_F_WRITE))
        elif defect in ("outside", "across", "near the top", "huge"):
            addr, n = {"outside": (A + 2 * SIZE + 4096, 64),
                       "across": (self.ram2.region().guest_addr - 8, 64),
                       "near the top": (2**64 - 16, 64),
                       "huge": (A, 2**32 - 1)}[defect]
            bufs.insert(rng.randrange(len(bufs) + 1), (addr, n, 0))
        if defect == "longer than the ring":  # the last one's NEXT leads to the first
            bufs = [(*self.good(), DESC_F_NEXT) for _ in range(size)]
        ring_descs = bufs
        if defect.startswith(("indirect", "nested", "table")) or rng.random() < 0.2:
            table = self.misaligned if defect == "indirect misaligned" else self.tables[0]
            entries = list(bufs)[:8]
            if defect == "nested":
                entries.insert(rng.randrange(len(entries) + 1), (table, 16, DESC_F_INDIRECT))
            if defect == "table readable after writable":
                entries = [(*self.good(), DESC_F_WRITE), (*self.good(), 0)]
            for j, (a, n, f) in enumerate(entries):
                struct.pack_into("<QIHH", self.ram.at(table + 16 * j, 16), 0, a, n, 0,
                                 f | (DESC_F_NEXT if rng.random() < 0.5 else 0))
            length = {"indirect empty": 0, "indirect odd length": 16 * len(entries) + 8,
                      "indirect too long": 16 * (size + 1)}.get(defect, 16 * len(entries))
            flags = DESC_F_INDIRECT | (DESC_F_NEXT if defect == "indirect with next" else 0)
            ring_descs = [(table, length, flags)]
            if rng.random() < 0.2:  # after a plain buffer of the same chain
                ring_descs.insert(0, (*self.good(), 0))
        for k, (addr, n, f) in enumerate(ring_descs):
            if k + 1 < len(ring_descs):
                f |= DESC_F_NEXT
            f |= DESC_F_AVAIL if w else DESC_F_USED
            if k == 0 and defect == "unavailable":  # used, or never made available
                f = f & ~(DESC_F_AVAIL | DESC_F_USED) | rng.choice([0, DESC_F_AVAIL
                                                                    | DESC_F_USED])
            if k == 0 and defect == "other pass":
                f = f & ~(DESC_F_AVAIL | DESC_F_USED) | (DESC_F_USED if w else DESC_F_AVAIL)
            struct.pack_into("<QIHH", ring, 16 * p, addr, n, bid, f)
            p += 1
            if p == size:
                p, w = 0, w ^ 1
        return p, w


def outcome(chains: list, error: RingError | None) -> tuple[list, str | None]:
    return ([(c.head, [bytes(b) for b in c.readable], [len(b) for b in c.writable],
              [bytes(b[:64]) for b in c.writable], c.ndesc, c.token) for c in chains],
            None if error is None else str(error))


def test_the_compiled_packed_walk_agrees_with_the_python_walk() -> None:
    s = seed()
    rng = random.Random(s)
    kernel_chains = 0
    for ring_size in (8, 64, 6):  # (a packed ring need not be a power of 2)
        rig = PackedRig(rng, ring_size)
        try:
            for round_ in range(ROUNDS // 3):
                pos, wrap = rng.randrange(ring_size), rng.randrange(2)
                rig.fill_ring(pos, wrap)
                base = join_base(pos, wrap, pos, wrap)
                n = rng.randrange(1, ring_size + 1)
                indirect = rng.random() < 0.8  # negotiated or not
                py = PackedQueue(rig.mem, rig.layout(), base, False, indirect=indirect)
                py._kernel = None  # the reference
                jit = PackedQueue(rig.mem, rig.layout(), base, False, indirect=indirect)
                if jit._kernel is not None:  # (made where VHOSTUSER_JIT=1 is set)
                    jit._kernel.release()
                kernel = jit._kernel = KernelWalk.for_queue(jit, asked=True)
                assert kernel is not None  # numba is a test dependency
                try:
                    want = outcome(*py.pop_batch(n))
                    got = outcome(*jit.pop_batch(n))
                    kernel_chains += len(kernel.walk(pos | wrap << 15, n))
                    where = f"seed {s}, ring {ring_size}, round {round_}, n {n}"
                    assert got == want, where
                    assert (py.next_avail, py.avail_wrap) == (jit.next_avail, jit.avail_wrap), (
                        where)
                    jit.unpop(len(got[0]))  # (it gives back what the kernel took as well)
                    py.unpop(len(want[0]))
                    assert py.base() == jit.base() == base, where
                finally:
                    py.release()
                    jit.release()
        finally:
            rig.close()
    assert kernel_chains > ROUNDS // 4, f"seed {s}: the kernel took few chains itself"
