"""The file server's node and handle tables (fuse/inodes.py) in-process: the limit on what
a session holds, a FORGET racing a CREATE, handles that outlive their node, fds closed
exactly once."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vhostuser.fuse.inodes import Tables


def opath(p: Path) -> int:
    return os.open(p, os.O_PATH | os.O_CLOEXEC)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name in ("a", "b", "c"):
        (tmp_path / name).write_text(name)
    return tmp_path


def test_a_session_holds_at_most_its_limit(tree: Path) -> None:
    t = Tables(opath(tree), limit=2)  # two fds besides the root's: nodes or handles
    a = t.add(opath(tree / "a"), os.stat(tree / "a"))
    again = opath(tree / "a")
    assert t.add(again, os.stat(tree / "a")) is a and not is_open(again)  # known: no slot
    b_fd = opath(tree / "b")
    b = t.add(b_fd, os.stat(tree / "b"))
    c_fd = opath(tree / "c")
    with pytest.raises(OSError) as e:
        t.add(c_fd, os.stat(tree / "c"))
    assert e.value.errno == errno.ENFILE and not is_open(c_fd)
    file_fd = os.open(tree / "a", os.O_RDONLY)
    with pytest.raises(OSError) as e:
        t.open(file_fd, a, False)
    assert e.value.errno == errno.ENFILE and is_open(file_fd)  # the caller closes it
    t.forget(b.nodeid, 1)
    assert not is_open(b_fd)
    fh = t.open(file_fd, a, False)  # room again
    assert t.counts() == (2, 1)
    t.release(fh, False)
    assert not is_open(file_fd)


def test_a_forget_between_lookup_and_open_is_estale_not_a_double_close(tree: Path) -> None:
    """CREATE adds the node, then opens a handle on it; a FORGET of the node in between
    (another thread) closes its fd: the handle must not be registered on it, or its
    RELEASE would close that fd number again, by then someone else's."""
    t = Tables(opath(tree))
    node_fd = opath(tree / "a")
    a = t.add(node_fd, os.stat(tree / "a"))
    t.forget(a.nodeid, 1)
    assert not is_open(node_fd)
    reused = opath(tree / "b")  # the kernel hands out the lowest free number: the same
    assert reused == node_fd
    file_fd = os.open(tree / "a", os.O_RDONLY)
    with pytest.raises(OSError) as e:
        t.open(file_fd, a, False)
    assert e.value.errno == errno.ESTALE
    assert is_open(reused), "the forgotten node's fd number was closed again"
    os.close(file_fd)
    os.close(reused)


def test_a_handle_keeps_its_forgotten_node_until_released(tree: Path) -> None:
    t = Tables(opath(tree))
    node_fd = opath(tree / "a")
    a = t.add(node_fd, os.stat(tree / "a"))
    fh = t.open(os.open(tree / "a", os.O_RDONLY), a, False)
    t.forget(a.nodeid, 1)
    assert is_open(node_fd)  # the handle holds it
    with t.handle(fh) as h:
        assert h.inode is a
    t.release(fh, False)
    assert not is_open(node_fd)
    with pytest.raises(OSError) as e:
        t.release(fh, False)
    assert e.value.errno == errno.EBADF


def test_export_and_restore_carry_every_node_and_handle(tree: Path) -> None:
    t = Tables(opath(tree))
    a = t.add(opath(tree / "a"), os.stat(tree / "a"))
    t.add(opath(tree / "a"), os.stat(tree / "a"))  # two lookups
    b = t.add(opath(tree / "b"), os.stat(tree / "b"))
    fh = t.open(os.open(tree / "b", os.O_RDONLY), b, False)
    t.forget(b.nodeid, 1)  # b lives on through its handle only
    state, fds = t.export()
    fresh = Tables(opath(tree))
    fresh.restore(state, fds)
    assert fresh.counts() == (2, 1)  # the root and a; b's handle
    with fresh.inode(a.nodeid) as ra:
        assert (ra.nlookup, os.path.samestat(os.fstat(ra.fd), os.stat(tree / "a"))) == (2, True)
    with pytest.raises(OSError), fresh.inode(b.nodeid):
        pass
    with fresh.handle(fh) as h:
        assert os.read(h.fd, 10) == b"b"
    fresh.release(fh, False)
    fresh.forget(a.nodeid, 2)
    assert fresh.counts() == (1, 0)


def test_forgotten_nodes_kept_by_handles_count_against_the_limit(tree: Path) -> None:
    """LOOKUP, OPEN, FORGET, again and again: each forgotten node still holds its fd
    through the handle, so it counts (a reviewer drove 198 fds under a limit of 100)."""
    t = Tables(opath(tree), limit=4)
    for name in ("a", "b"):
        node = t.add(opath(tree / name), os.stat(tree / name))
        t.open(os.open(tree / name, os.O_RDONLY), node, False)
        t.forget(node.nodeid, 1)
    assert t.held == 4
    c_fd = opath(tree / "c")
    with pytest.raises(OSError) as e:
        t.add(c_fd, os.stat(tree / "c"))
    assert e.value.errno == errno.ENFILE
