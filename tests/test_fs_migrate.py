"""vhost-user-fs's FUSE session migrated from one back-end to another (DEVICE_STATE:
SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE, as QEMU 11.1 sends them when a guest with a
vhost-user-fs device migrates): the node ids and file handles the guest holds stay valid
on the destination's back-end, on the same shared directory; a node whose file left the
directory answers ESTALE; an open file whose file is gone fails the save, and the source
serves on. The destination takes the front-end's bytes as hostile: a state that names
files outside the share, or is malformed, is refused whole and the daemon serves on."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon
from qemu_helpers import wait_until
from test_fs_restart import FEATURES, SIZE, connect

from vhostuser.frontend.client import BackendError, Frontend
from vhostuser.frontend.fs import FsClient, FuseError
from vhostuser.protocol import FrontendReq, ProtocolFeature
from vhostuser.protocol import payloads as p


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    (d / "a.txt").write_bytes(b"0123456789" * 1000)
    (d / "sub").mkdir()
    (d / "sub" / "b.txt").write_bytes(b"bee")
    (d / "gone.txt").write_bytes(b"soon removed")
    return d


def fs_daemon(tmp_path: Path, share: Path, name: str, sandbox: str = "none") -> Daemon:
    sock = tmp_path / f"{name}.sock"
    return Daemon(["vhostuser.cli.fs", "--socket-path", str(sock), "--shared-dir", str(share),
                   "--tag", "t", "--sandbox", sandbox], sock, tmp_path / f"{name}.log")


@pytest.fixture
def pair(tmp_path: Path, share: Path, request: pytest.FixtureRequest
         ) -> Iterator[tuple[Daemon, Daemon]]:
    sandbox = getattr(request, "param", "none")
    a = fs_daemon(tmp_path, share, "src", sandbox)
    b = fs_daemon(tmp_path, share, "dst", sandbox)
    try:
        yield a, b
    finally:
        for d in (a, b):
            assert d.stop() == 0, d.log()
            assert "Traceback" not in d.log(), d.log()


def stop_queues(fe: Frontend) -> list[int]:
    """GET_VRING_BASE on both queues, as QEMU stops the device before it saves it."""
    bases = [fe.get_vring_base(i) for i in (0, 1)]
    fe.drop_queues()
    return bases


def destination(d: Daemon, c: FsClient, bases: list[int], state: bytes) -> Frontend:
    """The destination's front-end: connected, the state loaded before the queues start
    (as QEMU does it), the queues started where the source's stopped; `c` moved to it."""
    fe = Frontend(d.sock)
    fe.negotiate(FEATURES)
    fe.load_device_state(state)
    fe.set_mem_table()
    for i, base in zip((0, 1), bases, strict=True):
        fe.setup_queue(i, SIZE, base=base)
    c.fe, c.arena = fe, fe.ram.alloc(c.arena_size, 4096)
    return fe


