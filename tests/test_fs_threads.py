"""vhost-user-fs serves requests concurrently: one that blocks on the host does not hold
up the others behind it on the same queue, and it completes when the host lets it.

The blocking request is real: the host holds a read lease on a file (F_SETLEASE), so the
server's open() of it for writing waits until the lease is given up (the kernel tells the
lease holder with SIGIO)."""

from __future__ import annotations

import fcntl
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon

from vhostuser.frontend.client import Frontend
from vhostuser.frontend.fs import FsClient
from vhostuser.fuse import abi
from vhostuser.fuse.abi import Op
from vhostuser.protocol import VirtioFeature

F_SETLEASE = 1024


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[FsClient, Path]]:
    share = tmp_path / "share"
    share.mkdir()
    (share / "leased").write_bytes(b"x")
    (share / "other").write_bytes(b"12345")
    sock = tmp_path / "fs.sock"
    d = Daemon(["vhostuser.cli.fs", "--socket-path", str(sock), "--shared-dir", str(share),
                "--tag", "t", "--sandbox", "none", "--threads", "4"], sock,
               tmp_path / "fs.log")
    try:
        with Frontend(d.sock) as fe:
            fe.negotiate(VirtioFeature.VERSION_1)
            fe.set_mem_table()
            fe.setup_queue(0, 64)
            fe.setup_queue(1, 64)
            c = FsClient(fe)
            c.init()
            yield c, share
    finally:
        assert d.stop() == 0, d.log()
        assert "Traceback" not in d.log(), d.log()


def test_a_blocked_open_does_not_hold_up_the_requests_behind_it(
        client: tuple[FsClient, Path]) -> None:
    c, share = client
    leased = c.lookup(1, b"leased")
    other = c.lookup(1, b"other")
    broken = []
    old = signal.signal(signal.SIGIO, lambda *_: broken.append(True))
    fd = os.open(share / "leased", os.O_RDONLY)
    try:
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
        # OPEN for writing: the server's open() waits for our lease
        _, open_reply = c.submit(Op.OPEN, leased.nodeid, abi.OPEN_IN.pack(os.O_WRONLY, 0),
                                 at=3 << 20)
        # behind it on the same queue: a GETATTR of another file, answered meanwhile
        attr_head, attr_reply = c.submit(Op.GETATTR, other.nodeid,
                                         abi.GETATTR_IN.pack(0, 0, 0), at=1 << 20)
        [(head, written)] = c.fe.wait_used(1, 1)
        assert head == attr_head, "the GETATTR waited for the OPEN before it"
        attr = c.reply_of(attr_reply, written)
        assert abi.ATTR.unpack_from(attr, abi.ATTR_OUT.size)[1] == 5  # other's size
        fh = c.open(other.nodeid, os.O_RDONLY)  # and more requests, one after the other
        assert c.read(other.nodeid, fh, 1, 3) == b"234"
        assert broken == [True], "the kernel did not ask for the lease back"
        assert not c.fe.queues[1].ring.take_used(), "the OPEN completed under the lease"
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)  # let it go: the OPEN completes
        [(_, written)] = c.fe.wait_used(1, 1)
        fh2, _, _ = abi.OPEN_OUT.unpack(c.reply_of(open_reply, written))
        assert c.write(leased.nodeid, fh2, 0, b"y") == 1
    finally:
        os.close(fd)
        signal.signal(signal.SIGIO, old)
    assert (share / "leased").read_bytes() == b"y"


def test_a_pause_waits_for_a_request_blocked_on_the_host(client: tuple[FsClient, Path]) -> None:
    """The queues stop (a VM pause) while an OPEN waits for the host longer than the
    engine waits for a silent worker (10 s): the worker says it is still waiting, the
    engine lets it finish, and the session is handed over whole — not killed and lost."""
    c, share = client
    leased = c.lookup(1, b"leased")
    other = c.lookup(1, b"other")
    old = signal.signal(signal.SIGIO, lambda *_: None)
    fd = os.open(share / "leased", os.O_RDONLY)
    try:
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
        _, open_reply = c.submit(Op.OPEN, leased.nodeid, abi.OPEN_IN.pack(os.O_WRONLY, 0),
                                 at=3 << 20)
        done = threading.Event()
        restart = threading.Thread(target=lambda: (c.fe.restart_queue(1), done.set()))
        restart.start()
        assert not done.wait(11), "the queue stopped before the OPEN it had finished"
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
        restart.join(30)
        assert done.is_set()
    finally:
        os.close(fd)
        signal.signal(signal.SIGIO, old)
    [(_, written)] = c.fe.wait_used(1, 1)
    fh, _, _ = abi.OPEN_OUT.unpack(c.reply_of(open_reply, written))
    assert c.write(leased.nodeid, fh, 0, b"z") == 1  # the handle made before the pause
    assert c.getattr(other.nodeid).size == 5  # and a node looked up before it
