"""Shared ring indices must never tear under concurrent access.

A writer process stores two alternating values into a shared u16 while this process
reads it; any other value read is a torn access. struct.pack_into is shown to tear (so
the detector works); the accessor every ring index goes through must not.
"""

from __future__ import annotations

import mmap
import os
import struct
import time

from vhostuser.virtq.atomic import U16Array

A, B = 0x1234, 0xABCD
SECONDS = 1.5


def _writer(shared: mmap.mmap, mode: str, stop_at: float) -> None:
    cells = U16Array(shared)
    pack = struct.Struct("<H").pack_into
    while time.monotonic() < stop_at:
        for _ in range(2000):
            if mode == "struct":
                pack(shared, 2, A)
                pack(shared, 2, B)
            else:
                cells.store(1, A)
                cells.store(1, B)
    shared[0] = 1  # done


def count_tears(mode: str) -> tuple[int, int]:
    shared = mmap.mmap(-1, 4096, mmap.MAP_SHARED)
    cells = U16Array(shared)
    cells.store(1, A)
    stop_at = time.monotonic() + SECONDS
    pid = os.fork()
    if pid == 0:
        try:
            if len(os.sched_getaffinity(0)) > 1:
                os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
            _writer(shared, mode, stop_at)
        finally:
            os._exit(0)
    torn = reads = 0
    try:
        if len(os.sched_getaffinity(0)) > 1:
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        load = cells.load
        while not shared[0]:
            for _ in range(5000):
                v = load(1)
                if v != A and v != B:
                    torn += 1
            reads += 5000
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        os.waitpid(pid, 0)
        cells.release()
        shared.close()
    return torn, reads


def test_struct_pack_into_tears_so_the_detector_works() -> None:
    assert os.cpu_count() and os.cpu_count() >= 2, "needs two CPUs to race"
    torn, reads = count_tears("struct")
    assert torn > 0, f"no torn read in {reads}: the detector cannot see tearing here"


def test_ring_index_accessor_never_tears() -> None:
    torn, reads = count_tears("accessor")
    assert reads > 100_000
    assert torn == 0, f"{torn} torn reads of {reads}"
