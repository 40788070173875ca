"""However vhost-user-blk ends, its front-end sees the connection close only once no process
of the back-end maps guest memory any more (issue 15): the used index the front-end then
reads is its final resume point. Checked at the instant the front-end's socket reads EOF:
every process still alive in the back-end's process group has its /proc/PID/maps read,
and none may map the front-end's guest RAM (a process that is exiting drops its memory
before its fds, so a worker whose fds have closed can no longer write)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon, blk_session
from qemu_helpers import group_members, wait_until

from vhostuser.engine.queue import DeviceQueue, ParentGone
from vhostuser.engine.worker import DRAINED, MORE, run_queue
from vhostuser.frontend.blk import T_IN, T_OUT
from vhostuser.memory import GuestMemory, mmap_region
from vhostuser.virtq.guest_ram import GuestRam
from vhostuser.virtq.split import SplitQueue
from vhostuser.virtq.split_driver import DriverRing

RAM_NAME = "vhostuser-guest-ram"  # the Python front-end's memfd (virtq/guest_ram.py)
ROUNDS = 8


def _mapping_guest_ram(pgid: int) -> list[int]:
    """Living processes of group `pgid` that map the front-end's guest RAM."""
    found = []
    for pid in group_members(pgid):
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if RAM_NAME in maps:
            found.append(pid)
    return found


def _busy_session(d: Daemon, queues: int) -> tuple[object, list[int]]:
    """A session with every queue busy: many requests submitted, none waited for."""
    fe, clients = blk_session(d.sock, queues=queues, size=256)
    for blk in clients:
        for i in range(80):  # 3 descriptors each: 240 of the 256
            if i % 2:
                blk.submit(T_OUT, 8 * i, out=bytes(4096), kick=False)
            else:
                blk.submit(T_IN, 8 * i, in_len=4096, kick=False)
        fe.kick(blk.queue)
    assert wait_until(lambda: len(d.children()) == queues, 10), d.log()
    return fe, d.children()


def _eof(fe: object, timeout: float = 10.0) -> None:
    sock = fe.sock.sock  # type: ignore[attr-defined]
    sock.settimeout(timeout)
    while True:
        try:
            if not sock.recv(4096):
                return
        except ConnectionResetError:
            return


@pytest.mark.parametrize("queues", [1, 2])
def test_sigkill_closes_the_connection_after_the_last_worker(tmp_path: Path, image: Path,
                                                              queues: int) -> None:
    for r in range(ROUNDS):
        sock = tmp_path / f"k{r}.sock"
        d = Daemon(["vhostuser.cli.blk", "--socket-path", str(sock), "--blk-file", str(image),
                    "--num-queues", str(queues)], sock, tmp_path / f"k{r}.log")
        try:
            fe, workers = _busy_session(d, queues)
            os.kill(d.proc.pid, signal.SIGKILL)  # the main process alone
            _eof(fe)
            holders = _mapping_guest_ram(d.proc.pid)
            assert not holders, (f"round {r}: the connection closed while {holders} (workers "
                                 f"{workers}) still mapped guest memory\n{d.log()}")
            fe.close()  # type: ignore[attr-defined]
            assert wait_until(lambda d=d: not group_members(d.proc.pid), 5), d.log()
        finally:
            d.stop()


def test_sigterm_to_the_whole_group_stops_in_order(tmp_path: Path, image: Path) -> None:
    """SIGTERM to every process (as `pkill` or a service manager sends it): workers leave
    the stopping to the main process, which stops them, then closes; it exits 0."""
    sock = tmp_path / "t.sock"
    d = Daemon(["vhostuser.cli.blk", "--socket-path", str(sock), "--blk-file", str(image),
                "--num-queues", "2"], sock, tmp_path / "t.log")
    try:
        fe, _ = _busy_session(d, 2)
        os.killpg(d.proc.pid, signal.SIGTERM)
        _eof(fe)
        assert not _mapping_guest_ram(d.proc.pid), d.log()
        assert d.proc.wait(15) == 0, d.log()
        assert wait_until(lambda: not group_members(d.proc.pid), 5), d.log()
        log = d.log()
        assert "Traceback" not in log, log
        fe.close()  # type: ignore[attr-defined]
    finally:
        d.stop()


class _Handler:
    def __init__(self) -> None:
        self.seen = 0

    def kicked(self, q: DeviceQueue) -> None:
        chains = q.pop_batch()
        self.seen += len(chains)
        q.complete_batch(chains, [0] * len(chains))


class _Calls:
    def __init__(self) -> None:
        self.count = 0

    def notify(self) -> None:
        self.count += 1

    def close(self) -> None:
        pass


@pytest.fixture
def ring() -> Iterator[tuple[GuestRam, GuestMemory, DriverRing]]:
    """Guest RAM, its mapping as the back-end sees it, and an 8-entry driver-side ring."""
    ram = GuestRam(1 << 20, guest_addr=0x10000)
    mem = GuestMemory()
    mem.add(ram.region(), mmap_region(ram.region(), ram.fd))
    drv = DriverRing(ram, 8, False)
    yield ram, mem, drv
    mem.clear()
    drv.release()
    ram.close()


def test_worker_stores_nothing_once_its_parent_is_gone(
        ring: tuple[GuestRam, GuestMemory, DriverRing]) -> None:
    """A worker that finds its parent gone (PDEATHSIG not armed, or late) stops before it
    stores into the used ring: the batch in hand is handled but never completed."""
    ram, mem, drv = ring
    for _ in range(3):
        drv.add([(ram.alloc(16), 16, False)])
    handler, calls = _Handler(), _Calls()
    q = DeviceQueue(SplitQueue(mem, drv.layout(), 0, False, True), 0, calls,
                    ppid=-1)  # never a parent's pid
    with pytest.raises(ParentGone):
        run_queue(q, handler.kicked)
    assert handler.seen == 3
    assert drv.take_used() == [] and calls.count == 0
    # with its parent alive, the same worker completes them
    q = DeviceQueue(SplitQueue(mem, drv.layout(), 0, False, True), 0, calls, os.getppid())
    assert run_queue(q, handler.kicked) == DRAINED
    assert sorted(n for _, n in drv.take_used()) == [0, 0, 0] and calls.count == 1


def test_worker_answers_stop_while_the_guest_keeps_the_ring_full(
        ring: tuple[GuestRam, GuestMemory, DriverRing]) -> None:
    """A guest that refills the ring as fast as it empties must not delay a STOP (and so
    GET_VRING_BASE) until the worker is killed: serving a queue returns to the worker's loop,
    which looks at its control channel, once its budget is spent."""
    ram, mem, drv = ring
    q = DeviceQueue(SplitQueue(mem, drv.layout(), 0, False, True), 0, _Calls(), os.getppid())
    buf = ram.alloc(16)

    class Refill:  # every batch served, the guest makes as many new ones available
        seen = 0

        def kicked(self, q: DeviceQueue) -> None:
            chains = q.pop_batch()
            self.seen += len(chains)
            drv.take_used()
            for _ in chains:
                drv.add([(buf, 16, False)])
            q.complete_batch(chains, [0] * len(chains))

    for _ in range(4):
        drv.add([(buf, 16, False)])
    handler = Refill()
    assert run_queue(q, handler.kicked, budget=0.005) == MORE  # back to the worker's loop
    assert handler.seen > 0
    assert drv.avail_idx != q.ring.last_avail  # the guest still has chains waiting


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
