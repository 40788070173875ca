"""vhost-user-fs driven by the Python virtio-fs driver (frontend/fs.py) against the real
daemon: every FUSE operation the server implements, checked against what the host then
sees (os.stat, os.listdir, the bytes in the files); the confinement a hostile driver meets
(names, `..`, symlinks and device nodes never lead out of the share, a read-only share
changes nothing); malformed requests answered cleanly while the daemon keeps serving; the
namespace and chroot sandboxes; and the command line. The guest's own view is in
test_qemu_fs.py."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon import Daemon

from vhostuser.frontend.client import Frontend
from vhostuser.frontend.fs import Attr, Dirent, FsClient, FuseError, parse_dirents
from vhostuser.fuse import abi
from vhostuser.fuse.abi import Op
from vhostuser.protocol import VirtioFeature

FEATURES = VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX
RING = 128
TAG = "share-" + "x" * 30  # the longest tag: 36 bytes, no NUL in the config space
MiB = 1 << 20
ROOT = abi.ROOT_ID
SECRET = b"the host's own file, outside the share\n"
WANT_FLAGS = (abi.ASYNC_READ | abi.BIG_WRITES | abi.AUTO_INVAL_DATA | abi.DO_READDIRPLUS
              | abi.READDIRPLUS_AUTO | abi.PARALLEL_DIROPS | abi.MAX_PAGES | abi.ASYNC_DIO)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE = 1, 2
XATTR_CREATE, XATTR_REPLACE = 1, 2


# -- daemons and sessions -----------------------------------------------------------------


@dataclass
class Served:
    daemon: Daemon
    share: Path
    outside: Path  # a directory beside the share, with SECRET in it


def start(base: Path, *extra: str, share: Path | None = None) -> Served:
    share = share or base / "share"
    share.mkdir(exist_ok=True)
    outside = base / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret").write_bytes(SECRET)
    os.chmod(outside / "secret", 0o600)
    sock = base / "fs.sock"
    umask = os.umask(0o022)  # the daemon's, whatever ours is: it must not mask the client's
    try:
        d = Daemon(["vhostuser.cli.fs", "--socket-path", str(sock), "--shared-dir",
                    str(share), "--tag", TAG, *extra], sock, base / "fs.log")
    finally:
        os.umask(umask)
    return Served(d, share, outside)


def stop(s: Served) -> None:
    rc = s.daemon.stop()
    log = s.daemon.log()
    assert rc == 0, f"the back-end exited {rc}:\n{log}"
    assert "Traceback" not in log, log
    assert (s.outside / "secret").read_bytes() == SECRET


def served(tmp_path_factory: pytest.TempPathFactory, name: str,
           *extra: str) -> Iterator[Served]:
    s = start(tmp_path_factory.mktemp(name), *extra)
    try:
        yield s
    finally:
        stop(s)


@pytest.fixture(scope="module")
def rw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from served(tmp_path_factory, "rw", "--sandbox", "none", "--xattr")


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from served(tmp_path_factory, "plain", "--sandbox", "none")


@pytest.fixture(scope="module")
def ro(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from served(tmp_path_factory, "ro", "--sandbox", "none", "--xattr", "--readonly")


def connect(d: Daemon, init: bool = True) -> tuple[Frontend, FsClient]:
    fe = Frontend(d.sock)
    try:
        fe.negotiate(FEATURES)
        fe.set_mem_table()
        fe.setup_queue(0, RING)  # hiprio
        fe.setup_queue(1, RING)  # requests
        c = FsClient(fe)
        if init:
            c.init()
    except BaseException:
        fe.close()
        raise
    return fe, c


@dataclass
class Session:
    """One front-end on a shared daemon; the test works in its own directory `host`
    (node `dir` to the driver)."""

    s: Served
    fe: Frontend
    c: FsClient
    host: Path
    dir: int

    @property
    def d(self) -> Daemon:
        return self.s.daemon


def session(s: Served, request: pytest.FixtureRequest) -> Iterator[Session]:
    host = s.share / re.sub(r"\W", "_", request.node.name)
    n = 0
    while host.exists():  # parameters that differ only in characters that are not \w
        n += 1
        host = host.with_name(f"{host.name.rstrip('0123456789')}{n}")
    host.mkdir()
    fe, c = connect(s.daemon)
    try:
        yield Session(s, fe, c, host, c.lookup(ROOT, os.fsencode(host.name)).nodeid)
    finally:
        fe.close()
    assert s.daemon.alive(), s.daemon.log()
    assert "Traceback" not in s.daemon.log(), s.daemon.log()


@pytest.fixture
def fs(rw: Served, request: pytest.FixtureRequest) -> Iterator[Session]:
    yield from session(rw, request)


@pytest.fixture
def fs_plain(plain: Served, request: pytest.FixtureRequest) -> Iterator[Session]:
    yield from session(plain, request)


# -- helpers --------------------------------------------------------------------------------


def fails(fn: Callable[..., object], *args: object, **kw: object) -> int:
    """The errno the server answered `fn(*args)` with (it must fail)."""
    try:
        fn(*args, **kw)
    except FuseError as e:
        assert e.errno is not None
        return e.errno
    raise AssertionError(f"{getattr(fn, '__name__', fn)}{args} succeeded")


def ns(sec: int, nsec: int) -> int:
    return sec * 10**9 + nsec


def dev_encode(dev: int) -> int:
    """The kernel's new_encode_dev(), what FUSE carries."""
    ma, mi = os.major(dev), os.minor(dev)
    return (mi & 0xFF) | (ma << 8) | ((mi & ~0xFF) << 12)


def assert_attr(a: Attr, st: os.stat_result) -> None:
    """Every field of a FUSE attr as os.stat (or os.lstat) gives it on the host."""
    assert (a.ino, a.size, a.blocks, a.mode, a.nlink, a.uid, a.gid, a.rdev, a.blksize) == (
        st.st_ino, st.st_size, st.st_blocks, st.st_mode, st.st_nlink, st.st_uid, st.st_gid,
        dev_encode(st.st_rdev), st.st_blksize)
    assert (ns(a.atime, a.atimensec), ns(a.mtime, a.mtimensec), ns(a.ctime, a.ctimensec)) == (
        st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)


def in_header(opcode: int, nodeid: int, length: int, unique: int, extlen: int = 0) -> bytes:
    return abi.IN_HEADER.pack(length, opcode, unique, nodeid, 0, 0, os.getpid(), extlen, 0)


def post(c: FsClient, readable: list[bytes], writable: list[int],
         queue: int = 1) -> list[int]:
    """A chain of readable buffers holding these bytes and writable buffers of these sizes,
    each its own descriptor; returns the writable buffers' addresses."""
    ram, bufs, outs = c.fe.ram, [], []
    for data in readable:
        a = ram.alloc(max(len(data), 1))
        ram.at(a, len(data))[:] = data
        bufs.append((a, len(data), False))
    for n in writable:
        a = ram.alloc(max(n, 1))
        ram.at(a, n)[:] = b"\xee" * n
        bufs.append((a, n, True))
        outs.append(a)
    c.fe.queues[queue].ring.add(bufs)
    c.fe.kick(queue)
    return outs


def raw(c: FsClient, readable: list[bytes], writable: list[int] | None = None,
        queue: int = 1) -> bytes:
    """Post a hand-made chain, wait for it: the bytes the server wrote (gathered)."""
    writable = [4096] if writable is None else writable
    outs = post(c, readable, writable, queue)
    [(_, written)] = c.fe.wait_used(queue, 1)
    got = b"".join(bytes(c.fe.ram.at(a, n)) for a, n in zip(outs, writable, strict=True))
    assert written <= len(got)
    return got[:written]


def error_of(out: bytes, unique: int) -> int:
    """The errno of a raw reply (0: success), checking its header."""
    n, error, uniq = abi.OUT_HEADER.unpack_from(out)
    assert (n, uniq) == (len(out), unique)
    return -error


def no_reply(c: FsClient, opcode: int, nodeid: int, body: bytes, queue: int = 0) -> int:
    """A request that has no reply, with room for one anyway: the bytes the server wrote."""
    c.submit(opcode, nodeid, body, queue=queue)
    [(_, written)] = c.fe.wait_used(queue, 1)
    return written


def setattr_raw(c: FsClient, nodeid: int, valid: int, *, fh: int = 0, size: int = 0,
                atime: tuple[int, int] = (0, 0), mtime: tuple[int, int] = (0, 0),
                mode: int = 0, uid: int = 0, gid: int = 0) -> Attr:
    body = abi.SETATTR_IN.pack(valid, 0, fh, size, 0, atime[0], mtime[0], 0, atime[1],
                               mtime[1], 0, mode, 0, uid, gid, 0)
    return Attr.unpack(c.request(Op.SETATTR, nodeid, body)[abi.ATTR_OUT.size :])


def readdir_all(c: FsClient, nodeid: int, size: int, plus: bool = False
                ) -> tuple[list[Dirent], int]:
    """Every entry, READDIR after READDIR from the last entry's offset: (entries, calls)."""
    fh = c.opendir(nodeid)
    out: list[Dirent] = []
    offset, calls = 0, 0
    try:
        while True:
            calls += 1
            raw_out = c.request(Op.READDIRPLUS if plus else Op.READDIR, nodeid,
                                abi.READ_IN.pack(fh, offset, size, 0, 0, 0, 0),
                                reply=abi.OUT_HEADER.size + size)
            assert len(raw_out) <= size
            part = parse_dirents(raw_out, plus)
            if not part:
                return out, calls
            out += part
            offset = part[-1].off
    finally:
        c.release(nodeid, fh, is_dir=True)


def host_state(path: Path) -> tuple[bytes, int, int, int, int]:
    st = os.stat(path)
    return path.read_bytes(), st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns


# -- the session ----------------------------------------------------------------------------


def test_config_space_holds_the_tag_and_one_request_queue(rw: Served) -> None:
    fe, _ = connect(rw.daemon, init=False)
    try:
        assert fe.get_config(abi.CONFIG.size) == abi.CONFIG.pack(TAG.encode(), 1)
        assert len(TAG.encode()) == abi.TAG_SIZE
    finally:
        fe.close()


def test_init_negotiates_version_and_flags(rw: Served) -> None:
    fe, c = connect(rw.daemon, init=False)
    try:
        assert fails(c.getattr, ROOT) == errno.EIO, "a request before INIT"
        assert fails(c.lookup, ROOT, b"x") == errno.EIO
        assert fails(c.init, minor=abi.MIN_MINOR - 1) == errno.EPROTO
        bad_major = abi.INIT_IN.pack(6, 38, 0, 0) + bytes(48)
        assert fails(c.request, Op.INIT, 0, bad_major) == errno.EPROTO
        # a newer major: the server answers with its version, the client retries with it
        newer = c.request(Op.INIT, 0, abi.INIT_IN.pack(8, 0, 0, 0) + bytes(48))
        assert newer == struct.pack("<II", 7, 38)
        assert fails(c.getattr, ROOT) == errno.EIO, "still not initialized"
        assert c.init(minor=31, flags=0) == (7, 31, 1 << 17, 0, 64, 48, MiB, 1, 256, 0, 0)
        assert c.init() == (7, 38, 1 << 17, WANT_FLAGS, 64, 48, MiB, 1, 256, 0, 0)
        assert_attr(c.getattr(ROOT), os.stat(rw.share))
    finally:
        fe.close()