@pytest.mark.parametrize("pair", ["none", "namespace"], indirect=True)
def test_nodes_and_open_files_follow_the_guest(pair: tuple[Daemon, Daemon],
                                               share: Path) -> None:
    """In both sandboxes the daemon can run in (its root the host's, or the share)."""
    a, b = pair
    fe, c = connect(a)
    with fe:
        assert fe.protocol_features & ProtocolFeature.DEVICE_STATE
        sub = c.lookup(1, b"sub")
        bee = c.lookup(sub.nodeid, b"b.txt")
        na = c.lookup(1, b"a.txt")
        c.lookup(1, b"a.txt")  # two lookups
        rfh = c.open(na.nodeid, os.O_RDONLY)
        dh = c.opendir(sub.nodeid)
        rootdh = c.opendir(1)
        made, wfh = c.create(sub.nodeid, b"new.txt")
        c.write(made.nodeid, wfh, 0, b"written at the source|")
        gone = c.lookup(1, b"gone.txt")
        (share / "gone.txt").unlink()  # by the host: only a lookup holds it
        bases = stop_queues(fe)
        state = fe.save_device_state()
    doc = json.loads(state)  # what crosses is paths, not the source's fds
    paths = sorted(n[1] for n in doc["session"]["nodes"] if n[1] is not None)
    assert paths == ["a.txt", "sub", "sub/b.txt", "sub/new.txt"]
    fe2 = destination(b, c, bases, state)
    with fe2:
        assert c.read(na.nodeid, rfh, 10, 5) == b"01234"
        assert c.getattr(bee.nodeid).size == 3
        assert c.write(made.nodeid, wfh, 22, b"and at the destination") == 22
        c.release(made.nodeid, wfh)
        names = sorted(e.name for e in c.readdir(sub.nodeid, dh))
        assert names == [b".", b"..", b"b.txt", b"new.txt"]
        assert b"sub" in {e.name for e in c.readdir(1, rootdh)}
        with pytest.raises(FuseError) as e:
            c.getattr(gone.nodeid)
        assert e.value.errno == errno.ESTALE
        # the lookup counts came along: one FORGET of a.txt's two leaves it (the open
        # file keeps the node's file, not its id: after the second FORGET it is gone)
        c.forget(na.nodeid, 1)
        assert c.getattr(na.nodeid).size == 10000
        assert c.lookup(1, b"a.txt").nodeid == na.nodeid  # known: the same node, 2 lookups
        c.forget(na.nodeid, 1)
        assert c.getattr(na.nodeid).size == 10000
        c.forget(na.nodeid, 1)
        with pytest.raises(FuseError) as e:
            c.getattr(na.nodeid)
        assert e.value.errno == errno.ESTALE
        assert c.read(na.nodeid, rfh, 0, 3) == b"012"  # the handle still reads
        # node ids go on from the source's: a new node is none the guest holds
        assert c.lookup(sub.nodeid, b"new.txt").nodeid == made.nodeid
        (share / "later.txt").write_bytes(b"")
        assert c.lookup(1, b"later.txt").nodeid > gone.nodeid
    assert (share / "sub" / "new.txt").read_bytes() == \
        b"written at the source|and at the destination"
    assert "device state saved" in a.log()
    assert "FUSE session taken up: 4 nodes, 4 open files" in b.log()


def test_an_open_file_that_left_the_share_fails_the_save_and_the_source_serves_on(
        pair: tuple[Daemon, Daemon], share: Path) -> None:
    a, _ = pair
    fe, c = connect(a)
    with fe:
        tmp, fh = c.create(1, b"scratch")
        c.write(tmp.nodeid, fh, 0, b"kept only while open")
        c.unlink(1, b"scratch")  # the guest's own: open, unlinked
        bases = stop_queues(fe)
        with pytest.raises(BackendError, match="SET_DEVICE_STATE_FD failed"):
            fe.save_device_state()
        # the migration failed: the source's QEMU starts the queues again
        for i, base in zip((0, 1), bases, strict=True):
            fe.setup_queue(i, SIZE, base=base)
        assert c.read(tmp.nodeid, fh, 0, 9) == b"kept only"
    assert "its data cannot follow" in a.log()


HOSTILE = {
    "not JSON": b"\xff\xfe{",
    "another format": json.dumps({"format": "x", "version": 1, "session": None}).encode(),
    "a later version": json.dumps({"format": "vhostuser-fs-session", "version": 2,
                                   "session": None}).encode(),
}


def _session(nodes: list[list[object]], handles: list[list[object]]) -> bytes:
    return json.dumps({"format": "vhostuser-fs-session", "version": 1, "session": {
        "initialized": True, "minor": 31, "next_node": 100, "next_fh": 100,
        "nodes": nodes, "handles": handles}}).encode()


