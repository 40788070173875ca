"""vhost-user-fs's FUSE session across its queues stopping and starting (what QEMU does
when the VM pauses, or the memory table changes): the worker that served them hands its
node ids and open files to the next one, so the driver's nodes and handles stay valid;
a reset, or a new connection, starts over."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon

from vhostuser.frontend.client import Frontend
from vhostuser.frontend.fs import FsClient, FuseError
from vhostuser.protocol import FrontendReq, VirtioFeature

FEATURES = VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX
SIZE = 64


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    (d / "a.txt").write_bytes(b"0123456789" * 1000)
    (d / "sub").mkdir()
    (d / "sub" / "b.txt").write_bytes(b"bee")
    return d


@pytest.fixture
def daemon(tmp_path: Path, share: Path) -> Iterator[Daemon]:
    sock = tmp_path / "fs.sock"
    d = Daemon(["vhostuser.cli.fs", "--socket-path", str(sock), "--shared-dir", str(share),
                "--tag", "t", "--sandbox", "none"], sock, tmp_path / "fs.log")
    try:
        yield d
    finally:
        assert d.stop() == 0, d.log()
        assert "Traceback" not in d.log(), d.log()


def connect(d: Daemon) -> tuple[Frontend, FsClient]:
    fe = Frontend(d.sock)
    fe.negotiate(FEATURES)
    fe.set_mem_table()
    fe.setup_queue(0, SIZE)
    fe.setup_queue(1, SIZE)
    c = FsClient(fe)
    c.init()
    return fe, c


def restart_queues(fe: Frontend) -> list[int]:
    """Stop both queues (GET_VRING_BASE) and set them up again where they were."""
    bases = [fe.get_vring_base(i) for i in (0, 1)]
    for i in (0, 1):
        q = fe.queues.pop(i)
        q.ring.release()
        os.close(q.kick)
        os.close(q.call)
    for i, base in zip((0, 1), bases, strict=True):
        fe.setup_queue(i, SIZE, base=base)
    return bases


def test_nodes_and_open_files_survive_a_queue_restart(daemon: Daemon) -> None:
    fe, c = connect(daemon)
    with fe:
        a = c.lookup(1, b"a.txt")
        sub = c.lookup(1, b"sub")
        b = c.lookup(sub.nodeid, b"b.txt")
        fh = c.open(a.nodeid, os.O_RDONLY)
        dh = c.opendir(sub.nodeid)
        wr_entry, wfh = c.create(sub.nodeid, b"new.txt")
        c.write(wr_entry.nodeid, wfh, 0, b"before")
        before = daemon.children()
        assert restart_queues(fe) == [0, 8]  # INIT and 7 requests
        assert daemon.children() != before, "the queues did not move to a new worker"
        # the same node ids, the same handles, after the worker changed
        assert c.read(a.nodeid, fh, 10, 5) == b"01234"
        assert c.getattr(b.nodeid).size == 3
        assert sorted(e.name for e in c.readdir(sub.nodeid, dh)) == [
            b".", b"..", b"b.txt", b"new.txt"]
        c.write(wr_entry.nodeid, wfh, 6, b" after")
        c.release(wr_entry.nodeid, wfh)
        assert c.lookup(1, b"a.txt").nodeid == a.nodeid  # known: the same node
        # lookups counted before the restart still count: two FORGETs of a.txt's two
        # lookups drop it, one does not
        c.forget(a.nodeid, 1)
        assert c.getattr(a.nodeid).size == 10000
        c.forget(a.nodeid, 1)
        c.release(a.nodeid, fh)
        with pytest.raises(FuseError) as e:
            c.getattr(a.nodeid)
        assert e.value.errno == errno.ESTALE
        restart_queues(fe)  # twice over: what was handed over is handed over again
        assert c.read(b.nodeid, c.open(b.nodeid, os.O_RDONLY), 0, 10) == b"bee"
        c.release(sub.nodeid, dh, is_dir=True)
    assert (Path(daemon.sock).parent / "share" / "sub" / "new.txt").read_bytes() == \
        b"before after"


def test_a_reset_or_a_new_connection_starts_a_new_session(daemon: Daemon) -> None:
    fe, c = connect(daemon)
    with fe:
        a = c.lookup(1, b"a.txt")
        fh = c.open(a.nodeid, os.O_RDONLY)
        restart_queues(fe)
        assert c.read(a.nodeid, fh, 0, 3) == b"012"
        # RESET_DEVICE: nothing of the session is left; the driver must INIT again
        for i in (0, 1):
            fe.get_vring_base(i)
        fe.call(FrontendReq.RESET_DEVICE, ack=False)
        fe.drop_queues()
        fe.negotiate(FEATURES)
        fe.setup_queue(0, SIZE)
        fe.setup_queue(1, SIZE)
        with pytest.raises(FuseError) as e:
            c.getattr(a.nodeid)
        assert e.value.errno == errno.EIO  # before INIT
        c.init()
        with pytest.raises(FuseError) as e:
            c.read(a.nodeid, fh, 0, 3)
        assert e.value.errno == errno.EBADF
    fe, c = connect(daemon)  # a new front-end: a new session
    with fe:
        with pytest.raises(FuseError) as e:
            c.getattr(a.nodeid)
        assert e.value.errno == errno.ESTALE
        assert c.lookup(1, b"a.txt").attr.size == 10000


def test_a_worker_killed_leaves_a_session_that_serves_on(daemon: Daemon) -> None:
    """The worker dies (SIGKILL): its tables are gone, nothing is handed over. The next
    worker serves the session on — the guest will not send INIT again — with its old
    node ids ESTALE and its handles EBADF, so its kernel looks names up again; a new
    session starts only at INIT."""
    fe, c = connect(daemon)
    with fe:
        a = c.lookup(1, b"a.txt")
        fh = c.open(a.nodeid, os.O_RDONLY)
        (worker,) = daemon.children()
        os.kill(worker, signal.SIGKILL)
        fe.restart_queue(1)  # the engine finds it dead and starts another
        with pytest.raises(FuseError) as e:
            c.getattr(a.nodeid)
        assert e.value.errno == errno.ESTALE
        with pytest.raises(FuseError) as e:
            c.read(a.nodeid, fh, 0, 3)
        assert e.value.errno == errno.EBADF
        # new ids go on past the dead worker's: none is one the guest still holds
        sub = c.lookup(1, b"sub")
        assert sub.nodeid > a.nodeid
        with pytest.raises(FuseError) as e:
            c.getattr(a.nodeid)
        assert e.value.errno == errno.ESTALE
        again = c.lookup(1, b"a.txt")  # from the root, as the guest's kernel does
        assert again.attr.size == 10000 and again.nodeid > a.nodeid
        fh2 = c.open(again.nodeid, os.O_RDONLY)
        assert fh2 > fh and c.read(again.nodeid, fh2, 0, 3) == b"012"
        with pytest.raises(FuseError) as e:
            c.read(a.nodeid, fh, 0, 3)
        assert e.value.errno == errno.EBADF
    assert "serving on" in daemon.log()


def test_submounts_are_announced(tmp_path: Path) -> None:
    """--announce-submounts: a directory where another file system is mounted inside the
    share carries FUSE_ATTR_SUBMOUNT (the guest mounts it as a submount); without the
    option it does not. The daemon runs in a mount namespace of its own with a tmpfs on
    share/sub."""
    from vhostuser.fuse import abi

    share = tmp_path / "share"
    (share / "sub").mkdir(parents=True)
    (share / "plain").mkdir()
    flags = {}
    for announce in (True, False):
        sock = tmp_path / f"fs{announce}.sock"
        mount = ("unshare", "-m", "--propagation", "private", "sh", "-c",
                 'mount -t tmpfs sub "$0" && exec "$@"', str(share / "sub"))
        d = Daemon(["vhostuser.cli.fs", "--socket-path", str(sock), "--shared-dir",
                    str(share), "--tag", "t", "--sandbox", "none",
                    *(["--announce-submounts"] if announce else [])], sock,
                   tmp_path / f"fs{announce}.log", prefix=mount)
        try:
            fe, c = connect(d)
            with fe:
                assert bool(c.init_out[3] & abi.SUBMOUNTS) is announce
                flags[announce] = (c.lookup(1, b"sub").attr.flags,
                                   c.lookup(1, b"plain").attr.flags)
        finally:
            assert d.stop() == 0, d.log()
    assert flags == {True: (abi.ATTR_SUBMOUNT, 0), False: (0, 0)}
    assert not any((share / "sub").iterdir())  # the tmpfs was the daemon's alone
