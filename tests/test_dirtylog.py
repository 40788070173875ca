"""The dirty log's bitmap as live migration reads it (one bit per 4 KiB page: byte
page / 8, bit page % 8), marked by several writers at once."""

from __future__ import annotations

import mmap
import os

from vhostuser.virtq.dirtylog import DirtyLog, log_bytes_for

PAGE = 4096


def dirty(buf: bytes | bytearray | mmap.mmap) -> set[int]:
    return {8 * i + b for i, byte in enumerate(bytes(buf)) for b in range(8) if byte >> b & 1}


def test_pages_of_a_write_are_marked_and_no_others() -> None:
    buf = bytearray(64)
    log = DirtyLog(buf, 64)
    log.mark(5 * PAGE + 10, 1)
    assert dirty(buf) == {5}
    log.mark(7 * PAGE - 1, 2)  # crosses from page 6 into 7
    assert dirty(buf) == {5, 6, 7}
    log.mark(100 * PAGE, 0)  # nothing written
    assert dirty(buf) == {5, 6, 7}
    log.mark(19 * PAGE + 1, 60 * PAGE)  # partial bytes at both ends, whole ones between
    assert dirty(buf) == {5, 6, 7} | set(range(19, 80))
    log.release()


def test_nothing_is_written_past_the_log() -> None:
    buf = bytearray(16)
    log = DirtyLog(buf, 8)  # 64 pages
    log.mark(60 * PAGE, 10 * PAGE)
    assert dirty(buf) == set(range(60, 64))
    assert buf[8:] == bytes(8)
    assert log.missed == 6
    log.mark(1000 * PAGE, PAGE)
    assert log.missed == 7 and buf[8:] == bytes(8)
    log.release()


def test_log_size_covers_every_page() -> None:
    assert log_bytes_for(0) == 0
    assert log_bytes_for(1) == 1
    assert log_bytes_for(8 * PAGE) == 1
    assert log_bytes_for(8 * PAGE + 1) == 2
    assert log_bytes_for(256 << 20) == 8192


def test_writers_in_other_processes_lose_no_bit() -> None:
    """Other back-ends of the VM mark the same bytes (QEMU shares one log between its
    vhost devices): four processes, started together, each own one bit of every byte and
    walk the bytes in the same order; every bit must be there after each round. (A plain
    read, or and store lost 1-4 bits in each run of this.)"""
    n = 1 << 16
    writers = 4
    shared = mmap.mmap(-1, n, mmap.MAP_SHARED)
    for _ in range(8):
        shared[:] = bytes(n)
        go_r, go_w = os.pipe()
        kids = []
        for bit in range(writers):
            pid = os.fork()
            if pid == 0:
                try:
                    log = DirtyLog(shared, n)
                    os.read(go_r, 1)
                    for j in range(n):
                        log.mark((8 * j + bit) * PAGE, 1)
                finally:
                    os._exit(0)
            kids.append(pid)
        os.write(go_w, b"G" * writers)
        for pid in kids:
            assert os.waitpid(pid, 0)[1] == 0
        os.close(go_r)
        os.close(go_w)
        lost = sum(writers - bin(b & 0xF).count("1") for b in shared[:])
        assert lost == 0, f"{lost} bits lost"
    shared.close()