def test_destroy_ends_the_session_and_init_starts_afresh(fs: Session) -> None:
    c = fs.c
    (fs.host / "f").write_bytes(b"data")
    node = c.lookup(fs.dir, b"f").nodeid
    fh = c.open(node, os.O_RDONLY)
    c.destroy()
    assert fails(c.getattr, ROOT) == errno.EIO
    assert fails(c.lookup, ROOT, os.fsencode(fs.host.name)) == errno.EIO
    c.init()
    assert fails(c.getattr, node) == errno.ESTALE
    assert fails(c.read, node, fh, 0, 4) == errno.EBADF
    dir2 = c.lookup(ROOT, os.fsencode(fs.host.name)).nodeid
    node2 = c.lookup(dir2, b"f").nodeid
    assert node2 not in (node, fs.dir) and dir2 != fs.dir, "node ids are never reused"
    fh = c.open(node2, os.O_RDONLY)
    assert c.read(node2, fh, 0, 100) == b"data"
    # INIT again without DESTROY starts afresh too (a rebooted guest)
    c.init()
    assert fails(c.getattr, node2) == errno.ESTALE
    assert fails(c.read, node2, fh, 0, 4) == errno.EBADF
    assert_attr(c.getattr(ROOT), os.stat(fs.s.share))


@pytest.mark.parametrize("opcode", [0, 7, 19, 52, 4096, 0xFFFFFFFF, Op.GETLK, Op.SETLK,
                                    Op.SETLKW, Op.BMAP, Op.IOCTL, Op.POLL, Op.SETUPMAPPING,
                                    Op.REMOVEMAPPING, Op.TMPFILE])
def test_unknown_and_unimplemented_opcodes_are_enosys(fs: Session, opcode: int) -> None:
    assert fails(fs.c.request, opcode, fs.dir, bytes(64)) == errno.ENOSYS
    assert_attr(fs.c.getattr(fs.dir), os.stat(fs.host))


def test_interrupt_has_no_reply(fs: Session) -> None:
    assert no_reply(fs.c, Op.INTERRUPT, 0, abi.INTERRUPT_IN.pack(12345), queue=1) == 0
    assert_attr(fs.c.getattr(fs.dir), os.stat(fs.host))


# -- names: lookup, attributes, creation, removal -----------------------------------------


def test_lookup_and_getattr_match_the_host(fs: Session) -> None:
    c = fs.c
    (fs.host / "file").write_bytes(b"x" * 5000)
    (fs.host / "sub").mkdir()
    os.symlink("file", fs.host / "link")
    os.mkfifo(fs.host / "fifo")
    for name in ("file", "sub", "link", "fifo"):
        e = c.lookup(fs.dir, name.encode())
        assert_attr(e.attr, os.lstat(fs.host / name))
        assert_attr(c.getattr(e.nodeid), os.lstat(fs.host / name))
        assert e.nodeid == c.lookup(fs.dir, name.encode()).nodeid, "one node per file"
    assert_attr(c.getattr(ROOT), os.stat(fs.s.share))
    assert_attr(c.getattr(fs.dir), os.stat(fs.host))
    node = c.lookup(fs.dir, b"file").nodeid
    fh = c.open(node, os.O_RDONLY)
    assert_attr(c.getattr(node, fh=fh), os.stat(fs.host / "file"))
    assert fails(c.lookup, fs.dir, b"missing") == errno.ENOENT
    assert fails(c.lookup, fs.dir, b"n" * 256) == errno.ENAMETOOLONG
    assert fails(c.lookup, node, b"x") == errno.ENOTDIR
    assert fails(c.getattr, 987654321) == errno.ESTALE
    assert fails(c.getattr, 0) == errno.ESTALE
    assert fails(c.getattr, node, fh=fh + 1000) == errno.EBADF


def test_lookup_of_dot_and_dotdot(fs: Session) -> None:
    c = fs.c
    (fs.host / "a" / "b").mkdir(parents=True)
    a = c.lookup(fs.dir, b"a").nodeid
    b = c.lookup(a, b"b").nodeid
    assert c.lookup(b, b"..").nodeid == a
    assert c.lookup(a, b"..").nodeid == fs.dir
    assert c.lookup(fs.dir, b"..").nodeid == ROOT
    assert c.lookup(a, b".").nodeid == a
    assert c.lookup(ROOT, b".").nodeid == ROOT
    e = c.lookup(ROOT, b"..")
    assert e.nodeid == ROOT, "`..` of the shared root is the root"
    assert_attr(e.attr, os.stat(fs.s.share))
    assert c.lookup(c.lookup(ROOT, b"..").nodeid, b"..").nodeid == ROOT


def test_setattr_mode_owner_and_size(fs: Session) -> None:
    c = fs.c
    path = fs.host / "f"
    path.write_bytes(b"0123456789")
    os.chmod(path, 0o644)
    node = c.lookup(fs.dir, b"f").nodeid
    a = c.setattr(node, mode=0o100640)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert_attr(a, os.stat(path))
    a = c.setattr(node, uid=1234, gid=5678)
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (1234, 5678)
    assert_attr(a, os.stat(path))
    c.setattr(node, uid=4321)
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (4321, 5678), "gid kept"
    c.setattr(node, gid=8765)
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (4321, 8765), "uid kept"
    a = c.setattr(node, size=4)  # no file handle: the server opens the file itself
    assert_attr(a, os.stat(path))  # (before reading it: that moves its atime)
    assert path.read_bytes() == b"0123"
    a = c.setattr(node, size=8)
    assert path.read_bytes() == b"0123\0\0\0\0"
    assert a.size == 8
    fh = c.open(node, os.O_RDWR)
    a = c.setattr(node, size=2, fh=fh)  # ftruncate(2) of an open file
    assert_attr(a, os.stat(path))
    assert path.read_bytes() == b"01"
    ro_fh = c.open(node, os.O_RDONLY)
    assert fails(c.setattr, node, size=0, fh=ro_fh) == errno.EINVAL, "not open for writing"
    assert fails(c.setattr, node, size=0, fh=ro_fh + 1000) == errno.EBADF
    assert path.read_bytes() == b"01"
    d = c.mkdir(fs.dir, b"d").nodeid
    assert fails(c.setattr, d, size=0) == errno.EISDIR
    c.setattr(d, mode=0o40700)
    assert stat.S_IMODE(os.stat(fs.host / "d").st_mode) == 0o700


def test_setattr_times(fs: Session) -> None:
    c = fs.c
    path = fs.host / "f"
    path.write_bytes(b"x")
    node = c.lookup(fs.dir, b"f").nodeid
    a = c.setattr(node, atime=(1_000_000_000, 5), mtime=(1_100_000_000, 999_999_999))
    st = os.stat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (ns(1_000_000_000, 5),
                                                ns(1_100_000_000, 999_999_999))
    assert_attr(a, st)
    c.setattr(node, mtime=(1_200_000_000, 7))  # atime left alone (UTIME_OMIT)
    st = os.stat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (ns(1_000_000_000, 5), ns(1_200_000_000, 7))
    c.setattr(node, atime=(1_300_000_000, 1))  # mtime left alone
    st = os.stat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (ns(1_300_000_000, 1), ns(1_200_000_000, 7))
    # ATIME_NOW: the host's clock, the same instant as the change time; mtime as sent
    a = setattr_raw(c, node, abi.FATTR_ATIME | abi.FATTR_ATIME_NOW | abi.FATTR_MTIME,
                    atime=(1, 1), mtime=(1_400_000_000, 3))
    st = os.stat(path)
    assert st.st_atime_ns == st.st_ctime_ns
    assert st.st_atime_ns > ns(1_400_000_000, 3)
    assert st.st_mtime_ns == ns(1_400_000_000, 3)
    assert_attr(a, st)
    a = setattr_raw(c, node, abi.FATTR_MTIME | abi.FATTR_MTIME_NOW, mtime=(1, 1))
    st2 = os.stat(path)
    assert st2.st_mtime_ns == st2.st_ctime_ns and st2.st_mtime_ns >= st.st_ctime_ns
    assert st2.st_atime_ns == st.st_atime_ns
    assert_attr(a, st2)
    assert fails(setattr_raw, c, node, abi.FATTR_MTIME, mtime=(1, 10**9)) == errno.EINVAL
    # a symlink's own times change, never its target's
    os.symlink("f", fs.host / "l")
    link = c.lookup(fs.dir, b"l").nodeid
    c.setattr(link, atime=(1_500_000_000, 0), mtime=(1_600_000_000, 0))
    assert os.lstat(fs.host / "l").st_mtime_ns == ns(1_600_000_000, 0)
    assert os.stat(path).st_mtime_ns == st2.st_mtime_ns
    assert fails(c.setattr, link, mode=0o120600) == errno.EOPNOTSUPP


def test_symlink_and_readlink(fs: Session) -> None:
    c = fs.c
    e = c.symlink(fs.dir, b"l", b"some/where/../else")
    assert_attr(e.attr, os.lstat(fs.host / "l"))  # (before readlink: that moves its atime)
    assert os.readlink(fs.host / "l") == "some/where/../else"
    assert stat.S_ISLNK(e.attr.mode) and e.attr.size == len(b"some/where/../else")
    assert c.readlink(e.nodeid) == b"some/where/../else"
    (fs.host / "f").touch()
    assert fails(c.readlink, c.lookup(fs.dir, b"f").nodeid) == errno.EINVAL
    assert fails(c.readlink, fs.dir) == errno.EINVAL
    assert fails(c.symlink, fs.dir, b"l", b"x") == errno.EEXIST
    assert fails(c.symlink, fs.dir, b"long", b"t" * 4096) == errno.ENAMETOOLONG
    assert fails(c.symlink, fs.dir, b"empty", b"") == errno.ENOENT
    assert sorted(os.listdir(fs.host)) == ["f", "l"]


