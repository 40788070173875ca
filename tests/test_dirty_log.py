"""Live migration's dirty log (LOG_SHMFD, VHOST_F_LOG_ALL) with vhost-user-blk over a real
socket, the Python front-end doing what QEMU does when a migration starts: SET_LOG_BASE
with a shared bitmap, SET_FEATURES with LOG_ALL, SET_VRING_ADDR with VHOST_VRING_F_LOG.
Each buffer sits on a page of its own, so the bitmap says exactly which pages the back-end
wrote: the data read into guest memory, the status bytes and the used ring, nothing the
device only reads; nothing at all while logging is off; a log too small for guest memory
refused."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable

import pytest
from daemon import BLK_FEATURES, Daemon

from vhostuser.frontend.blk import BlkClient
from vhostuser.frontend.client import Frontend
from vhostuser.protocol import FrontendReq, ProtocolFeature
from vhostuser.protocol import payloads as p

F = FrontendReq
LOG_ALL = 1 << 26
VRING_F_LOG = 1
PAGE = 4096
RAM = 64 << 20
LOG_SIZE = RAM // PAGE // 8  # one bit per page
OK = 0


def dirty_pages(log: mmap.mmap) -> set[int]:
    return {8 * i + b for i, byte in enumerate(log[:]) for b in range(8) if byte >> b & 1}


def pages(gpa: int, n: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + n - 1) // PAGE + 1))


def start_logging(fe: Frontend, size: int = LOG_SIZE) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create("log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    log = mmap.mmap(fd, size, mmap.MAP_SHARED)
    reply = fe.call(F.SET_LOG_BASE, p.LogBase(size, 0), fds=(fd,), ack=False)
    assert reply is not None and reply.payload == p.U64(0)
    fe.call(F.SET_FEATURES, p.U64(fe.features | LOG_ALL))
    ring = fe.queues[0].ring
    lay = ring.layout()
    fe.call(F.SET_VRING_ADDR, p.VringAddr(0, VRING_F_LOG, lay.desc, lay.used, lay.avail,
                                          ring.used_gpa))
    return fd, log


def session(sock: str) -> tuple[Frontend, BlkClient]:
    fe = Frontend(sock, ram_size=RAM)
    fe.negotiate(BLK_FEATURES | LOG_ALL)
    assert fe.protocol_features & ProtocolFeature.LOG_SHMFD
    assert fe.get_u64(F.GET_FEATURES) & LOG_ALL
    fe.set_mem_table()
    fe.setup_queue(0, 128)
    return fe, BlkClient(fe, 0, arena=4 << 20, align=PAGE)


def test_every_page_the_back_end_writes_is_logged_and_only_those(
        blk_daemon: Callable[..., Daemon]) -> None:
    d = blk_daemon()
    fe, blk = session(d.sock)
    with fe:
        fd, log = start_logging(fe)
        reads = [blk.submit(0, 8 * i, in_len=3 * PAGE, kick=False, indirect=bool(i % 2))
                 for i in range(4)]  # indirect tables for two of them
        writes = [blk.submit(1, 100 + 8 * i, out=bytes([i]) * PAGE, kick=False)
                  for i in range(4)]
        want: set[int] = set()
        read_only: set[int] = set()
        for h in reads:
            status, data, n = blk.inflight[h]
            want |= pages(status, 1) | pages(data, n)
        for h in writes:
            want |= pages(blk.inflight[h][0], 1)
        for h in reads + writes:  # the header pages (and the write data): device-readable
            desc = fe.queues[0].ring.chains[h]
            for i in desc:
                addr, n, flags, _ = _desc(fe, i)
                if not flags & 2:
                    read_only |= pages(addr, n)
        fe.kick(0)
        done = blk.complete(8)
        assert all(status == OK for status, _, _ in done.values())
        used = fe.queues[0].ring.used_gpa
        want |= pages(used, 6 + 8 * 128)
        got = dirty_pages(log)
        assert got == want, (sorted(got - want), sorted(want - got))
        assert not got & read_only
        log.close()
        os.close(fd)


def _desc(fe: Frontend, i: int) -> tuple[int, int, int, int]:
    import struct

    ring = fe.queues[0].ring
    return struct.unpack_from("<QIHH", ring.desc, 16 * i)  # type: ignore[return-value]


def test_nothing_is_logged_while_logging_is_off(blk_daemon: Callable[..., Daemon]) -> None:
    d = blk_daemon()
    fe, blk = session(d.sock)
    with fe:
        fd, log = start_logging(fe)
        fe.call(F.SET_FEATURES, p.U64(fe.features & ~LOG_ALL))  # migration cancelled
        assert blk.read(0, 512)[0] == OK  # the workers have started again: quiet now
        log[:] = bytes(LOG_SIZE)
        assert blk.read(0, PAGE)[0] == OK
        assert dirty_pages(log) == set()
        log.close()
        os.close(fd)


@pytest.mark.parametrize("size", [LOG_SIZE - 1, 0])
def test_a_log_too_small_for_guest_memory_is_refused(blk_daemon: Callable[..., Daemon],
                                                     size: int) -> None:
    d = blk_daemon()
    fe, _ = session(d.sock)
    with fe:
        fd = os.memfd_create("log", os.MFD_CLOEXEC)
        os.ftruncate(fd, LOG_SIZE)
        with pytest.raises((ConnectionError, OSError, EOFError)):
            fe.call(F.SET_LOG_BASE, p.LogBase(size, 0), fds=(fd,), ack=False)
        os.close(fd)
    d.wait_log(f"SET_LOG_BASE failed: a log of {size} bytes")
    fe, blk = session(d.sock)  # the daemon serves the next front-end
    with fe:
        assert blk.read(0, 512)[0] == OK
