"""A FUSE session as another file server takes it up (vhost-user DEVICE_STATE: the guest
migrates, its kernel keeps the node ids and file handles it holds): every node by its
path beneath the shared directory, every open file by its node and its open flags; the
other server opens them again beneath its own shared directory (the same files, on the
same host or on storage both see).

Saving finds each node's path from its fd (/proc/self/fd, checked by opening the path
again and comparing the files). A node whose file left the shared directory (removed,
renamed out of it) goes as stale, its node id answering ESTALE after the migration as a
lookup of it would have; an open file whose file is gone cannot follow (its data would be
lost), and the save fails: the migration does, and the guest runs on at the source.

Taking up, the document is the front-end's bytes: every field is checked, every path
walked a component at a time with no symlink followed and no `..`, and anything off fails
the whole (MigrationError), leaving nothing open.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from collections.abc import Callable
from typing import Any

from ..procfs import PROC_FD, own_fd
from .syscalls import open_beneath

FORMAT = "vhostuser-fs-session"
VERSION = 1
MAX_NODES = 1 << 20  # nodes and handles, each (what a session's tables hold at most)
MAX_PATH = 4096
MAX_BYTES = 64 << 20  # a saved session's size at most
# what an open file's flags may be again (F_GETFL reports no O_CREAT, O_EXCL, O_TRUNC)
REOPEN_FLAGS = (os.O_ACCMODE | os.O_APPEND | os.O_DIRECT | os.O_DSYNC | os.O_SYNC
                | os.O_NOATIME | os.O_NONBLOCK | os.O_LARGEFILE)
_KIND_NAMES = {"d": "directory", "l": "symlink", "f": "file"}
# a path that leads nowhere (now): the node goes stale
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV})
Reopen = Callable[[int, bool, int], int]  # (O_PATH fd, a directory, flags) -> an open fd
def _is_file(mode: int) -> bool:
    return not stat.S_ISDIR(mode) and not stat.S_ISLNK(mode)


_KINDS: dict[str, Callable[[int], bool]] = {"d": stat.S_ISDIR, "l": stat.S_ISLNK,
                                           "f": _is_file}


class MigrationError(Exception):
    """The session cannot be saved or taken up whole."""


# -- saving ----------------------------------------------------------------------------------


def save(session: dict[str, Any] | None, fds: list[int], root_fd: int) -> bytes:
    """`session`: FileServer.export's state (None: no session), `fds` its fds (left open)."""
    if session is None:
        return json.dumps({"format": FORMAT, "version": VERSION, "session": None}).encode()
    tables = session["tables"]
    root = _path_of(root_fd)
    nodes, paths = [], {}
    with _Walker(root_fd) as walker:
        found = [(n, _find(fds[n[1]], root, walker)) for n in tables["inodes"]]
    for (nodeid, _at, _dev, _ino, mode, nlookup, live), path in found:
        paths[nodeid] = path
        kind = "d" if stat.S_ISDIR(mode) else "l" if stat.S_ISLNK(mode) else "f"
        nodes.append([nodeid, None if path is None else os.fsdecode(path), kind, nlookup,
                      live])
    handles = []
    for fh, at, nodeid, is_dir in tables["handles"]:
        if nodeid != 1 and paths.get(nodeid) is None:
            raise MigrationError(f"file handle {fh} is open on a file no longer in the "
                                 "shared directory (removed?): its data cannot follow")
        handles.append([fh, nodeid, is_dir, fcntl.fcntl(fds[at], fcntl.F_GETFL)
                        & REOPEN_FLAGS])
    doc = {"format": FORMAT, "version": VERSION,
           "session": {"initialized": session["initialized"], "minor": session["minor"],
                       "next_node": tables["next_node"], "next_fh": tables["next_fh"],
                       "nodes": nodes, "handles": handles}}
    return json.dumps(doc).encode()


def check_size(data: bytes, limit: int) -> None:
    """Refuse a document that takes more to parse than a session of `limit` nodes and
    handles can (json builds an object per list, string and number: bounded by counting
    their delimiters first)."""
    if len(data) > MAX_BYTES:
        raise MigrationError(f"a saved session of {len(data)} bytes (at most {MAX_BYTES})")
    for mark, per_entry in ((b"[", 1), (b",", 5), (b'"', 4)):
        if data.count(mark) > per_entry * 2 * limit + 64:
            raise MigrationError(f"more entries than a session of {limit} nodes and "
                                 "handles holds")