def test_mknod_fifo_and_character_device(fs: Session) -> None:
    c = fs.c
    e = c.mknod(fs.dir, b"fifo", stat.S_IFIFO | 0o640)
    st = os.lstat(fs.host / "fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert_attr(e.attr, st)
    e = c.mknod(fs.dir, b"null", stat.S_IFCHR | 0o666, dev_encode(os.makedev(1, 3)))
    st = os.lstat(fs.host / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert e.attr.rdev == 0x103
    big = os.makedev(259, 70000)  # the minor's high bits travel above the major
    e = c.mknod(fs.dir, b"big", stat.S_IFBLK | 0o600, dev_encode(big))
    assert os.lstat(fs.host / "big").st_rdev == big
    assert e.attr.rdev == dev_encode(big) == 0x11110370
    e = c.mknod(fs.dir, b"reg", stat.S_IFREG | 0o604)
    assert stat.S_ISREG(os.lstat(fs.host / "reg").st_mode)
    assert fails(c.mknod, fs.dir, b"fifo", stat.S_IFIFO | 0o600) == errno.EEXIST


def test_mkdir_unlink_rmdir(fs: Session) -> None:
    c = fs.c
    e = c.mkdir(fs.dir, b"d", 0o750)
    st = os.stat(fs.host / "d")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
    assert_attr(e.attr, st)
    assert fails(c.mkdir, fs.dir, b"d") == errno.EEXIST
    ent, fh = c.create(e.nodeid, b"f")
    c.release(ent.nodeid, fh)
    assert fails(c.rmdir, fs.dir, b"d") == errno.ENOTEMPTY
    assert fails(c.unlink, fs.dir, b"d") == errno.EISDIR
    assert fails(c.rmdir, e.nodeid, b"f") == errno.ENOTDIR
    c.unlink(e.nodeid, b"f")
    assert os.listdir(fs.host / "d") == []
    assert fails(c.unlink, e.nodeid, b"f") == errno.ENOENT
    c.rmdir(fs.dir, b"d")
    assert os.listdir(fs.host) == []
    assert fails(c.rmdir, fs.dir, b"d") == errno.ENOENT


def umask_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        [line] = [x for x in f if x.startswith("Umask:")]
    return int(line.split()[1], 8)


def test_the_client_s_mode_is_applied_unmasked(fs: Session) -> None:
    """The client applied its umask already (DONT_MASK is not negotiated): the daemon's
    umask (022 here, inherited) must not take bits away again, in any worker."""
    c = fs.c
    assert umask_of(fs.d.proc.pid) == 0o022
    for round_ in range(2):
        c.mkdir(fs.dir, b"d%d" % round_, 0o777)
        ent, fh = c.create(fs.dir, b"f%d" % round_, 0o666)
        c.release(ent.nodeid, fh)
        c.mknod(fs.dir, b"p%d" % round_, stat.S_IFIFO | 0o666)
        modes = {n: stat.S_IMODE(os.lstat(fs.host / f"{n}{round_}").st_mode)
                 for n in ("d", "f", "p")}
        assert modes == {"d": 0o777, "f": 0o666, "p": 0o666}, f"round {round_}"
        [worker] = fs.d.children()
        assert umask_of(worker) == 0
        for i in (0, 1):  # what QEMU does around a VM pause: a new worker
            fs.fe.restart_queue(i)
        assert fs.d.children() != [worker]
    assert umask_of(fs.d.proc.pid) == 0o022
    assert stat.S_IMODE(os.stat(fs.d.sock).st_mode) == 0o755, "the socket keeps the umask"


def test_files_are_created_as_the_caller(fs: Session) -> None:
    c = fs.c
    os.chmod(fs.host, 0o777)
    c.uid, c.gid = 1234, 5678
    c.mkdir(fs.dir, b"d")
    ent, fh = c.create(fs.dir, b"f")
    c.release(ent.nodeid, fh)
    c.mknod(fs.dir, b"p", stat.S_IFIFO | 0o600)
    c.symlink(fs.dir, b"l", b"f")
    for name in ("d", "f", "p", "l"):
        st = os.lstat(fs.host / name)
        assert (st.st_uid, st.st_gid) == (1234, 5678), name
    # the caller's own rights count: 1234 may not write into a directory of root's
    os.mkdir(fs.host / "roots", 0o755)
    roots = c.lookup(fs.dir, b"roots").nodeid
    assert fails(c.create, roots, b"f") == errno.EACCES
    assert fails(c.mkdir, roots, b"d") == errno.EACCES
    assert os.listdir(fs.host / "roots") == []
    # and the server is root again afterwards, on every thread
    c.uid = c.gid = 0
    for i in range(16):
        ent, fh = c.create(roots, b"r%d" % i)
        c.release(ent.nodeid, fh)
        st = os.stat(fs.host / "roots" / f"r{i}")
        assert (st.st_uid, st.st_gid) == (0, 0)


def test_rename(fs: Session) -> None:
    c = fs.c
    (fs.host / "a").write_bytes(b"A")
    (fs.host / "b").write_bytes(b"B")
    (fs.host / "sub").mkdir()
    sub = c.lookup(fs.dir, b"sub").nodeid
    a = c.lookup(fs.dir, b"a").nodeid
    c.rename(fs.dir, b"a", fs.dir, b"a2")
    assert (fs.host / "a2").read_bytes() == b"A" and not (fs.host / "a").exists()
    assert c.lookup(fs.dir, b"a2").nodeid == a, "the node follows its file"
    c.rename(fs.dir, b"a2", sub, b"moved")
    assert (fs.host / "sub" / "moved").read_bytes() == b"A"
    c.rename(sub, b"moved", fs.dir, b"b")  # replaces b
    assert (fs.host / "b").read_bytes() == b"A"
    assert sorted(os.listdir(fs.host)) == ["b", "sub"]
    assert fails(c.rename, fs.dir, b"nothing", fs.dir, b"x") == errno.ENOENT
    assert fails(c.rename, fs.dir, b"sub", sub, b"inside") == errno.EINVAL


def test_rename2_noreplace_and_exchange(fs: Session) -> None:
    c = fs.c
    (fs.host / "a").write_bytes(b"A")
    (fs.host / "b").write_bytes(b"B")
    (fs.host / "d").mkdir()
    assert fails(c.rename, fs.dir, b"a", fs.dir, b"b", RENAME_NOREPLACE) == errno.EEXIST
    assert ((fs.host / "a").read_bytes(), (fs.host / "b").read_bytes()) == (b"A", b"B")
    c.rename(fs.dir, b"a", fs.dir, b"c", RENAME_NOREPLACE)
    assert (fs.host / "c").read_bytes() == b"A" and not (fs.host / "a").exists()
    c.rename(fs.dir, b"c", fs.dir, b"b", RENAME_EXCHANGE)
    assert ((fs.host / "b").read_bytes(), (fs.host / "c").read_bytes()) == (b"A", b"B")
    c.rename(fs.dir, b"c", fs.dir, b"d", RENAME_EXCHANGE)  # a file and a directory
    assert (fs.host / "d").read_bytes() == b"B" and (fs.host / "c").is_dir()
    assert fails(c.rename, fs.dir, b"b", fs.dir, b"nothing", RENAME_EXCHANGE) == errno.ENOENT
    assert fails(c.rename, fs.dir, b"b", fs.dir, b"x",
                 RENAME_NOREPLACE | RENAME_EXCHANGE) == errno.EINVAL
    assert fails(c.rename, fs.dir, b"b", fs.dir, b"x", 8) == errno.EINVAL
    assert sorted(os.listdir(fs.host)) == ["b", "c", "d"]


def test_link(fs: Session) -> None:
    c = fs.c
    (fs.host / "f").write_bytes(b"data")
    f = c.lookup(fs.dir, b"f").nodeid
    (fs.host / "sub").mkdir()
    sub = c.lookup(fs.dir, b"sub").nodeid
    e = c.link(f, sub, b"hard")
    assert e.nodeid == f == c.lookup(sub, b"hard").nodeid, "two names, one node"
    assert e.attr.nlink == 2 and os.stat(fs.host / "f").st_nlink == 2
    assert os.stat(fs.host / "sub" / "hard").st_ino == os.stat(fs.host / "f").st_ino
    assert_attr(e.attr, os.stat(fs.host / "f"))
    assert fails(c.link, f, sub, b"hard") == errno.EEXIST
    assert fails(c.link, sub, fs.dir, b"dirlink") == errno.EPERM
    assert fails(c.link, ROOT, fs.dir, b"rootlink") == errno.EPERM
    # a hard link to a symlink is a link to the symlink itself, never to its target
    os.symlink(fs.s.outside / "secret", fs.host / "esc")
    esc = c.lookup(fs.dir, b"esc").nodeid
    e = c.link(esc, fs.dir, b"esc2")
    assert e.nodeid == esc and stat.S_ISLNK(e.attr.mode)
    assert os.lstat(fs.host / "esc2").st_ino == os.lstat(fs.host / "esc").st_ino
    assert os.stat(fs.s.outside / "secret").st_nlink == 1
    assert sorted(os.listdir(fs.host)) == ["esc", "esc2", "f", "sub"]


# -- files ----------------------------------------------------------------------------------


def test_open_read_write(fs: Session) -> None:
    c = fs.c
    data = os.urandom(MiB)
    ent, fh = c.create(fs.dir, b"big", 0o600)
    assert stat.S_ISREG(ent.attr.mode) and ent.attr.size == 0
    assert c.write(ent.nodeid, fh, 0, data) == MiB
    assert (fs.host / "big").read_bytes() == data
    assert c.read(ent.nodeid, fh, 0, MiB) == data
    assert c.read(ent.nodeid, fh, 12345, 100) == data[12345:12445]
    assert c.read(ent.nodeid, fh, MiB - 10, 100) == data[-10:], "a short read at the end"
    assert c.read(ent.nodeid, fh, MiB, 100) == b""
    assert c.read(ent.nodeid, fh, 5 * MiB, 100) == b""
    assert c.write(ent.nodeid, fh, 1000, b"hello") == 5
    assert c.write(ent.nodeid, fh, MiB + 10, b"tail") == 4  # leaves a hole
    expect = data[:1000] + b"hello" + data[1005:] + bytes(10) + b"tail"
    assert (fs.host / "big").read_bytes() == expect
    assert c.getattr(ent.nodeid).size == MiB + 14
    assert c.write(ent.nodeid, fh, 0, b"") == 0
    too_big = bytes(MiB + 1)
    assert fails(c.write, ent.nodeid, fh, 0, too_big) == errno.EINVAL
    c.flush(ent.nodeid, fh)
    c.release(ent.nodeid, fh)
    assert fails(c.read, ent.nodeid, fh, 0, 10) == errno.EBADF, "released"
    assert fails(c.release, ent.nodeid, fh) == errno.EBADF
    assert fails(c.flush, ent.nodeid, fh) == errno.EBADF
    rfh = c.open(ent.nodeid, os.O_RDONLY)
    assert fails(c.write, ent.nodeid, rfh, 0, b"x") == errno.EBADF
    wfh = c.open(ent.nodeid, os.O_WRONLY)
    assert fails(c.read, ent.nodeid, wfh, 0, 10) == errno.EBADF
    tfh = c.open(ent.nodeid, os.O_WRONLY | os.O_TRUNC)
    assert os.stat(fs.host / "big").st_size == 0
    for h in (rfh, wfh, tfh):
        c.release(ent.nodeid, h)
    assert fails(c.open, fs.dir, os.O_RDONLY) == errno.EISDIR


def test_open_with_o_nofollow_opens_a_regular_file(fs: Session) -> None:
    """open(2) with O_NOFOLLOW of a regular file reaches the server in OPEN's flags (the
    guest resolved the name): it must open, the server reopening its own fd."""
    c = fs.c
    (fs.host / "f").write_bytes(b"plain")
    node = c.lookup(fs.dir, b"f").nodeid
    fh = c.open(node, os.O_RDONLY | os.O_NOFOLLOW)
    assert c.read(node, fh, 0, 10) == b"plain"
    c.release(node, fh)


def test_create(fs: Session) -> None:
    c = fs.c
    ent, fh = c.create(fs.dir, b"f", 0o640)
    st = os.stat(fs.host / "f")
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert_attr(ent.attr, st)
    assert ent.nodeid == c.lookup(fs.dir, b"f").nodeid
    c.write(ent.nodeid, fh, 0, b"content")
    c.release(ent.nodeid, fh)
    assert fails(c.create, fs.dir, b"f") == errno.EEXIST
    assert (fs.host / "f").read_bytes() == b"content"
    # without O_EXCL an existing file is opened (and truncated only with O_TRUNC)
    ent2, fh2 = c.create(fs.dir, b"f", flags=os.O_RDWR | os.O_CREAT)
    assert ent2.nodeid == ent.nodeid
    assert c.read(ent2.nodeid, fh2, 0, 100) == b"content"
    _, fh3 = c.create(fs.dir, b"f", flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    assert (fs.host / "f").read_bytes() == b""
    for h in (fh2, fh3):
        c.release(ent.nodeid, h)
    (fs.host / "d").mkdir()
    assert fails(c.create, fs.dir, b"d", flags=os.O_RDWR | os.O_CREAT) == errno.EISDIR
    assert fails(c.create, 987654321, b"x") == errno.ESTALE
    assert sorted(os.listdir(fs.host)) == ["d", "f"]


def test_fsync_and_flush(fs: Session) -> None:
    c = fs.c
    ent, fh = c.create(fs.dir, b"f")
    c.write(ent.nodeid, fh, 0, b"x" * 100)
    c.fsync(ent.nodeid, fh)
    c.fsync(ent.nodeid, fh, datasync=True)
    c.flush(ent.nodeid, fh)
    assert (fs.host / "f").read_bytes() == b"x" * 100
    assert fails(c.fsync, ent.nodeid, fh + 1000) == errno.EBADF
    dfh = c.opendir(fs.dir)
    c.fsync(fs.dir, dfh, is_dir=True)
    c.fsync(fs.dir, dfh, datasync=True, is_dir=True)
    assert fails(c.fsync, fs.dir, dfh) == errno.EBADF, "a directory's handle for FSYNC"
    assert fails(c.fsync, ent.nodeid, fh, is_dir=True) == errno.EBADF
    c.release(fs.dir, dfh, is_dir=True)
    c.request(Op.SYNCFS, ROOT, abi.SYNCFS_IN.pack(0))
    c.release(ent.nodeid, fh)


def test_fallocate(fs: Session) -> None:
    c = fs.c
    ent, fh = c.create(fs.dir, b"f")
    c.fallocate(ent.nodeid, fh, 0, MiB)
    st = os.stat(fs.host / "f")
    assert st.st_size == MiB and st.st_blocks * 512 >= MiB
    c.fallocate(ent.nodeid, fh, 0, 4 * MiB, FALLOC_KEEP_SIZE)
    st = os.stat(fs.host / "f")
    assert st.st_size == MiB and st.st_blocks * 512 >= 4 * MiB
    c.write(ent.nodeid, fh, 0, b"\xff" * 8192)
    c.fallocate(ent.nodeid, fh, 0, 4096, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE)
    assert (fs.host / "f").read_bytes()[:8192] == bytes(4096) + b"\xff" * 4096
    assert fails(c.fallocate, ent.nodeid, fh, 0, 0) == errno.EINVAL
    assert fails(c.fallocate, ent.nodeid, fh, 0, 4096, FALLOC_PUNCH_HOLE) == errno.EOPNOTSUPP
    c.release(ent.nodeid, fh)


def test_lseek_data_and_hole_of_a_sparse_file(fs: Session) -> None:
    c = fs.c
    path = fs.host / "sparse"
    with open(path, "wb") as f:
        f.seek(MiB)
        f.write(b"\x01" * 4096)
    node = c.lookup(fs.dir, b"sparse").nodeid
    fh = c.open(node, os.O_RDONLY)
    size = MiB + 4096
    assert c.lseek(node, fh, 0, os.SEEK_DATA) == MiB
    assert c.lseek(node, fh, 0, os.SEEK_HOLE) == 0
    assert c.lseek(node, fh, MiB, os.SEEK_HOLE) == size
    assert c.lseek(node, fh, MiB + 100, os.SEEK_DATA) == MiB + 100
    assert c.lseek(node, fh, 0, os.SEEK_END) == size
    assert c.lseek(node, fh, 77, os.SEEK_SET) == 77
    assert fails(c.lseek, node, fh, size, os.SEEK_DATA) == errno.ENXIO
    assert fails(c.lseek, node, fh, 0, 5) == errno.EINVAL
    assert fails(c.lseek, node, fh + 1000, 0, os.SEEK_SET) == errno.EBADF
    c.release(node, fh)


def test_copy_file_range(fs: Session) -> None:
    c = fs.c
    data = os.urandom(10000)
    (fs.host / "src").write_bytes(data)
    src = c.lookup(fs.dir, b"src").nodeid
    sfh = c.open(src, os.O_RDONLY)
    dst, dfh = c.create(fs.dir, b"dst")
    assert c.copy_file_range(src, sfh, 1000, dst.nodeid, dfh, 500, 3000) == 3000
    assert (fs.host / "dst").read_bytes() == bytes(500) + data[1000:4000]
    assert c.copy_file_range(src, sfh, 9000, dst.nodeid, dfh, 0, 5000) == 1000, "to EOF"
    assert (fs.host / "dst").read_bytes()[:1000] == data[9000:]
    assert c.copy_file_range(src, sfh, 20000, dst.nodeid, dfh, 0, 10) == 0
    flagged = abi.COPY_FILE_RANGE_IN.pack(sfh, 0, dst.nodeid, dfh, 0, 10, 1)
    assert fails(c.request, Op.COPY_FILE_RANGE, src, flagged) == errno.EINVAL
    assert fails(c.copy_file_range, src, sfh, 0, dst.nodeid, dfh + 1000, 0, 10) == errno.EBADF
    assert fails(c.copy_file_range, dst.nodeid, dfh, 0, src, sfh, 0, 10) == errno.EBADF, (
        "the destination is open read-only")
    assert (fs.host / "src").read_bytes() == data
    c.release(src, sfh)
    c.release(dst.nodeid, dfh)


def test_statfs_matches_statvfs(fs: Session) -> None:
    (fs.host / "f").touch()
    for node in (ROOT, fs.dir, fs.c.lookup(fs.dir, b"f").nodeid):
        for _ in range(50):  # the host's free counts may move meanwhile: until they hold
            before = os.statvfs(fs.s.share)
            got = fs.c.statfs(node)
            after = os.statvfs(fs.s.share)
            if after == before:
                break
        fixed = (after.f_blocks, after.f_files, after.f_bsize, after.f_namemax,
                 after.f_frsize, 0)
        assert (got[0], got[3], *got[5:]) == fixed
        free = [(s.f_bfree, s.f_bavail, s.f_ffree) for s in (before, after)]
        if free[0] == free[1]:
            assert (got[1], got[2], got[4]) == free[0]
        else:  # something else kept writing: a value from between the two looks
            for k, i in enumerate((1, 2, 4)):
                lo, hi = sorted((free[0][k], free[1][k]))
                assert lo <= got[i] <= hi, (i, got, free)


def test_access(fs: Session) -> None:
    c = fs.c
    path = fs.host / "f"
    path.touch()
    os.chown(path, 1000, 2000)
    os.chmod(path, 0o640)
    node = c.lookup(fs.dir, b"f").nodeid
    R, W, X = os.R_OK, os.W_OK, os.X_OK

    def access(uid: int, gid: int, mask: int) -> int:
        c.uid, c.gid = uid, gid
        try:
            c.access(node, mask)
        except FuseError as e:
            return e.errno or -1
        finally:
            c.uid = c.gid = 0
        return 0

    assert access(1000, 1, R | W) == 0, "the owner"
    assert access(1000, 1, X) == errno.EACCES
    assert access(3000, 2000, R) == 0, "the group"
    assert access(3000, 2000, W) == errno.EACCES
    assert access(3000, 3000, R) == errno.EACCES, "others"
    assert access(3000, 3000, os.F_OK) == 0
    assert access(0, 0, R | W) == 0, "root reads and writes anything"
    assert access(0, 0, X) == errno.EACCES, "root executes only what something may"
    os.chmod(path, 0o641)
    assert access(0, 0, X) == 0
    assert access(3000, 3000, X) == 0
    c.access(fs.dir, X)  # root searches any directory
    assert fails(c.access, 987654321, R) == errno.ESTALE


# -- directories ----------------------------------------------------------------------------


def test_readdir_lists_3000_files_over_many_calls(fs: Session) -> None:
    c = fs.c
    big = fs.host / "big"
    big.mkdir()
    for i in range(3000):
        (big / f"file-{i:04d}{'x' * (i % 37)}").touch()
    (big / "subdir").mkdir()
    node = c.lookup(fs.dir, b"big").nodeid
    entries, calls = readdir_all(c, node, 4096)
    assert calls > 10
    names = [e.name for e in entries]
    assert len(names) == len(set(names)) == 3003
    assert sorted(n for n in names if n not in (b".", b"..")) == sorted(os.listdir(os.fsencode(
        big)))
    host_ino = {os.fsencode(n): os.lstat(big / n).st_ino for n in os.listdir(big)}
    for e in entries:
        if e.name in (b".", b".."):
            assert e.type == 4  # DT_DIR
            continue
        assert e.ino == host_ino[e.name]
        assert e.type == (4 if e.name == b"subdir" else 8)  # DT_DIR, DT_REG
    # the offsets resume anywhere: from the 1000th entry on, the rest
    fh = c.opendir(node)
    rest = parse_dirents(c.request(Op.READDIR, node, abi.READ_IN.pack(
        fh, entries[999].off, 65536, 0, 0, 0, 0), reply=abi.OUT_HEADER.size + 65536), False)
    assert [e.name for e in rest] == names[1000 : 1000 + len(rest)]
    assert len(rest) > 100
    assert c.readdir(node, fh, 0, size=10) == [], "no room for a single entry"
    c.release(node, fh, is_dir=True)
    assert fails(c.readdir, node, fh) == errno.EBADF, "released"


def test_readdirplus_gives_each_entry_s_node_and_attributes(fs: Session) -> None:
    c = fs.c
    for i in range(300):
        (fs.host / f"f{i}").write_bytes(b"x" * i)
    os.symlink("/etc", fs.host / "link")
    (fs.host / "sub").mkdir()
    entries, calls = readdir_all(c, fs.dir, 4096, plus=True)
    assert calls > 5
    names = sorted(e.name for e in entries)
    assert names == sorted([b".", b"..", *os.listdir(os.fsencode(fs.host))])
    for e in entries:
        assert e.entry is not None
        if e.name in (b".", b".."):
            assert e.entry.nodeid == 0, "no lookup for these"
            continue
        st = os.lstat(fs.host / os.fsdecode(e.name))
        assert_attr(e.entry.attr, st)
        assert e.ino == st.st_ino
        assert c.lookup(fs.dir, e.name).nodeid == e.entry.nodeid
    assert fails(c.readdir, fs.dir, 12345, plus=True) == errno.EBADF


def test_opendir_of_a_file_and_readdir_of_a_file_handle(fs: Session) -> None:
    c = fs.c
    (fs.host / "f").touch()
    node = c.lookup(fs.dir, b"f").nodeid
    assert fails(c.opendir, node) == errno.ENOTDIR
    fh = c.open(node, os.O_RDONLY)
    assert fails(c.readdir, node, fh) == errno.EBADF
    assert fails(c.release, node, fh, is_dir=True) == errno.EBADF
    dfh = c.opendir(fs.dir)
    assert fails(c.read, fs.dir, dfh, 0, 10) == errno.EBADF
    assert fails(c.release, fs.dir, dfh) == errno.EBADF
    c.release(fs.dir, dfh, is_dir=True)
    c.release(node, fh)


def worker_fds(d: Daemon) -> int:
    [pid] = d.children()
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_no_fd_is_left_behind(fs: Session) -> None:
    """Every node holds one fd and every open file one more, until forgotten or released;
    failed requests hold nothing; DESTROY closes everything."""
    c = fs.c
    (fs.host / "f").write_bytes(b"x")
    os.mkfifo(fs.host / "p")
    os.symlink("f", fs.host / "l")
    (fs.host / "d").mkdir()
    for i in range(20):
        (fs.host / "d" / f"e{i}").touch()
    base = worker_fds(fs.d)
    f, p, sl, d = (c.lookup(fs.dir, n).nodeid for n in (b"f", b"p", b"l", b"d"))
    assert worker_fds(fs.d) == base + 4
    failing: list[Callable[[], object]] = [
        lambda: c.lookup(fs.dir, b"none"),
        lambda: c.lookup(f, b"x"),
        lambda: c.open(p, os.O_RDONLY),
        lambda: c.open(sl, os.O_RDONLY),
        lambda: c.open(d, os.O_RDONLY),
        lambda: c.opendir(f),
        lambda: c.create(fs.dir, b"f"),
        lambda: c.create(fs.dir, b"p", flags=os.O_RDWR | os.O_CREAT),
        lambda: c.create(fs.dir, b"l", flags=os.O_RDWR | os.O_CREAT),
        lambda: c.create(fs.dir, b"d", flags=os.O_RDWR | os.O_CREAT),
        lambda: c.mkdir(fs.dir, b"d"),
        lambda: c.mknod(fs.dir, b"p", stat.S_IFIFO | 0o600),
        lambda: c.symlink(fs.dir, b"l", b"x"),
        lambda: c.link(d, fs.dir, b"x"),
        lambda: c.link(f, fs.dir, b"l"),
        lambda: c.setattr(p, size=0),
        lambda: c.setattr(d, size=0),
        lambda: c.getxattr(f, b"user.none"),
        lambda: c.getxattr(p, b"user.none"),
        lambda: c.readlink(f),
        lambda: c.rename(fs.dir, b"none", fs.dir, b"x"),
        lambda: c.read(f, 12345, 0, 1),
    ]
    for fn in failing:
        assert fails(fn) > 0
    assert worker_fds(fs.d) == base + 4
    fh = c.open(f, os.O_RDWR)
    dh = c.opendir(d)
    new, nfh = c.create(fs.dir, b"new")
    again, afh = c.create(fs.dir, b"f", flags=os.O_RDWR | os.O_CREAT)  # exists: opened
    assert again.nodeid == f
    assert worker_fds(fs.d) == base + 4 + 2 + 2 + 1
    plus = [e for e in c.listdir(d, plus=True) if e.entry is not None and e.entry.nodeid]
    assert len(plus) == 20
    assert worker_fds(fs.d) == base + 4 + 2 + 2 + 1 + 20
    c.batch_forget([(e.entry.nodeid, 1) for e in plus if e.entry is not None])
    for node, h in ((f, fh), (f, afh), (new.nodeid, nfh)):
        c.release(node, h)
    c.release(d, dh, is_dir=True)
    c.batch_forget([(f, 2), (p, 1), (sl, 1), (d, 1), (new.nodeid, 1)])
    assert worker_fds(fs.d) == base
    # DESTROY closes whatever the driver left
    f, p, sl, d = (c.lookup(fs.dir, n).nodeid for n in (b"f", b"p", b"l", b"d"))
    c.open(f, os.O_RDONLY)
    c.opendir(ROOT)
    c.opendir(d)
    assert worker_fds(fs.d) == base + 4 + 3
    c.destroy()
    assert worker_fds(fs.d) == base - 1, "the test's directory was forgotten too"
    c.init()


# -- forgetting -----------------------------------------------------------------------------


def test_forget_and_batch_forget(fs: Session) -> None:
    c = fs.c
    for n in ("a", "b", "c"):
        (fs.host / n).write_bytes(n.encode())
    a = c.lookup(fs.dir, b"a").nodeid
    assert c.lookup(fs.dir, b"a").nodeid == a  # two lookups
    c.forget(a, 1)
    assert_attr(c.getattr(a), os.stat(fs.host / "a"))  # one lookup left
    c.forget(a, 1)
    assert fails(c.getattr, a) == errno.ESTALE
    a2 = c.lookup(fs.dir, b"a").nodeid
    assert a2 != a, "a forgotten node id is never reused"
    b = c.lookup(fs.dir, b"b").nodeid
    cc = c.lookup(fs.dir, b"c").nodeid
    fh = c.open(cc, os.O_RDONLY)
    c.batch_forget([(a2, 1), (b, 5), (cc, 1)])
    for n in (a2, b, cc):
        assert fails(c.getattr, n) == errno.ESTALE
    assert c.read(cc, fh, 0, 10) == b"c", "an open file outlives its node"
    c.release(cc, fh)
    c.forget(ROOT, 1 << 40)  # the root is never forgotten
    c.batch_forget([(ROOT, 1 << 40)])
    assert_attr(c.getattr(ROOT), os.stat(fs.s.share))
    assert c.lookup(fs.dir, b"b").nodeid not in (a, a2, b, cc)


# -- extended attributes ----------------------------------------------------------------------


def test_xattrs(fs: Session) -> None:
    c = fs.c
    path = fs.host / "f"
    path.touch()
    node = c.lookup(fs.dir, b"f").nodeid
    assert c.listxattr(node) == []
    c.setxattr(node, b"user.one", b"first value")
    c.setxattr(node, b"user.two", b"")
    assert os.getxattr(path, "user.one") == b"first value"
    assert os.getxattr(path, "user.two") == b""
    assert c.getxattr(node, b"user.one") == b"first value"
    assert c.getxattr(node, b"user.one", size=0) == struct.pack("<I", 11), "size query"
    assert c.getxattr(node, b"user.one", size=11) == b"first value"
    assert fails(c.getxattr, node, b"user.one", size=10) == errno.ERANGE
    assert fails(c.getxattr, node, b"user.none") == errno.ENODATA
    assert sorted(c.listxattr(node)) == [b"user.one", b"user.two"]
    size_query = c.request(Op.LISTXATTR, node, abi.GETXATTR_IN.pack(0, 0))
    assert size_query == abi.GETXATTR_OUT.pack(len(b"user.one\0user.two\0"), 0)
    assert fails(c.listxattr, node, size=17) == errno.ERANGE
    assert fails(c.setxattr, node, b"user.one", b"x", XATTR_CREATE) == errno.EEXIST
    assert fails(c.setxattr, node, b"user.new", b"x", XATTR_REPLACE) == errno.ENODATA
    c.setxattr(node, b"user.one", b"replaced", XATTR_REPLACE)
    assert os.getxattr(path, "user.one") == b"replaced"
    c.removexattr(node, b"user.one")
    assert os.listxattr(path) == ["user.two"]
    assert fails(c.removexattr, node, b"user.one") == errno.ENODATA
    # names are bytes, UTF-8 or not
    c.setxattr(node, b"user.\xff\xfe", b"not utf-8")
    assert os.getxattr(path, b"user.\xff\xfe") == b"not utf-8"
    assert sorted(c.listxattr(node)) == [b"user.two", b"user.\xff\xfe"]
    assert c.getxattr(node, b"user.\xff\xfe") == b"not utf-8"
    # a value bigger than a page, and a directory's attributes
    c.setxattr(fs.dir, b"user.big", b"v" * 3000)
    assert os.getxattr(fs.host, "user.big") == b"v" * 3000
    assert c.getxattr(fs.dir, b"user.big") == b"v" * 3000
    os.setxattr(path, "user.host", b"set on the host")
    assert c.getxattr(node, b"user.host") == b"set on the host"
    # never on a symlink (the server would have to reopen it, following it): it reads as
    # having none (what cp -a and rsync -X cope with) and takes none; its target is
    # untouched, although it has an attribute of its own
    os.setxattr(fs.s.outside / "secret", "user.outside", b"not yours")
    os.symlink(fs.s.outside / "secret", fs.host / "l")
    link = c.lookup(fs.dir, b"l").nodeid
    assert fails(c.setxattr, link, b"user.x", b"y") == errno.EPERM
    assert fails(c.getxattr, link, b"user.outside") == errno.ENODATA
    assert c.listxattr(link) == []
    assert fails(c.removexattr, link, b"user.outside") == errno.EPERM
    assert os.listxattr(fs.s.outside / "secret") == ["user.outside"]


def test_xattrs_are_enosys_without_the_option(fs_plain: Session) -> None:
    c = fs_plain.c
    path = fs_plain.host / "f"
    path.touch()
    os.setxattr(path, "user.host", b"v")
    node = c.lookup(fs_plain.dir, b"f").nodeid
    assert fails(c.setxattr, node, b"user.x", b"y") == errno.ENOSYS
    assert fails(c.getxattr, node, b"user.host") == errno.ENOSYS
    assert fails(c.listxattr, node) == errno.ENOSYS
    assert fails(c.removexattr, node, b"user.host") == errno.ENOSYS
    assert os.listxattr(path) == ["user.host"]


# -- confinement against a hostile driver ---------------------------------------------------


@pytest.mark.parametrize("name", [b"../outside", b"a/b", b"/etc", b"../../..", b"x/", b"",
                                  b"/"])
def test_names_with_a_slash_are_refused(fs: Session, name: bytes) -> None:
    c = fs.c
    (fs.host / "a").mkdir()
    (fs.host / "f").touch()
    f = c.lookup(fs.dir, b"f").nodeid
    assert fails(c.lookup, fs.dir, name) == errno.EINVAL
    assert fails(c.lookup, ROOT, name) == errno.EINVAL
    assert fails(c.mkdir, fs.dir, name) == errno.EINVAL
    assert fails(c.create, fs.dir, name) == errno.EINVAL
    assert fails(c.mknod, fs.dir, name, stat.S_IFIFO | 0o600) == errno.EINVAL
    assert fails(c.symlink, fs.dir, name, b"target") == errno.EINVAL
    assert fails(c.link, f, fs.dir, name) == errno.EINVAL
    assert fails(c.rename, fs.dir, b"f", fs.dir, name) == errno.EINVAL
    assert fails(c.rename, fs.dir, name, fs.dir, b"g") == errno.EINVAL
    assert fails(c.unlink, fs.dir, name) == errno.EINVAL
    assert fails(c.rmdir, fs.dir, name) == errno.EINVAL
    assert sorted(os.listdir(fs.host)) == ["a", "f"]
    assert sorted(os.listdir(fs.s.outside)) == ["secret"]


def test_dot_names_cannot_be_created_or_removed(fs: Session) -> None:
    c = fs.c
    (fs.host / "f").touch()
    f = c.lookup(fs.dir, b"f").nodeid
    for name in (b".", b".."):
        assert fails(c.mkdir, fs.dir, name) == errno.EEXIST
        assert fails(c.create, fs.dir, name) == errno.EEXIST
        assert fails(c.symlink, fs.dir, name, b"t") == errno.EEXIST
        assert fails(c.link, f, fs.dir, name) == errno.EEXIST
        assert fails(c.rename, fs.dir, b"f", ROOT, name) == errno.EEXIST
        assert fails(c.rmdir, fs.dir, name) == errno.EEXIST
        assert fails(c.unlink, ROOT, name) == errno.EEXIST
    assert os.listdir(fs.host) == ["f"]


def test_a_symlink_out_of_the_share_is_never_followed(fs: Session) -> None:
    """Symlinks the driver made and symlinks the host planted alike: the server treats
    them as what they are, never as what they point at."""
    c = fs.c
    outside, before = fs.s.outside, host_state(fs.s.outside / "secret")
    made = c.symlink(fs.dir, b"etc", b"/etc")
    assert stat.S_ISLNK(made.attr.mode)
    os.symlink(outside, fs.host / "planted_dir")
    os.symlink(outside / "secret", fs.host / "planted_file")
    (fs.host / "sym_src").write_bytes(b"mine")
    for name in (b"etc", b"planted_dir", b"planted_file"):
        e = c.lookup(fs.dir, name)
        assert stat.S_ISLNK(e.attr.mode)
        assert_attr(e.attr, os.lstat(fs.host / os.fsdecode(name)))
        node = e.nodeid
        # nothing through it, nothing of what it points at
        assert fails(c.lookup, node, b"secret") == errno.ENOTDIR
        assert fails(c.lookup, node, b"passwd") == errno.ENOTDIR
        assert fails(c.lookup, node, b"..") == errno.ENOTDIR
        assert fails(c.open, node, os.O_RDONLY) == errno.ELOOP
        assert fails(c.open, node, os.O_RDWR | os.O_TRUNC) == errno.ELOOP
        assert fails(c.opendir, node) == errno.ENOTDIR
        assert fails(c.create, node, b"new") == errno.ENOTDIR
        assert fails(c.mkdir, node, b"new") == errno.ENOTDIR
        assert fails(c.mknod, node, b"new", stat.S_IFIFO | 0o600) == errno.ENOTDIR
        assert fails(c.symlink, node, b"new", b"x") == errno.ENOTDIR
        assert fails(c.unlink, node, b"secret") == errno.ENOTDIR
        assert fails(c.rename, fs.dir, b"sym_src", node, b"secret") == errno.ENOTDIR
        assert fails(c.rename, node, b"secret", fs.dir, b"stolen") == errno.ENOTDIR
        assert fails(c.link, c.lookup(fs.dir, b"sym_src").nodeid, node, b"h") == errno.ENOTDIR
        assert fails(c.setattr, node, size=0) == errno.ELOOP
        assert fails(c.setattr, node, mode=0o120777) == errno.EOPNOTSUPP
        c.setattr(node, uid=4242)  # the symlink's owner, never the target's
        assert os.lstat(fs.host / os.fsdecode(name)).st_uid == 4242
    # creating over a symlink's name follows nothing either
    for flags in (os.O_RDWR | os.O_CREAT | os.O_TRUNC, os.O_WRONLY | os.O_CREAT):
        assert fails(c.create, fs.dir, b"planted_file", flags=flags) == errno.ELOOP
    d = c.lookup(fs.dir, b"planted_dir").nodeid
    assert c.readlink(d) == os.fsencode(outside)
    assert sorted(os.listdir(outside)) == ["secret"]
    assert host_state(outside / "secret") == before


def test_a_symlinked_share_component_planted_in_a_subdirectory(fs: Session) -> None:
    """A directory the driver knows is swapped for a symlink on the host: the node keeps
    the directory it had (its fd), new lookups see a symlink."""
    c = fs.c
    (fs.host / "d").mkdir()
    (fs.host / "d" / "inner").write_bytes(b"inner")
    d = c.lookup(fs.dir, b"d").nodeid
    os.rename(fs.host / "d", fs.host / "d.old")
    os.symlink(fs.s.outside, fs.host / "d")
    assert c.lookup(d, b"inner").attr.size == 5, "the node is the directory it was"
    assert fails(c.lookup, d, b"secret") == errno.ENOENT
    fresh = c.lookup(fs.dir, b"d")
    assert stat.S_ISLNK(fresh.attr.mode)
    assert fails(c.lookup, fresh.nodeid, b"secret") == errno.ENOTDIR


def test_fifos_and_device_nodes_are_never_opened(fs: Session) -> None:
    """A FIFO would block the server; a device node the driver made (with any numbers it
    likes: /dev/zero's here) or the host planted would reach the host's devices. Neither
    OPEN nor CREATE of an existing name ever opens one."""
    c = fs.c
    fifo = c.mknod(fs.dir, b"fifo", stat.S_IFIFO | 0o666).nodeid
    zero = c.mknod(fs.dir, b"zero", stat.S_IFCHR | 0o666, dev_encode(os.makedev(1, 5))).nodeid
    os.mknod(fs.host / "planted_zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    planted = c.lookup(fs.dir, b"planted_zero").nodeid
    for node in (fifo, zero, planted):
        for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_NONBLOCK):
            assert fails(c.open, node, flags) == errno.ENXIO
        assert fails(c.opendir, node) == errno.ENOTDIR
        assert fails(c.setattr, node, size=0) == errno.ENXIO
    # nor by creating over their names without O_EXCL
    for name in (b"fifo", b"zero", b"planted_zero"):
        for flags in (os.O_RDWR | os.O_CREAT, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK,
                      os.O_RDONLY | os.O_CREAT):  # (opened, the FIFO would block us)
            assert fails(c.create, fs.dir, name, flags=flags) == errno.ENXIO, name
        assert fails(c.create, fs.dir, name) == errno.EEXIST
    # LINK makes another name for the node, still not openable
    e = c.link(zero, fs.dir, b"zero2")
    assert e.nodeid == zero and fails(c.open, e.nodeid, os.O_RDONLY) == errno.ENXIO
    assert os.stat(fs.host / "zero").st_size == 0
    c.setattr(fifo, mode=0o10600)  # changing its attributes opens nothing either
    assert_attr(c.getattr(fifo), os.stat(fs.host / "fifo"))


def test_a_file_outside_the_share_keeps_its_content(fs: Session) -> None:
    c = fs.c
    secret = fs.s.outside / "secret"
    before = host_state(secret)
    ino = os.stat(secret).st_ino
    assert fails(c.lookup, fs.dir, b"../../outside/secret") == errno.EINVAL
    assert fails(c.lookup, c.lookup(ROOT, b"..").nodeid, b"outside") == errno.ENOENT
    assert fails(c.create, ROOT, b"../outside/secret",
                 flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC) == errno.EINVAL
    assert fails(c.getattr, ino) == errno.ESTALE, "host inode numbers are not node ids"
    assert fails(c.open, ino, os.O_RDWR | os.O_TRUNC) == errno.ESTALE
    assert fails(c.symlink, ROOT, b"../outside/secret", b"x") == errno.EINVAL
    assert fails(c.rename, fs.dir, b"x", ROOT, b"../outside/secret") == errno.EINVAL
    esc = c.symlink(fs.dir, b"esc", os.fsencode(secret)).nodeid
    assert fails(c.open, esc, os.O_WRONLY | os.O_TRUNC) == errno.ELOOP
    assert fails(c.setattr, esc, size=0) == errno.ELOOP
    assert fails(c.setattr, esc, mode=0o120777) == errno.EOPNOTSUPP
    assert host_state(secret) == before
    assert sorted(os.listdir(fs.s.outside)) == ["secret"]


# -- read-only --------------------------------------------------------------------------------


@pytest.fixture
def fs_ro(ro: Served, request: pytest.FixtureRequest) -> Iterator[Session]:
    yield from session(ro, request)


def test_readonly_refuses_every_change(fs_ro: Session) -> None:
    c, host = fs_ro.c, fs_ro.host
    (host / "f").write_bytes(b"content")
    os.setxattr(host / "f", "user.a", b"1")
    (host / "d").mkdir()
    os.symlink("f", host / "l")
    before = host_state(host / "f"), os.stat(host / "d").st_mtime_ns
    f = c.lookup(fs_ro.dir, b"f").nodeid
    fh = c.open(f, os.O_RDONLY)
    assert c.read(f, fh, 0, 100) == b"content"
    attempts: dict[str, Callable[[], object]] = {
        "setattr mode": lambda: c.setattr(f, mode=0o100777),
        "setattr size": lambda: c.setattr(f, size=0),
        "setattr times": lambda: c.setattr(f, mtime=(1, 0)),
        "setattr owner": lambda: c.setattr(f, uid=1),
        "symlink": lambda: c.symlink(fs_ro.dir, b"new", b"t"),
        "mknod": lambda: c.mknod(fs_ro.dir, b"new", stat.S_IFIFO | 0o600),
        "mkdir": lambda: c.mkdir(fs_ro.dir, b"new"),
        "unlink": lambda: c.unlink(fs_ro.dir, b"f"),
        "rmdir": lambda: c.rmdir(fs_ro.dir, b"d"),
        "rename": lambda: c.rename(fs_ro.dir, b"f", fs_ro.dir, b"g"),
        "rename2": lambda: c.rename(fs_ro.dir, b"f", fs_ro.dir, b"d", RENAME_EXCHANGE),
        "link": lambda: c.link(f, fs_ro.dir, b"hard"),
        "write": lambda: c.write(f, fh, 0, b"x"),
        "setxattr": lambda: c.setxattr(f, b"user.b", b"2"),
        "removexattr": lambda: c.removexattr(f, b"user.a"),
        "create": lambda: c.create(fs_ro.dir, b"new"),
        "create existing": lambda: c.create(fs_ro.dir, b"f", flags=os.O_RDONLY | os.O_CREAT),
        "fallocate": lambda: c.fallocate(f, fh, 0, 4096),
        "copy_file_range": lambda: c.copy_file_range(f, fh, 0, f, fh, 100, 5),
        "open O_WRONLY": lambda: c.open(f, os.O_WRONLY),
        "open O_RDWR": lambda: c.open(f, os.O_RDWR),
        "open O_TRUNC": lambda: c.open(f, os.O_RDONLY | os.O_TRUNC),
        "open O_APPEND": lambda: c.open(f, os.O_WRONLY | os.O_APPEND),
        "access W_OK": lambda: c.access(f, os.W_OK),
    }
    got = {name: fails(fn) for name, fn in attempts.items()}
    assert got == dict.fromkeys(attempts, errno.EROFS)
    # reading goes on as before
    c.access(f, os.R_OK)
    assert c.getxattr(f, b"user.a") == b"1"
    assert c.listxattr(f) == [b"user.a"]
    assert sorted(e.name for e in c.listdir(fs_ro.dir)) == [b".", b"..", b"d", b"f", b"l"]
    assert c.readlink(c.lookup(fs_ro.dir, b"l").nodeid) == b"f"
    c.flush(f, fh)
    c.fsync(f, fh)
    c.release(f, fh)
    assert (host_state(host / "f"), os.stat(host / "d").st_mtime_ns) == before
    assert sorted(os.listdir(host)) == ["d", "f", "l"]
    assert os.listxattr(host / "f") == ["user.a"]


# -- malformed requests -----------------------------------------------------------------------


STRUCTS = {Op.INIT: abi.INIT_IN, Op.GETATTR: abi.GETATTR_IN, Op.SETATTR: abi.SETATTR_IN,
           Op.MKNOD: abi.MKNOD_IN, Op.MKDIR: abi.MKDIR_IN, Op.RENAME: abi.RENAME_IN,
           Op.RENAME2: abi.RENAME2_IN, Op.LINK: abi.LINK_IN, Op.OPEN: abi.OPEN_IN,
           Op.CREATE: abi.CREATE_IN, Op.READ: abi.READ_IN, Op.WRITE: abi.WRITE_IN,
           Op.RELEASE: abi.RELEASE_IN, Op.RELEASEDIR: abi.RELEASE_IN, Op.FLUSH: abi.FLUSH_IN,
           Op.FSYNC: abi.FSYNC_IN, Op.FSYNCDIR: abi.FSYNC_IN, Op.FALLOCATE: abi.FALLOCATE_IN,
           Op.LSEEK: abi.LSEEK_IN, Op.COPY_FILE_RANGE: abi.COPY_FILE_RANGE_IN,
           Op.ACCESS: abi.ACCESS_IN, Op.READDIR: abi.READ_IN, Op.READDIRPLUS: abi.READ_IN,
           Op.SETXATTR: abi.SETXATTR_IN, Op.GETXATTR: abi.GETXATTR_IN,
           Op.LISTXATTR: abi.GETXATTR_IN}


def test_bodies_shorter_than_the_op_s_struct_are_einval(fs: Session) -> None:
    c = fs.c
    (fs.host / "f").write_bytes(b"keep")
    f = c.lookup(fs.dir, b"f").nodeid
    got = {}
    for op, s in STRUCTS.items():
        for n in (0, s.size - 1):
            got[op.name, n] = fails(c.request, op, f, b"\x01" * n)
    assert got == dict.fromkeys(got, errno.EINVAL)
    # the no-reply ones: nothing written, nothing forgotten
    assert no_reply(c, Op.FORGET, f, b"\x01" * 7) == 0
    assert no_reply(c, Op.BATCH_FORGET, 0, abi.BATCH_FORGET_IN.pack(1, 0)[:7]) == 0
    assert_attr(c.getattr(f), os.stat(fs.host / "f"))
    assert (fs.host / "f").read_bytes() == b"keep"


def test_names_without_their_nul_are_einval(fs: Session) -> None:
    c = fs.c
    (fs.host / "f").write_bytes(b"keep")
    f = c.lookup(fs.dir, b"f").nodeid
    bad = {
        Op.LOOKUP: b"f",
        Op.MKDIR: abi.MKDIR_IN.pack(0o755, 0) + b"d",
        Op.MKNOD: abi.MKNOD_IN.pack(stat.S_IFIFO | 0o600, 0, 0, 0) + b"p",
        Op.CREATE: abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o600, 0, 0) + b"c",
        Op.SYMLINK: b"s\0target",
        Op.UNLINK: b"f",
        Op.RMDIR: b"f",
        Op.RENAME: abi.RENAME_IN.pack(fs.dir) + b"f\0g",
        Op.RENAME2: abi.RENAME2_IN.pack(fs.dir, 0, 0) + b"f\0g",
        Op.LINK: abi.LINK_IN.pack(f) + b"h",
        Op.SETXATTR: abi.SETXATTR_IN.pack(1, 0) + b"user.x",
        Op.GETXATTR: abi.GETXATTR_IN.pack(100, 0) + b"user.x",
        Op.REMOVEXATTR: b"user.x",
    }
    got = {op.name: fails(c.request, op, fs.dir if op != Op.SETXATTR else f, body)
           for op, body in bad.items()}
    assert got == dict.fromkeys(got, errno.EINVAL)
    assert os.listdir(fs.host) == ["f"]
    assert os.listxattr(fs.host / "f") == []
    # a SETXATTR whose value is shorter than its size
    body = abi.SETXATTR_IN.pack(100, 0) + b"user.x\0short"
    assert fails(c.request, Op.SETXATTR, f, body) == errno.EINVAL
    assert os.listxattr(fs.host / "f") == []


def test_writes_with_missing_data_and_huge_offsets(fs: Session) -> None:
    c = fs.c
    ent, fh = c.create(fs.dir, b"f")
    c.write(ent.nodeid, fh, 0, b"0123456789")

    def write(offset: int, size: int, data: bytes) -> bytes:
        return c.request(Op.WRITE, ent.nodeid,
                         abi.WRITE_IN.pack(fh, offset, size, 0, 0, 0, 0), data)

    assert fails(write, 0, 100, b"x" * 10) == errno.EINVAL, "size beyond the data sent"
    assert fails(write, 0, 0xFFFFFFFF, b"x") == errno.EINVAL
    assert fails(write, 1 << 63, 1, b"x") == errno.EFBIG
    assert fails(write, (1 << 64) - 1, 1, b"x") == errno.EFBIG
    assert fails(write, (1 << 63) - 1, 2, b"xy") == errno.EFBIG
    assert write(3, 2, b"abcdef") == abi.WRITE_OUT.pack(2, 0), "only `size` bytes written"
    assert (fs.host / "f").read_bytes() == b"012ab56789"
    dfh = c.opendir(fs.dir)
    for off in (1 << 63, (1 << 64) - 1):
        assert fails(c.read, ent.nodeid, fh, off, 10) == errno.EINVAL
        assert fails(c.lseek, ent.nodeid, fh, off, os.SEEK_SET) == errno.EINVAL
        assert fails(c.setattr, ent.nodeid, size=off) == errno.EINVAL
        assert fails(c.copy_file_range, ent.nodeid, fh, off, ent.nodeid, fh, 0, 1) == (
            errno.EINVAL)
        assert fails(c.copy_file_range, ent.nodeid, fh, 0, ent.nodeid, fh, off, 1) == (
            errno.EINVAL)
        assert fails(c.fallocate, ent.nodeid, fh, off, 4096) == errno.EINVAL
        assert fails(c.fallocate, ent.nodeid, fh, 0, off) == errno.EINVAL
        assert fails(c.readdir, fs.dir, dfh, off) == errno.EINVAL
    assert fails(c.fallocate, ent.nodeid, fh, 0, 4096, 0xFFFFFFFF) == errno.EOPNOTSUPP
    assert (fs.host / "f").read_bytes() == b"012ab56789"
    assert_attr(c.getattr(ent.nodeid), os.stat(fs.host / "f"))


def test_reads_bigger_than_the_reply_buffer_are_cut_to_fit(fs: Session) -> None:
    c = fs.c
    data = os.urandom(8192)
    (fs.host / "f").write_bytes(data)
    node = c.lookup(fs.dir, b"f").nodeid
    fh = c.open(node, os.O_RDONLY)
    body = abi.READ_IN.pack(fh, 100, 0xFFFFFFFF, 0, 0, 0, 0)
    assert c.request(Op.READ, node, body, reply=abi.OUT_HEADER.size + 1000) == data[100:1100]
    assert c.request(Op.READ, node, body, reply=abi.OUT_HEADER.size) == b""
    # split reply buffers are filled in order
    unique = 0x7001
    req = in_header(Op.READ, node, 80, unique) + body
    out = raw(c, [req], [16, 3, 500, 1])
    assert error_of(out, unique) == 0 and out[16:] == data[100:604]
    # READDIRPLUS too: room for two of ".", ".." and "f" (184 bytes each), not three
    dfh = c.opendir(fs.dir)
    out = c.request(Op.READDIRPLUS, fs.dir, abi.READ_IN.pack(dfh, 0, 0xFFFFFFFF, 0, 0, 0, 0),
                    reply=abi.OUT_HEADER.size + 400)
    every = [e.name for e in c.readdir(fs.dir, dfh, size=4096)]
    assert sorted(every) == [b".", b"..", b"f"]
    assert [e.name for e in parse_dirents(out, True)] == every[:2]
    assert len(out) == 2 * (abi.ENTRY_OUT.size + abi.ATTR.size + abi.DIRENT.size + 8)
    c.release(fs.dir, dfh, is_dir=True)
    c.release(node, fh)


def test_reply_buffers_smaller_than_a_reply_header(fs: Session) -> None:
    c = fs.c
    (fs.host / "f").write_bytes(b"data")
    node = c.lookup(fs.dir, b"f").nodeid
    fh = c.open(node, os.O_RDONLY)
    requests = [
        in_header(Op.GETATTR, node, 56, 0x100) + abi.GETATTR_IN.pack(0, 0, 0),
        in_header(Op.READ, node, 80, 0x101) + abi.READ_IN.pack(fh, 0, 4, 0, 0, 0, 0),
        in_header(Op.LOOKUP, fs.dir, 42, 0x102) + b"f\0",
        in_header(Op.LOOKUP, fs.dir, 45, 0x103) + b"none\0",  # an error reply
        in_header(Op.STATFS, ROOT, 40, 0x104),
    ]
    for req in requests:
        for room in ([], [8], [15], [4, 4, 4]):
            assert raw(c, [req], room) == b""
    # a reply header fits, the reply does not: an error, no partial reply
    out = raw(c, [requests[0]], [16, 8])
    assert error_of(out, 0x100) == errno.EIO
    # the header split over buffers
    out = raw(c, [requests[0]], [5, 5, 6, 200])
    n, err, uniq = abi.OUT_HEADER.unpack_from(out)
    assert (n, err, uniq) == (16 + abi.ATTR_OUT.size + abi.ATTR.size, 0, 0x100)
    assert_attr(Attr.unpack(out[16 + abi.ATTR_OUT.size :]), os.stat(fs.host / "f"))
    c.release(node, fh)
    assert_attr(c.getattr(node), os.stat(fs.host / "f"))


def test_truncated_and_odd_chains(fs: Session) -> None:
    c = fs.c
    hdr = in_header(Op.GETATTR, fs.dir, 56, 0x200) + abi.GETATTR_IN.pack(0, 0, 0)
    assert raw(c, [hdr[:20]]) == b"", "no FUSE header: no reply"
    assert raw(c, [hdr[:20], hdr[20:39]]) == b""
    assert raw(c, [b""]) == b""
    assert raw(c, [], [4096]) == b"", "nothing readable"
    # the same request split anywhere is the same request
    out = raw(c, [hdr[:7], hdr[7:41], hdr[41:]])
    assert error_of(out, 0x200) == 0
    assert_attr(Attr.unpack(out[16 + abi.ATTR_OUT.size :]), os.stat(fs.host))
    # a header's length field is not trusted (the chain's is)
    out = raw(c, [in_header(Op.LOOKUP, ROOT, 1, 0x201) + os.fsencode(fs.host.name) + b"\0"])
    assert error_of(out, 0x201) == 0
    # extensions we never asked for are cut off; too long for the body: EINVAL
    out = raw(c, [in_header(Op.GETATTR, fs.dir, 64, 0x202, extlen=1)
                  + abi.GETATTR_IN.pack(0, 0, 0) + bytes(8)])
    assert error_of(out, 0x202) == 0
    out = raw(c, [in_header(Op.GETATTR, fs.dir, 56, 0x203, extlen=200)
                  + abi.GETATTR_IN.pack(0, 0, 0)])
    assert error_of(out, 0x203) == errno.EINVAL
    # a body over the largest any request but WRITE has
    out = raw(c, [in_header(Op.LOOKUP, fs.dir, 0, 0x204) + b"a" * 80000 + b"\0"])
    assert error_of(out, 0x204) == errno.EINVAL
    # garbage
    for i, op in enumerate((0, 0xFFFFFFFF, 0x80000000 | Op.GETATTR)):
        out = raw(c, [in_header(op, fs.dir, 40, 0x300 + i) + b"\x5a" * 64])
        assert error_of(out, 0x300 + i) == errno.ENOSYS
    out = raw(c, [b"\xa5" * 140])
    assert error_of(out, 0xA5A5A5A5A5A5A5A5) == errno.ENOSYS
    assert_attr(c.getattr(fs.dir), os.stat(fs.host))


def test_batch_forget_with_a_count_larger_than_its_body(fs: Session) -> None:
    c = fs.c
    for n in ("a", "b"):
        (fs.host / n).touch()
    a = c.lookup(fs.dir, b"a").nodeid
    b = c.lookup(fs.dir, b"b").nodeid
    body = abi.BATCH_FORGET_IN.pack(1000, 0) + abi.FORGET_ONE.pack(a, 1)
    assert no_reply(c, Op.BATCH_FORGET, 0, body) == 0
    assert fails(c.getattr, a) == errno.ESTALE
    body = abi.BATCH_FORGET_IN.pack(2, 0) + abi.FORGET_ONE.pack(b, 1) + b"\x01" * 9
    assert no_reply(c, Op.BATCH_FORGET, 0, body) == 0
    assert fails(c.getattr, b) == errno.ESTALE
    assert no_reply(c, Op.BATCH_FORGET, 0, abi.BATCH_FORGET_IN.pack(0xFFFFFFFF, 0)) == 0
    assert no_reply(c, Op.FORGET, 987654321, abi.FORGET_IN.pack(1)) == 0
    # FORGETs on the request queue are taken the same way, without a reply
    d = c.lookup(fs.dir, b"a").nodeid
    assert no_reply(c, Op.FORGET, d, abi.FORGET_IN.pack(1), queue=1) == 0
    assert fails(c.getattr, d) == errno.ESTALE
    assert_attr(c.getattr(fs.dir), os.stat(fs.host))


def test_many_requests_in_flight_complete(fs: Session) -> None:
    """Requests run on a pool of threads and complete out of order: every one is
    answered, each with its own unique."""
    c = fs.c
    for i in range(40):
        (fs.host / f"f{i}").write_bytes(b"%d" % i)
    reqs = [in_header(Op.LOOKUP, fs.dir, 0, 0x1000 + i) + b"f%d\0" % i for i in range(40)]
    outs = [post(c, [r], [256]) for r in reqs]
    done = c.fe.wait_used(1, 40)
    assert len(done) == 40
    for i, [addr] in enumerate(outs):
        out = bytes(c.fe.ram.at(addr, 256))
        n, err, uniq = abi.OUT_HEADER.unpack_from(out)
        assert (n, err, uniq) == (16 + abi.ENTRY_OUT.size + abi.ATTR.size, 0, 0x1000 + i)
        attr = Attr.unpack(out[16 + abi.ENTRY_OUT.size :])
        assert attr.ino == os.stat(fs.host / f"f{i}").st_ino


@pytest.mark.parametrize("cache, ttl, open_flags, dir_flags, init_flags", [
    ("auto", 1, 0, 0, WANT_FLAGS),
    ("never", 0, abi.FOPEN_DIRECT_IO, 0, WANT_FLAGS),
    ("always", 86400, abi.FOPEN_KEEP_CACHE, abi.FOPEN_CACHE_DIR,
     WANT_FLAGS | abi.CACHE_SYMLINKS),
], ids=["auto", "never", "always"])
def test_cache_modes_and_two_request_queues(tmp_path: Path, cache: str, ttl: int,
                                            open_flags: int, dir_flags: int,
                                            init_flags: int) -> None:
    s = start(tmp_path, "--sandbox", "none", "--cache", cache, "--request-queues", "2")
    (s.share / "f").write_bytes(b"abc")
    try:
        with Frontend(s.daemon.sock) as fe:
            fe.negotiate(FEATURES)
            assert fe.get_config(abi.CONFIG.size) == abi.CONFIG.pack(TAG.encode(), 2)
            fe.set_mem_table()
            for i in range(3):
                fe.setup_queue(i, RING)
            c = FsClient(fe, queue=2)
            assert c.init()[3] == init_flags
            out = c.request(Op.LOOKUP, ROOT, b"f\0")
            node, *valid = abi.ENTRY_OUT.unpack_from(out)
            assert valid == [0, ttl, ttl, 0, 0]  # generation, entry and attr timeouts
            assert abi.ATTR_OUT.unpack_from(c.request(
                Op.GETATTR, node, abi.GETATTR_IN.pack(0, 0, 0)))[:2] == (ttl, 0)
            fh, flags, _ = abi.OPEN_OUT.unpack(c.request(Op.OPEN, node,
                                                         abi.OPEN_IN.pack(os.O_RDONLY, 0)))
            assert flags == open_flags
            _, flags, _ = abi.OPEN_OUT.unpack(c.request(Op.OPENDIR, ROOT, abi.OPEN_IN.pack(0, 0)))
            assert flags == dir_flags
            other = FsClient(fe, queue=1)  # the other request queue: the same session
            assert other.read(node, fh, 0, 10) == b"abc"
            assert c.read(node, fh, 1, 10) == b"bc"
    finally:
        stop(s)


# -- sandboxes --------------------------------------------------------------------------------


def mount_points(pid: int) -> list[str]:
    with open(f"/proc/{pid}/mountinfo") as f:
        return [line.split()[4] for line in f]


@pytest.mark.parametrize("kind", ["namespace", "chroot"])
def test_sandbox_confines_the_process_to_the_share(tmp_path: Path, kind: str) -> None:
    s = start(tmp_path, "--sandbox", kind)
    (s.share / "seed").write_bytes(b"planted by the host")
    try:
        fe, c = connect(s.daemon)
        try:
            seed = c.lookup(ROOT, b"seed")
            fh = c.open(seed.nodeid, os.O_RDONLY)
            assert c.read(seed.nodeid, fh, 0, 100) == b"planted by the host"
            ent, wfh = c.create(ROOT, b"new")
            c.write(ent.nodeid, wfh, 0, b"from the guest")
            c.release(ent.nodeid, wfh)
            assert (s.share / "new").read_bytes() == b"from the guest"
            assert c.lookup(ROOT, b"..").nodeid == ROOT
            esc = c.symlink(ROOT, b"esc", os.fsencode(s.outside / "secret")).nodeid
            assert fails(c.open, esc, os.O_RDONLY) == errno.ELOOP
            share_id = (os.stat(s.share).st_dev, os.stat(s.share).st_ino)
            pids = [s.daemon.proc.pid, *s.daemon.children()]
            assert len(pids) == 2, "the daemon and its worker"
            for pid in pids:
                root = f"/proc/{pid}/root"
                assert (os.stat(root).st_dev, os.stat(root).st_ino) == share_id
                cwd = os.stat(f"/proc/{pid}/cwd")  # (a chroot left outside is no chroot)
                assert (cwd.st_dev, cwd.st_ino) == share_id
                assert sorted(os.listdir(root)) == ["esc", "new", "seed"]
                assert not os.path.exists(f"{root}/etc/passwd")
                if kind == "chroot":
                    assert os.readlink(root) == os.path.realpath(s.share)
                else:  # its own mount namespace, with nothing in it but the share
                    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink(
                        "/proc/self/ns/mnt")
                    assert mount_points(pid) == ["/"]
                    assert os.readlink(root) == "/"
        finally:
            fe.close()
    finally:
        stop(s)


# -- the command line -------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhostuser.cli.fs", *args],
                          capture_output=True, text=True, timeout=30)


def test_print_capabilities_even_with_bad_options(tmp_path: Path) -> None:
    for args in ([], ["--tag", "t" * 40], ["--shared-dir", str(tmp_path / "none")],
                 ["--client", "--sandbox", "namespace", "--request-queues", "0"]):
        out = run_cli("--print-capabilities", *args)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"type": "fs", "features": []}


