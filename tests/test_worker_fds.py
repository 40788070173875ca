"""What a worker keeps of its parent's fds (engine/worker.py): the connection, its own
queues' eventfds, the device's image, and nothing else — not the listening socket (a
restarted back-end binds the path anew), not the stop pipe, not another worker's control
socket or eventfds. Read from /proc of a live vhost-user-blk with two queues, each served
by its own worker, against what the kernel lists for the socket path."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from daemon import Daemon, blk_session
from qemu_helpers import wait_until


def _targets(pid: int) -> dict[int, str]:
    """fd -> what it refers to ("socket:[123]", "pipe:[45]", a path), of process `pid`."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            pass
    return out


def _of_kind(targets: dict[int, str], kind: str) -> set[str]:
    return {t for t in targets.values() if t.startswith(kind + ":[")}


def _listening(pid: int) -> set[str]:
    """The listening unix sockets of `pid`'s network namespace, as "socket:[INODE]" (its
    /proc/PID/net/unix: Num RefCount Protocol Flags Type St Inode [Path]; Flags 00010000 is
    __SO_ACCEPTCON)."""
    found = set()
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[3], 16) & 0x10000:
            found.add(f"socket:[{fields[6]}]")
    return found


def test_workers_keep_their_session_and_let_go_of_the_rest(
        blk_daemon: Callable[..., Daemon], image: Path) -> None:
    d = blk_daemon("--num-queues", "2")
    fe, clients = blk_session(d.sock, queues=2)
    with fe:
        for i, blk in enumerate(clients):  # each queue's worker is running and serving
            data = bytes([0x40 + i]) * 4096
            assert blk.write(8 * i, data) == 0
            assert blk.read(8 * i, 4096) == (0, data)
        workers = d.children()
        assert len(workers) == 2, workers
        parent = _targets(d.proc.pid)
        parent_sockets, parent_pipes = _of_kind(parent, "socket"), _of_kind(parent, "pipe")
        listeners = parent_sockets & _listening(d.proc.pid)
        assert len(listeners) == 1, (parent, listeners)  # on the socket path
        listener = listeners.pop()
        parent_eventfds = {fd for fd, t in parent.items() if t == "anon_inode:[eventfd]"}
        assert parent_pipes, "the stop pipe"
        assert len(parent_eventfds) >= 4, "each queue's kick and call"
        held = []
        for pid in workers:
            mine = _targets(pid)
            sockets = _of_kind(mine, "socket")
            assert listener not in sockets
            shared = sockets & parent_sockets
            assert len(shared) == 1, (mine, parent)  # the connection, and no other
            held.append(shared)
            # the worker's end of its control pair, which the parent has closed
            assert len(sockets - parent_sockets) == 1, mine
            assert not _of_kind(mine, "pipe") & parent_pipes, "the parent's stop pipe"
            assert os.path.realpath(image) in mine.values()
            # of the parent's eventfds, its own queue's alone (same numbers after fork)
            own = {fd for fd, t in mine.items()
                   if t == "anon_inode:[eventfd]" and fd in parent_eventfds}
            assert 2 <= len(own) <= 3, (own, parent_eventfds)  # kick, call (and err)
        assert held[0] == held[1]  # both hold the same connection
        # the second worker forked while the first one's eventfds were open in the parent
        own_sets = [{fd for fd, t in _targets(pid).items()
                     if t == "anon_inode:[eventfd]" and fd in parent_eventfds}
                    for pid in workers]
        assert not own_sets[0] & own_sets[1], "a worker holds its sibling's eventfds"


def test_a_listening_socket_on_stdin_stays_with_the_parent(tmp_path: Path,
                                                           image: Path) -> None:
    """inetd's way (`--fd 0`, the listening socket as standard input): the workers keep
    their standard streams, but not that one."""
    path = str(tmp_path / "blk.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    with open(tmp_path / "blk.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vhostuser.cli.blk", "--fd", "0",
                                 "--blk-file", str(image)], stdin=listener.fileno(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    inode = f"socket:[{os.fstat(listener.fileno()).st_ino}]"
    listener.close()
    try:
        fe, [blk] = blk_session(path)
        with fe:
            assert blk.read(0, 512)[0] == 0
            assert wait_until(lambda: len(_children(proc.pid)) == 1, 10)
            [worker] = _children(proc.pid)
            assert _targets(proc.pid)[0] == inode
            assert inode not in _targets(worker).values()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(15) == 0, (tmp_path / "blk.log").read_text()


def _children(pid: int) -> list[int]:
    return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