def _path_of(fd: int) -> bytes:
    return os.readlink(os.fsencode(own_fd(fd)), dir_fd=PROC_FD)


def _find(fd: int, root: bytes, walker: _Walker) -> bytes | None:
    """The path of `fd`'s file beneath the shared directory, if it is still there."""
    try:
        path = _path_of(fd)
    except OSError:
        return None
    prefix = root.rstrip(b"/") + b"/"
    if not path.startswith(prefix):
        return None
    rel = path[len(prefix):]
    try:
        found = walker.open(rel)
    except (OSError, MigrationError):
        return None
    try:
        a, b = os.fstat(found), os.fstat(fd)
    finally:
        os.close(found)
    return rel if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) else None


class _Walker:
    """Opens paths beneath the shared directory a component at a time, no symlink
    followed (the last component is opened itself), no `.` or `..`; the directories on
    the way are kept open for the next paths (nodes share their parents)."""

    CACHED = 4096  # directories kept open at most

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.dirs: dict[bytes, int] = {}

    def __enter__(self) -> _Walker:
        return self

    def __exit__(self, *_exc: object) -> None:
        dirs, self.dirs = self.dirs, {}
        for fd in dirs.values():
            os.close(fd)

    def open(self, rel: bytes) -> int:
        """An O_PATH fd on `rel` (the caller's)."""
        if len(rel) > MAX_PATH:
            raise MigrationError(f"a path of {len(rel)} bytes (at most {MAX_PATH})")
        parts = rel.split(b"/")
        if any(c in (b"", b".", b"..") or b"\0" in c for c in parts):
            raise MigrationError(f"not a path beneath the shared directory: {_show(rel)}")
        fd, at = self.root_fd, b""
        for c in parts[:-1]:
            at = at + b"/" + c if at else c
            d = self.dirs.get(at)
            if d is None:
                d = open_beneath(fd, c, os.O_PATH | os.O_DIRECTORY)
                if len(self.dirs) >= self.CACHED:
                    self.__exit__()
                self.dirs[at] = d
            fd = d
        return open_beneath(fd, parts[-1], os.O_PATH)


def _show(v: object) -> str:
    """`v` for a message, cut short (it may be the front-end's, and huge)."""
    r = repr(v)
    return r if len(r) <= 80 else r[:76] + "..."


# -- taking up ---------------------------------------------------------------------------------