SANDBOX_CLIENT = "--client reconnects by path, out of reach in a sandbox: add --sandbox none"


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    sock = ["--socket-path", str(tmp_path / "fs.sock")]
    share = tmp_path / "share"
    share.mkdir()
    (tmp_path / "file").touch()
    cases = [
        ([*sock, "--tag", "t"], "--shared-dir and --tag are required"),
        ([*sock, "--shared-dir", str(share)], "--shared-dir and --tag are required"),
        ([*sock, "--shared-dir", str(share), "--tag", "t" * 37],
         "--tag must be 1 to 36 bytes"),
        ([*sock, "--shared-dir", str(share), "--tag", "é" * 19],  # 19 letters, 38 bytes
         "--tag must be 1 to 36 bytes"),
        ([*sock, "--shared-dir", str(share), "--tag", ""], "--tag must be 1 to 36 bytes"),
        ([*sock, "--shared-dir", str(tmp_path / "none"), "--tag", "t"],
         f"--shared-dir {tmp_path / 'none'}: No such file or directory"),
        ([*sock, "--shared-dir", str(tmp_path / "file"), "--tag", "t"],
         f"--shared-dir {tmp_path / 'file'}: not a directory"),
        ([*sock, "--client", "--shared-dir", str(share), "--tag", "t", "--sandbox",
          "namespace"], SANDBOX_CLIENT),
        ([*sock, "--client", "--shared-dir", str(share), "--tag", "t", "--sandbox", "chroot"],
         SANDBOX_CLIENT),
        ([*sock, "--client", "--shared-dir", str(share), "--tag", "t"],  # root: namespace
         SANDBOX_CLIENT),
        (["--shared-dir", str(share), "--tag", "t"],
         "exactly one of --socket-path, --fd and --vvu is required"),
    ]
    for args, message in cases:
        out = run_cli(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.splitlines()[-1] == f"vhost-user-fs: error: {message}", out.stderr
    assert not (tmp_path / "fs.sock").exists()
    assert sorted(os.listdir(share)) == []

