"""The file server's tables: inodes the client knows (by node id) and open file handles.

An inode is an O_PATH fd on the host file plus the client's lookup count: the client may
use the node id until it FORGETs every lookup. Inodes are keyed by (st_dev, st_ino), so
two names of one file (hard links) are one node, as the client expects. Node ids and file
handles are counters, never host values, and never reused within a session.

Requests run on several threads: whoever uses an inode's or a handle's fd holds a
reference (`use`), and the fd is closed only once it is both forgotten (released) and
unused, so a hostile FORGET racing a request can never make that request act on a reused
fd number.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class _Ref:
    __slots__ = ("dead", "fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.dead = False


class Inode(_Ref):
    __slots__ = ("dev", "ino", "is_dir", "is_symlink", "nlookup", "nodeid")

    def __init__(self, nodeid: int, fd: int, dev: int, ino: int, mode: int) -> None:
        super().__init__(fd)
        self.nodeid = nodeid
        self.dev, self.ino = dev, ino
        self.is_dir = stat.S_ISDIR(mode)
        self.is_symlink = stat.S_ISLNK(mode)
        self.nlookup = 0

    @classmethod
    def of(cls, nodeid: int, fd: int, st: os.stat_result) -> Inode:
        return cls(nodeid, fd, st.st_dev, st.st_ino, st.st_mode)

    def mode(self) -> int:
        """The file type bits, as far as we keep them."""
        return stat.S_IFDIR if self.is_dir else stat.S_IFLNK if self.is_symlink else 0


class Handle(_Ref):
    __slots__ = ("inode", "is_dir", "lock")

    def __init__(self, fd: int, inode: Inode, is_dir: bool) -> None:
        super().__init__(fd)
        self.inode = inode
        self.is_dir = is_dir
        self.lock = threading.Lock()  # a directory's offset is shared by its READDIRs


def _full() -> OSError:
    return OSError(errno.ENFILE, "too many files open in this session")


def _stale() -> OSError:
    return OSError(errno.ESTALE, "unknown node id or file handle")


class Tables:
    """Inodes and handles of one FUSE session (the root inode is node id 1)."""

    def __init__(self, root_fd: int, limit: int = 1 << 20,
                 counters: memoryview | None = None) -> None:
        """`counters`: the next node id and handle (int64 each), shared with whoever
        serves the session after this process: kept there as they grow, and taken up from
        there, so that ids the client may still hold from a process that died are never
        handed out again (for other files)."""
        self.lock = threading.Lock()
        self.limit = limit  # fds held at most (a node's, a handle's)
        self.held = 0  # fds held now: live nodes, forgotten nodes a handle keeps, handles
        self.inodes: dict[int, Inode] = {}
        self.by_key: dict[tuple[int, int], Inode] = {}
        self.handles: dict[int, Handle] = {}
        self.counters = counters
        self._next_node = max(2, counters[0]) if counters is not None else 2
        self._next_fh = max(1, counters[1]) if counters is not None else 1
        st = os.fstat(root_fd)
        self.root = Inode.of(1, root_fd, st)
        self.root.nlookup = 1 << 62  # never forgotten
        self.inodes[1] = self.root
        self.by_key[(st.st_dev, st.st_ino)] = self.root

    # -- inodes ------------------------------------------------------------------------

    def add(self, fd: int, st: os.stat_result) -> Inode:
        """One lookup of the file open as `fd` (O_PATH): its inode, with the lookup count
        raised. `fd` becomes the inode's, or is closed if the file is known already."""
        with self.lock:
            ino = self.by_key.get((st.st_dev, st.st_ino))
            if ino is None or ino.dead:
                if self.held >= self.limit:
                    os.close(fd)
                    raise _full()
                ino = Inode.of(self._next_node, fd, st)
                self.held += 1
                self._next_node += 1
                if self.counters is not None:
                    self.counters[0] = self._next_node
                self.inodes[ino.nodeid] = ino
                self.by_key[(ino.dev, ino.ino)] = ino
                fd = -1
            ino.nlookup += 1
        if fd >= 0:
            os.close(fd)
        return ino

    def known(self, st: os.stat_result) -> Inode | None:
        with self.lock:
            return self.by_key.get((st.st_dev, st.st_ino))

    @contextmanager
    def inode(self, nodeid: int) -> Iterator[Inode]:
        """The inode of `nodeid`, held for the request (ESTALE if the client forgot it)."""
        with self.lock:
            ino = self.inodes.get(nodeid)
            if ino is None:
                raise _stale()
            ino.users += 1
        try:
            yield ino
        finally:
            self._unuse(ino)

    def forget(self, nodeid: int, n: int) -> None:
        """The client drops `n` lookups of `nodeid`."""
        with self.lock:
            ino = self.inodes.get(nodeid)
            if ino is None or ino is self.root:
                return
            ino.nlookup -= min(n, ino.nlookup)
            if ino.nlookup:
                return
            del self.inodes[nodeid]
            if self.by_key.get((ino.dev, ino.ino)) is ino:
                del self.by_key[(ino.dev, ino.ino)]
            ino.dead = True
            if ino.users:
                return  # the last user closes it
        self._close(ino.fd)

    # -- handles -----------------------------------------------------------------------

    def open(self, fd: int, inode: Inode, is_dir: bool) -> int:
        """Register an open file (or directory) of `inode`, which the caller holds (or has
        just added: then a FORGET may have dropped it meanwhile, ESTALE); returns its
        handle. ENFILE past the session's limit (the caller closes `fd`)."""
        with self.lock:
            if inode.dead and inode.users == 0:  # forgotten, its fd closed
                raise _stale()
            if self.held >= self.limit:
                raise _full()
            self.held += 1
            fh = self._next_fh
            self._next_fh += 1
            if self.counters is not None:
                self.counters[1] = self._next_fh
            h = self.handles[fh] = Handle(fd, inode, is_dir)
            inode.users += 1  # the handle keeps the inode's fd alive
        del h
        return fh

    @contextmanager
    def handle(self, fh: int, is_dir: bool = False) -> Iterator[Handle]:
        with self.lock:
            h = self.handles.get(fh)
            if h is None or h.is_dir != is_dir:
                raise OSError(errno.EBADF, "unknown file handle")
            h.users += 1
        try:
            yield h
        finally:
            self._unuse(h)

    def release(self, fh: int, is_dir: bool) -> None:
        with self.lock:
            h = self.handles.get(fh)
            if h is None or h.is_dir != is_dir:
                raise OSError(errno.EBADF, "unknown file handle")
            del self.handles[fh]
            h.dead = True
            busy = h.users > 0
        if not busy:
            self._close_handle(h)

    def _close_handle(self, h: Handle) -> None:
        self._close(h.fd)
        self._unuse(h.inode)

    def _close(self, fd: int) -> None:
        """Close an fd the tables held (not with the lock held)."""
        os.close(fd)
        with self.lock:
            self.held -= 1

    def _unuse(self, ref: _Ref) -> None:
        with self.lock:
            ref.users -= 1
            last = ref.dead and ref.users == 0
        if last:
            if isinstance(ref, Handle):
                self._close_handle(ref)
            else:
                self._close(ref.fd)

    # -- the session's end ---------------------------------------------------------------

    def clear(self) -> None:
        """Forget everything but the root (INIT again, DESTROY, a reset); what a request
        still uses is closed by its last user."""
        close: list[int] = []
        with self.lock:
            handles = list(self.handles.values())
            inodes = [i for i in self.inodes.values() if i is not self.root]
            self.handles, self.inodes = {}, {1: self.root}
            self.by_key = {(self.root.dev, self.root.ino): self.root}
            for i in inodes:
                i.dead = True
            candidates = dict.fromkeys(inodes)
            for h in handles:
                h.dead = True
                if h.users == 0:
                    close.append(h.fd)
                    h.inode.users -= 1
                    candidates[h.inode] = None
            for i in candidates:
                if i.dead and i.users == 0:
                    close.append(i.fd)
            self.held -= len(close)
        for fd in close:
            os.close(fd)

    # -- handing over to the next worker ---------------------------------------------------

    def export(self) -> tuple[dict[str, Any], list[int]]:
        """Everything but the root, as plain data and the fds it refers to by position
        (no request may run meanwhile). The fds stay open here: the caller sends them."""
        with self.lock:
            known = {i.nodeid: i for i in self.inodes.values() if i is not self.root}
            for h in self.handles.values():  # forgotten inodes that handles keep
                if h.inode is not self.root:
                    known.setdefault(h.inode.nodeid, h.inode)
            fds: list[int] = []
            inodes = []
            for i in known.values():
                inodes.append([i.nodeid, len(fds), i.dev, i.ino, i.mode(), i.nlookup,
                               not i.dead])
                fds.append(i.fd)
            handles = []
            for fh, h in self.handles.items():
                handles.append([fh, len(fds), h.inode.nodeid, h.is_dir])
                fds.append(h.fd)
            state = {"next_node": self._next_node, "next_fh": self._next_fh,
                     "inodes": inodes, "handles": handles}
        return state, fds

    def restore(self, state: dict[str, Any], fds: list[int]) -> None:
        """Take up what `export` gave (in a fresh worker, before any request)."""
        self.clear()
        with self.lock:
            self._next_node, self._next_fh = state["next_node"], state["next_fh"]
            if self.counters is not None:
                self.counters[0], self.counters[1] = self._next_node, self._next_fh
            nodes: dict[int, Inode] = {1: self.root}
            for nodeid, at, dev, ino, mode, nlookup, live in state["inodes"]:
                i = nodes[nodeid] = Inode(nodeid, fds[at], dev, ino, mode)
                i.nlookup = nlookup
                if live:
                    self.inodes[nodeid] = i
                    self.by_key[(dev, ino)] = i
                else:
                    i.dead = True
            for fh, at, nodeid, is_dir in state["handles"]:
                node = nodes[nodeid]
                node.users += 1
                self.handles[fh] = Handle(fds[at], node, is_dir)
            self.held = len(nodes) - 1 + len(self.handles)  # the root is not counted

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return len(self.inodes), len(self.handles)