def load(data: bytes, root_fd: int, reopen: Reopen, limit: int
         ) -> tuple[dict[str, Any] | None, list[int]]:
    """FileServer.restore's state and fds (None: no session) from what `save` gave;
    `reopen` opens a handle's file again as the server opens it; at most `limit` fds."""
    check_size(data, limit)
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError, MemoryError) as e:
        raise MigrationError(f"not a saved session: {_show(str(e))}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise MigrationError("not a saved vhost-user-fs session")
    if type(doc.get("version")) is not int or doc["version"] != VERSION:
        raise MigrationError(f"a session saved in version {_show(doc.get('version'))} of "
                             f"its format; this server reads version {VERSION}")
    s = doc.get("session")
    if s is None:
        return None, []
    if not isinstance(s, dict):
        raise MigrationError("the session is not an object")
    fds: list[int] = []
    try:
        with _Walker(root_fd) as walker:
            return _load(s, walker, reopen, limit, fds), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _int(v: object, lo: int, hi: int, what: str) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise MigrationError(f"{what}: {_show(v)} is not a number from {lo} to {hi}")
    return v


def _bool(v: object, what: str) -> bool:
    if type(v) is not bool:
        raise MigrationError(f"{what}: {_show(v)} is not true or false")
    return v


def _list(v: object, what: str) -> list[Any]:
    if type(v) is not list or len(v) > MAX_NODES:
        raise MigrationError(f"{what}: not a list of at most {MAX_NODES}")
    return v


def _load(s: dict[str, Any], walker: _Walker, reopen: Reopen, limit: int,
          fds: list[int]) -> dict[str, Any]:
    initialized = _bool(s.get("initialized"), "initialized")
    minor = _int(s.get("minor"), 0, 2**32 - 1, "minor")
    next_node = _int(s.get("next_node"), 2, 2**62, "next_node")
    next_fh = _int(s.get("next_fh"), 1, 2**62, "next_fh")
    raw_nodes = _list(s.get("nodes"), "nodes")
    raw_handles = _list(s.get("handles"), "handles")
    handles = []
    for h in raw_handles:
        if type(h) is not list or len(h) != 4:
            raise MigrationError(f"a handle of another shape: {_show(h)}")
        fh = _int(h[0], 1, next_fh - 1, "file handle")
        handles.append((fh, _int(h[1], 1, next_node - 1, f"handle {fh}'s node"),
                        _bool(h[2], f"handle {fh}'s kind"),
                        _int(h[3], 0, 2**32 - 1, f"handle {fh}'s flags")))
    if len({h[0] for h in handles}) != len(handles):
        raise MigrationError("a file handle twice")
    if len(raw_nodes) + len(handles) > limit:
        raise MigrationError(f"{len(raw_nodes)} nodes and {len(handles)} open files: more "
                             f"than this server holds ({limit})")
    needed = {h[1] for h in handles}
    inodes, at, seen = [], {1: -1}, set()
    for n in raw_nodes:
        if type(n) is not list or len(n) != 5:
            raise MigrationError(f"a node of another shape: {_show(n)}")
        nodeid = _int(n[0], 2, next_node - 1, "node id")
        path, kind = n[1], n[2]
        if nodeid in seen:
            raise MigrationError(f"node {nodeid} twice")
        seen.add(nodeid)
        if (path is not None and type(path) is not str) or type(kind) is not str \
                or kind not in _KINDS:
            raise MigrationError(f"node {nodeid}: a path {_show(path)} of kind "
                                 f"{_show(kind)}")
        nlookup = _int(n[3], 0, 2**62, f"node {nodeid}'s lookups")
        live = _bool(n[4], f"node {nodeid}'s liveness")
        if not live and nodeid not in needed:
            continue  # forgotten, and no open file keeps it: nothing to take up
        fd = None if path is None else _open_node(walker, path, kind)
        if fd is None:
            if nodeid in needed:
                raise MigrationError(f"node {nodeid} ({_show(path)}), which a handle holds "
                                     f"open, is no {_KIND_NAMES[kind]} in the shared "
                                     "directory")
            continue  # stale: its node id answers ESTALE
        at[nodeid] = len(fds)
        fds.append(fd)
        st = os.fstat(fd)
        inodes.append([nodeid, at[nodeid], st.st_dev, st.st_ino, st.st_mode, nlookup, live])
    out = []
    for fh, nodeid, is_dir, flags in handles:
        if nodeid not in at:
            raise MigrationError(f"file handle {fh} refers to node {nodeid}, which is not "
                                 "in the session")
        path_fd = walker.root_fd if nodeid == 1 else fds[at[nodeid]]
        try:
            fd = reopen(path_fd, is_dir, flags & REOPEN_FLAGS)
        except OSError as e:
            raise MigrationError(f"file handle {fh} (node {nodeid}) cannot be opened "
                                 f"again: {e.strerror}") from e
        out.append([fh, len(fds), nodeid, is_dir])
        fds.append(fd)
    return {"initialized": initialized, "minor": minor,
            "tables": {"next_node": next_node, "next_fh": next_fh, "inodes": inodes,
                       "handles": out}}


def _open_node(walker: _Walker, path: str, kind: str) -> int | None:
    """The node's O_PATH fd, or None if its path leads nowhere or to another kind."""
    try:
        raw = os.fsencode(path)
    except UnicodeError as e:
        raise MigrationError(f"not a file name: {_show(path)}") from e
    try:
        fd = walker.open(raw)
    except OSError as e:
        if e.errno in _GONE:
            return None
        raise MigrationError(f"{_show(path)} cannot be opened: {e.strerror}") from e
    if _KINDS[kind](os.fstat(fd).st_mode):
        return fd
    os.close(fd)
    return None
