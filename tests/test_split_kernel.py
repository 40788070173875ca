"""The compiled split-ring walk (virtq/kernel_walk.py) against the Python walk it stands
in for (SplitQueue.read_chain, the reference): a seeded, bounded differential fuzz of
descriptor tables, indirect tables and avail rings, well-formed and not — loops, indexes
past the table, buffers outside memory, across two adjoining regions, wrapping past 2^64,
nested and misaligned indirect tables, readable after writable — over guest memory of
two regions filled with random bytes, one of a size not a multiple of 8. Both walks must
agree on every batch: the same chains, the same bytes and lengths in the same order, the
same error. Set VHOSTUSER_FUZZ_SEED to replay a run; the seed is in the failure message.
Then memory in many regions, and a region mapped at an odd offset."""

from __future__ import annotations

import os
import random
import struct
import time
from dataclasses import replace
from pathlib import Path

import pytest

from vhostuser.memory import GuestMemory, mmap_region
from vhostuser.virtq import kernel_walk
from vhostuser.virtq.guest_ram import GuestRam
from vhostuser.virtq.kernel_walk import KernelWalk
from vhostuser.virtq.ring import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, RingError
from vhostuser.virtq.split import SplitQueue
from vhostuser.virtq.split_driver import DriverRing

ROUNDS = 1500
A, B = 0x10000, 0x10000 + (256 << 10)  # two regions of 256 KiB, adjoining
SIZE = 256 << 10