HOSTILE |= {
    "a path up and out": _session([[2, "../outside.txt", "f", 1, True]], [[1, 2, False, 0]]),
    "an absolute path": _session([[2, "/etc/passwd", "f", 1, True]], [[1, 2, False, 0]]),
    "through a symlink": _session([[2, "link/outside.txt", "f", 1, True]],
                                  [[1, 2, False, 0]]),
    "a node id out of range": _session([[100, "a.txt", "f", 1, True]], []),
    "the same handle twice": _session([[2, "a.txt", "f", 1, True]],
                                      [[1, 2, False, 0], [1, 2, False, 0]]),
    "a handle on no node": _session([], [[1, 7, False, 0]]),
    "a list for a kind": _session([[2, "a.txt", ["f"], 1, True]], []),
    "a number for a flag": _session([[2, "a.txt", "f", 1, 1]], []),
    "a directory opened as a file": _session([[2, "sub", "f", 1, True]], [[1, 2, False, 0]]),
    "a lone surrogate": _session([[2, "\ud800", "f", 1, True]], []),
    "nested five thousand deep": b"[" * 5_000,  # past json's recursion limit
    "a version of a megabyte": json.dumps({"format": "vhostuser-fs-session",
                                           "version": "v" * (1 << 20)}).encode(),
    "a version 1.0": json.dumps({"format": "vhostuser-fs-session", "version": 1.0,
                                 "session": None}).encode(),
    "a path of a megabyte": _session([[2, "x" * (1 << 20), "f", 1, True]], []),
    "a million empty lists": b"[" + b"[]," * 1_000_000 + b"[]]",
}


def test_a_hostile_state_is_refused_whole_and_the_daemon_serves_on(
        tmp_path: Path, share: Path) -> None:
    (tmp_path / "outside.txt").write_bytes(b"secret")
    (share / "link").symlink_to(tmp_path)
    d = fs_daemon(tmp_path, share, "dst")
    engine_fds = f"/proc/{d.proc.pid}/fd"
    try:
        before = len(os.listdir(engine_fds))
        for name, data in HOSTILE.items():
            fe = Frontend(d.sock)
            with fe:
                fe.negotiate(FEATURES)
                with pytest.raises(BackendError, match="CHECK_DEVICE_STATE failed"):
                    fe.load_device_state(data)
                # nothing of it was taken up: a session starts at INIT as ever
                fe.set_mem_table()
                fe.setup_queue(0, SIZE)
                fe.setup_queue(1, SIZE)
                c = FsClient(fe)
                with pytest.raises(FuseError) as e:
                    c.getattr(1)
                assert e.value.errno == errno.EIO, name  # no session before INIT
                c.init()
                with pytest.raises(FuseError) as e:
                    c.getattr(2)
                assert e.value.errno == errno.ESTALE, name
                na = c.lookup(1, b"a.txt")
                assert c.read(na.nodeid, c.open(na.nodeid, os.O_RDONLY), 0, 3) == b"012"
        log = d.wait_log("front-end disconnected", count=len(HOSTILE))
        assert log.count("device state not taken up") == len(HOSTILE)
        assert len(log) < 100_000, "the front-end's bytes went into the log whole"
        # every fd the refused states opened was closed (the last connection's are once
        # the engine is done with it: it logs the disconnect first)
        assert wait_until(lambda: len(os.listdir(engine_fds)) == before, 10), \
            sorted(os.readlink(f"{engine_fds}/{f}") for f in os.listdir(engine_fds))
    finally:
        assert d.stop() == 0, d.log()
    assert "Traceback" not in d.log()


def test_state_requests_out_of_turn_are_refused(pair: tuple[Daemon, Daemon]) -> None:
    """CHECK with no transfer, a save while queues run, an unknown direction or phase:
    a failure in the reply, the connection stays."""
    a, _ = pair
    fe, _ = connect(a)
    with fe:
        assert fe.get_u64(FrontendReq.CHECK_DEVICE_STATE) == 1
        with pytest.raises(BackendError, match="SET_DEVICE_STATE_FD failed"):
            fe.save_device_state()  # the queues run
        stop_queues(fe)
        for direction, phase in ((2, 0), (0, 1)):
            r, w = os.pipe()
            reply, fds = fe.call_with_fds(FrontendReq.SET_DEVICE_STATE_FD,
                                          p.DeviceStateParams(direction, phase), fds=(w,),
                                          ack=False)
            os.close(r)
            os.close(w)
            assert reply is not None and isinstance(reply.payload, p.U64)
            assert (reply.payload.value, fds) == (0x101, [])  # failed, no fd
        assert fe.get_u64(FrontendReq.GET_FEATURES)  # still served
    log = a.log()
    assert "unknown transfer direction 2" in log and "unknown migration phase 1" in log
    assert "the device is not suspended" in log