def seed() -> int:
    env = os.environ.get("VHOSTUSER_FUZZ_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "little")


class Rig:
    def __init__(self, rng: random.Random, ring_size: int) -> None:
        self.rng = rng
        self.ram = GuestRam(SIZE, guest_addr=A, user_addr=0x7F00_0000_0000)
        self.ram2 = GuestRam(SIZE, guest_addr=B, user_addr=0x7F10_0000_0000)
        for r in (self.ram, self.ram2):
            r.view[:] = rng.randbytes(SIZE)
        self.mem = GuestMemory()
        # the second region 3 bytes short of a multiple of 8 (libblkio's are such)
        for r, desc in ((self.ram, self.ram.region()),
                        (self.ram2, replace(self.ram2.region(), size=SIZE - 3))):
            self.mem.add(desc, mmap_region(desc, r.fd))
        self.drv = DriverRing(self.ram, ring_size)
        self.size = ring_size
        self.tables = [self.ram.alloc(16 * 64, 8) for _ in range(4)]
        self.misaligned = self.ram.alloc(16 * 8 + 4, 8) + 4

    def addr(self) -> int:
        """Mostly inside one region; sometimes across the two, outside, or near 2^64."""
        rng = self.rng
        pick = rng.random()
        if pick < 0.45:
            return A + rng.randrange(SIZE - 4096)
        if pick < 0.85:
            return B + rng.randrange(SIZE - 4096)
        if pick < 0.92:
            return B - rng.randrange(1, 2048)  # may run into the second region
        if pick < 0.96:
            return B + SIZE - rng.randrange(1, 1024)  # its last bytes, or past its end
        return rng.choice([0, 2**64 - rng.randrange(1, 8192), 2**63, A - 16])

    def desc(self, indirect_ok: bool, n: int) -> tuple[int, int, int, int]:
        rng = self.rng
        flags = 0
        if rng.random() < 0.6:
            flags |= DESC_F_NEXT
        if rng.random() < 0.45:
            flags |= DESC_F_WRITE
        if indirect_ok and rng.random() < 0.15:
            flags |= DESC_F_INDIRECT
        length = rng.choice([0, 1, 16, 512, 4096, rng.randrange(1, 9000),
                             rng.randrange(2**31, 2**32)])
        nxt = rng.randrange(n + 2) if rng.random() < 0.97 else rng.randrange(65536)
        addr = self.addr()
        if flags & DESC_F_INDIRECT and rng.random() < 0.8:
            addr = rng.choice([*self.tables, self.misaligned])
            length = 16 * rng.choice([1, 2, 3, 8, 64]) + (4 if rng.random() < 0.05 else 0)
            if rng.random() < 0.8:
                flags &= ~DESC_F_NEXT
        return addr, length, flags, nxt

    def fill(self) -> None:
        """A fresh descriptor table, indirect tables and avail ring."""
        rng, size = self.rng, self.size
        for i in range(size):
            self.drv.write_desc(i, *self.desc(True, size))
        for t in [*self.tables, self.misaligned]:
            for j in range(8 if t == self.misaligned else 64):
                a, ln, f, nx = self.desc(rng.random() < 0.1, 8)
                self.ram.at(t + 16 * j, 16)[:] = struct.pack("<QIHH", a, ln, f, nx)
        # often a plain well-formed chain too, so batches get past the first chain
        for _ in range(rng.randrange(4)):
            head = rng.randrange(size)
            self.drv.write_desc(head, A + rng.randrange(SIZE - 4096), 16, DESC_F_NEXT,
                                (head + 1) % size)
            self.drv.write_desc((head + 1) % size, B + rng.randrange(SIZE - 4096), 512,
                                DESC_F_WRITE, 0)

    def close(self) -> None:
        self.drv.release()
        self.mem.clear()
        self.ram.close()
        self.ram2.close()


def outcome(chains: list, error: RingError | None) -> tuple[list, str | None]:
    return ([(c.head, [bytes(b) for b in c.readable], [len(b) for b in c.writable],
              [bytes(b[:64]) for b in c.writable]) for c in chains],
            None if error is None else str(error))


def test_the_compiled_walk_agrees_with_the_python_walk() -> None:
    s = seed()
    rng = random.Random(s)
    kernel_chains = 0
    for ring_size in (8, 64):
        rig = Rig(rng, ring_size)
        try:
            for round_ in range(ROUNDS // 2):
                rig.fill()
                layout = rig.drv.layout()
                last = rng.randrange(65536)
                avail = rig.ram.at(rig.drv.avail_gpa + 4, 2 * ring_size).cast("H")
                for i in range(ring_size):
                    avail[i] = (rng.randrange(ring_size) if rng.random() < 0.97
                                else rng.randrange(65536))
                avail.release()
                n = rng.randrange(1, ring_size + 1)
                indirect = rng.random() < 0.8  # negotiated or not
                py = SplitQueue(rig.mem, layout, last, False, indirect=indirect)
                py._kernel = None  # the reference
                jit = SplitQueue(rig.mem, layout, last, False, indirect=indirect)
                kernel = jit._kernel = KernelWalk.for_queue(jit, asked=True)
                assert kernel is not None  # numba is a test dependency
                try:
                    want = outcome(*py.pop_batch(n))
                    got = outcome(*jit.pop_batch(n))
                    kernel_chains += len(kernel.walk(last, n))
                    assert got == want, f"seed {s}, ring {ring_size}, round {round_}, n {n}"
                    assert py.last_avail == jit.last_avail, f"seed {s}, round {round_}"
                finally:
                    py.release()
                    jit.release()
        finally:
            rig.close()
    assert kernel_chains > ROUNDS // 4, f"seed {s}: the kernel took few chains itself"


def test_a_region_that_ends_at_the_top_of_the_address_space() -> None:
    """Guest memory may end exactly at 2^64 (the memory table allows it): the compiled
    walk takes chains there as the Python walk does."""
    top = GuestRam(1 << 16, guest_addr=2**64 - (1 << 16))
    mem = GuestMemory()
    mem.add(top.region(), mmap_region(top.region(), top.fd))
    drv = DriverRing(top, 8)
    try:
        last_byte = 2**64 - 16
        top.at(last_byte, 16)[:] = bytes(range(16))
        drv.add([(last_byte, 16, False)])
        drv.add([(last_byte - 4096, 8, False), (last_byte + 8, 8, True)])
        py = SplitQueue(mem, drv.layout(), 0, False)
        py._kernel = None
        jit = SplitQueue(mem, drv.layout(), 0, False)
        kernel = jit._kernel = KernelWalk.for_queue(jit, asked=True)
        assert kernel is not None
        try:
            want = outcome(*py.pop_batch(2))
            assert len(kernel.walk(0, 2)) == 2  # the kernel took both itself
            assert outcome(*jit.pop_batch(2)) == want
            assert want[0][0][1] == [bytes(range(16))]
        finally:
            py.release()
            jit.release()
    finally:
        drv.release()
        mem.clear()
        top.close()


def test_memory_in_many_regions() -> None:
    """Guest memory in twelve regions (QEMU makes one per RAM block and hot-plugged DIMM;
    with CONFIGURE_MEM_SLOTS there may be many): the compiled walk takes chains whose
    buffers and indirect tables lie in any of them, as the Python walk does."""
    rams = [GuestRam(1 << 16, guest_addr=(k + 1) << 20, user_addr=0x7F00_0000_0000 + (k << 24))
            for k in range(12)]
    mem = GuestMemory()
    for r in rams:
        mem.add(r.region(), mmap_region(r.region(), r.fd))
    drv = DriverRing(rams[0], 32)
    try:
        for k, r in enumerate(rams):
            data = r.alloc(64)
            r.at(data, 64)[:] = bytes([k]) * 64
            out = rams[-1 - k].alloc(32)
            if k % 2:  # through an indirect table in the region after
                table_ram = rams[(k + 1) % len(rams)]
                table = table_ram.alloc(32, 16)
                table_ram.at(table, 32)[:] = struct.pack(
                    "<QIHHQIHH", data, 64, DESC_F_NEXT, 1, out, 32, DESC_F_WRITE, 0)
                head = drv.free.pop()
                drv.write_desc(head, table, 32, DESC_F_INDIRECT, 0)
                drv.chains[head] = [head]
                drv.publish(head)
            else:
                drv.add([(data, 64, False), (out, 32, True)])
        py = SplitQueue(mem, drv.layout(), 0, False, indirect=True)
        py._kernel = None
        jit = SplitQueue(mem, drv.layout(), 0, False, indirect=True)
        kernel = jit._kernel = KernelWalk.for_queue(jit, asked=True)
        assert kernel is not None
        try:
            want = outcome(*py.pop_batch(12))
            assert len(kernel.walk(0, 12)) == 12  # the kernel took every one itself
            assert outcome(*jit.pop_batch(12)) == want
            assert [chain[1] for chain in want[0]] == [[bytes([k]) * 64] for k in range(12)]
        finally:
            py.release()
            jit.release()
        assert kernel.ctx is None  # released with the arrays its addresses point into
    finally:
        drv.release()
        mem.clear()
        for r in rams:
            r.close()


def test_memory_mapped_at_an_odd_offset() -> None:
    """A front-end may give a region an mmap offset that is no multiple of 8 (nothing in
    vhost-user forbids it): the region's start is then mapped at an odd address. The
    kernels read indirect tables as aligned words, so they take a table that is aligned
    where it is mapped here (even if not in its region: that is the guest's business)
    and leave one that is not to the Python walk, which serves both the same."""
    assert kernel_walk.load()  # numba is a test dependency
    ram = GuestRam(1 << 16, guest_addr=0x10000)
    whole = ram.region()
    desc = replace(whole, guest_addr=whole.guest_addr + 4, size=whole.size - 4,
                   user_addr=whole.user_addr + 4, mmap_offset=4)
    mem = GuestMemory()
    mem.add(desc, mmap_region(desc, ram.fd))
    ram.alloc(16)  # (the ring in the mapped part)
    drv = DriverRing(ram, 8)
    try:
        data = ram.alloc(16)
        ram.at(data, 16)[:] = bytes(range(16))
        drv.add([(data, 16, False)])
        for shift in (0, 4):  # the table 8-byte aligned where it is mapped, then not
            table = ram.alloc(16 + shift, 8) + shift
            ram.at(table, 16)[:] = struct.pack("<QIHH", data, 16, 0, 0)
            head = drv.free.pop()
            drv.write_desc(head, table, 16, DESC_F_INDIRECT, 0)
            drv.chains[head] = [head]
            drv.publish(head)
        py = SplitQueue(mem, drv.layout(), 0, False, indirect=True)
        py._kernel = None
        jit = SplitQueue(mem, drv.layout(), 0, False, indirect=True)
        kernel = jit._kernel = KernelWalk.for_queue(jit, asked=True)
        assert kernel is not None
        try:
            want = outcome(*py.pop_batch(3))
            assert len(kernel.walk(0, 3)) == 2  # it stopped before the third
            assert outcome(*jit.pop_batch(3)) == want
            assert [chain[1] for chain in want[0]] == [[bytes(range(16))]] * 3
        finally:
            py.release()
            jit.release()
    finally:
        drv.release()
        mem.clear()
        ram.close()


def test_old_cache_directories_are_pruned(tmp_path: Path) -> None:
    """Each version of the sources compiles into a directory of its own: one no process
    used for CACHE_KEEP_DAYS goes, the one in use and recent ones stay, and so does
    anything whose name is not one of ours."""
    parent = tmp_path / "vhostuser-numba"
    ours, recent, old, other = (parent / n for n in ("0123456789abcdef", "1111111111111111",
                                                     "2222222222222222", "not-ours-at-all"))
    old_file, link = parent / "3333333333333333", parent / "4444444444444444"
    elsewhere = tmp_path / "elsewhere"  # an old directory a link points at
    for d in (ours, recent, old, other, elsewhere):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "x.nbi").write_bytes(b"x")
    old_file.write_bytes(b"a file, not a cache")
    link.symlink_to(elsewhere)
    long_ago = time.time() - (kernel_walk.CACHE_KEEP_DAYS + 1) * 86400
    for p in (ours, old, other, old_file, elsewhere):
        os.utime(p, (long_ago, long_ago))
    os.utime(recent, (time.time() - 86400, time.time() - 86400))

    assert kernel_walk.prune_cache(str(ours)) == [str(old)]
    assert sorted(p.name for p in parent.iterdir()) == [
        "0123456789abcdef", "1111111111111111", "3333333333333333", "4444444444444444",
        "not-ours-at-all"]
    assert (elsewhere / "sub" / "x.nbi").exists()
    assert ours.stat().st_mtime > long_ago + 86400  # marked in use now
    assert kernel_walk.prune_cache(str(tmp_path / "missing" / "0123456789abcdef")) == []


def test_a_daemon_prunes_only_in_its_own_cache(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`load` prunes beside the cache directory it picks (NUMBA_CACHE_DIR unset, or set
    to ours), and not where NUMBA_CACHE_DIR names another one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    old = Path(kernel_walk.cache_dir()).parent / "2222222222222222"
    long_ago = time.time() - (kernel_walk.CACHE_KEEP_DAYS + 1) * 86400
    monkeypatch.setattr(kernel_walk, "_compile", lambda: None)  # (compiles nothing)
    monkeypatch.setattr(kernel_walk, "_kernel", kernel_walk._kernel)  # (put back after)
    for chosen in (str(tmp_path / "chosen"), None):
        old.mkdir(parents=True, exist_ok=True)
        os.utime(old, (long_ago, long_ago))
        if chosen is None:
            monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("NUMBA_CACHE_DIR", chosen)
        monkeypatch.setattr(kernel_walk, "_tried", False)
        kernel_walk.load()
        assert os.environ["NUMBA_CACHE_DIR"] == (chosen or kernel_walk.cache_dir())
        assert old.exists() == (chosen is not None)
