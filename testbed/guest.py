"""Throw-away Linux guests under QEMU (TCG) for tests and demos.

A guest is the host's Debian kernel plus a tiny initramfs built here in pure Python:
a static busybox, the requested kernel modules (with their dependencies, in load order)
and an ``/init`` that loads the modules, runs a user shell script and powers off::

    with GuestVM("echo hello; exit 3", modules=["virtio_blk"]) as vm:
        result = vm.run()
    assert result.status == 3 and result.lines == ["hello"]

Guest RAM is always a shared memfd, so vhost-user devices can be added through
``qemu_args`` (e.g. ``-chardev socket,... -device vhost-user-blk-pci,...``).
Set ``VHOSTUSER_VM_VERBOSE=1`` to echo the guest console to stderr.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import gzip
import io
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import cast

from .kernel import bootable_kernel

__all__ = [
    "EXIT_MARKER",
    "START_MARKER",
    "GuestError",
    "GuestResult",
    "GuestVM",
    "build_initramfs",
    "find_busybox",
    "find_kernel",
    "find_qemu",
    "resolve_modules",
]

START_MARKER = "@@START@@"
EXIT_MARKER = "@@EXIT"
_EXIT_RE = re.compile(r"@@EXIT (-?\d+)@@")
_KMSG_RE = re.compile(r"^\[\s*\d+\.\d+\] ")
_BOOT = Path("/boot")
_MODULES = Path("/lib/modules")
_INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mkdir -p /proc /sys /dev /tmp /mnt /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/modules.load); do
    case $m in
    [?]*) insmod "/lib/modules/${{m#?}}" 2>/dev/null || true ;;
    *) insmod "/lib/modules/$m" || echo "vm-init: insmod $m failed" ;;
    esac
done
cd /tmp
echo {START_MARKER}
if [ -e /etc/errexit ]; then sh -e /script.sh; else sh /script.sh; fi
rc=$?
sync
echo "{EXIT_MARKER} $rc@@"
poweroff -f
"""


class GuestError(RuntimeError):
    """A guest could not be built, booted or did not finish properly."""


# --------------------------------------------------------------------------- host tools


def _version_key(text: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def find_kernel(boot: Path = _BOOT) -> tuple[Path, str]:
    """Return the newest ``/boot/vmlinuz-*`` and its version (the /lib/modules dir name)."""
    kernels = sorted(boot.glob("vmlinuz-*"), key=lambda p: _version_key(p.name))
    if not kernels:
        raise GuestError(f"no kernel found in {boot}/vmlinuz-*: apt-get install linux-image-amd64")
    kernel = kernels[-1]
    if not os.access(kernel, os.R_OK):
        raise GuestError(f"{kernel} is not readable (run as root or chmod a+r it)")
    return kernel, kernel.name.removeprefix("vmlinuz-")


def _is_static_elf(path: Path) -> bool:
    with path.open("rb") as f:
        hdr = f.read(64)
        if len(hdr) < 64 or hdr[:4] != b"\x7fELF" or hdr[4] != 2:  # ELF64 only
            return False
        (phoff,) = struct.unpack_from("<Q", hdr, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", hdr, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    # PT_INTERP (3) means a dynamic loader is needed.
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def find_busybox(candidates: Sequence[str] = ("/bin/busybox", "/usr/bin/busybox")) -> Path:
    """Return a statically linked busybox binary."""
    for c in candidates:
        p = Path(c)
        if p.is_file() and _is_static_elf(p):
            return p
    raise GuestError(
        f"no static busybox found at {', '.join(candidates)}: apt-get install busybox-static"
    )


def find_qemu(binary: str = "qemu-system-x86_64") -> Path:
    """Return the path of the QEMU system emulator."""
    found = shutil.which(binary)
    if found is None:
        raise GuestError(f"{binary} not found in PATH: apt-get install qemu-system-x86")
    return Path(found)


# --------------------------------------------------------------------------- modules


@dataclass(frozen=True)
class _ModuleDb:
    root: Path
    deps: dict[str, list[str]]  # module name -> direct+transitive deps (names)
    paths: dict[str, str]  # module name -> path relative to root
    softdeps: dict[str, list[str]]  # module name -> "pre:" aliases/names
    aliases: dict[str, list[str]]  # alias -> module names
    builtin: frozenset[str]


def _modname(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


@functools.cache
def _module_db(kver: str) -> _ModuleDb:
    root = _MODULES / kver
    dep_file = root / "modules.dep"
    if not dep_file.is_file():
        raise GuestError(f"{dep_file} missing: apt-get install linux-image-{kver}")
    deps: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    for line in dep_file.read_text().splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        name = _modname(mod)
        paths[name] = mod
        deps[name] = [_modname(d) for d in rest.split()]
    softdeps: dict[str, list[str]] = {}
    aliases: dict[str, list[str]] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in (root / "modules.softdep").read_text().splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "softdep" and "pre:" in words:
                pre = words[words.index("pre:") + 1 :]
                if "post:" in pre:
                    pre = pre[: pre.index("post:")]
                softdeps.setdefault(words[1].replace("-", "_"), []).extend(pre)
    with contextlib.suppress(FileNotFoundError):
        for line in (root / "modules.alias").read_text().splitlines():
            words = line.split()
            if len(words) == 3 and words[0] == "alias":
                aliases.setdefault(words[1], []).append(words[2].replace("-", "_"))
    builtin: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        builtin = {_modname(m) for m in (root / "modules.builtin").read_text().split()}
    return _ModuleDb(root, deps, paths, softdeps, aliases, frozenset(builtin))


def resolve_modules(modules: Iterable[str], kver: str) -> list[Path]:
    """Return the ``.ko`` files for ``modules`` and all their dependencies, in load order.

    Hard dependencies come from modules.dep, ``softdep ... pre:`` entries (e.g. ext4 ->
    crypto-crc32c) are followed through modules.alias. Built-in modules are skipped.
    """
    return [path for path, _ in _resolve(modules, kver)]


def _resolve(modules: Iterable[str], kver: str) -> list[tuple[Path, bool]]:
    """Like resolve_modules(), with a flag telling whether each module is required."""
    db = _module_db(kver)
    order: list[str] = []
    seen: set[str] = set()
    optional: set[str] = set()

    def visit(raw: str, required: bool) -> None:
        name = raw.replace("-", "_")
        if name in seen or name in db.builtin:
            return
        if name not in db.paths:
            targets = db.aliases.get(raw, [])
            if not targets and required:
                raise GuestError(f"kernel module {name!r} not found for kernel {kver}")
            for t in targets:
                visit(t, required=False)
            return
        seen.add(name)
        if not required:
            optional.add(name)
        for soft in db.softdeps.get(name, []):
            visit(soft, required=False)
        for dep in db.deps[name]:
            visit(dep, required=required)
        order.append(name)

    for m in modules:
        visit(m, required=True)
    return [(db.root / db.paths[n], n not in optional) for n in order]


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko"):
        return data
    raise GuestError(f"cannot decompress kernel module {path} (only .ko, .ko.xz, .ko.gz)")


# --------------------------------------------------------------------------- cpio


class _Cpio:
    """Writer for the "newc" cpio format the kernel unpacks as initramfs."""

    def __init__(self, first_ino: int = 1) -> None:
        self.chunks: list[bytes] = []
        self.ino = first_ino
        self.dirs: set[str] = {""}

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(encoded), 0)  # fmt: skip
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields) + encoded
        self.chunks += [hdr, b"\0" * (-len(hdr) % 4), data, b"\0" * (-len(data) % 4)]

    def mkdir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.dirs:
                self.dirs.add(d)
                self._entry(d, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self.mkdir(name.rpartition("/")[0])
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.mkdir(name.rpartition("/")[0])
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        name = name.strip("/")
        self.mkdir(name.rpartition("/")[0])
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def body(self) -> bytes:
        return b"".join(self.chunks)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.body()


@functools.cache
def _base_archive(kver: str, modules: tuple[str, ...]) -> tuple[bytes, frozenset[str]]:
    """busybox + modules + /init without trailer, and its directories (built once)."""
    cpio = _Cpio()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "mnt", "run", "etc", "root"):
        cpio.mkdir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.file("bin/busybox", find_busybox().read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", _INIT.encode(), 0o755)
    load = []
    for path, required in _resolve(modules, kver):
        rel = path.relative_to(_MODULES / kver).as_posix()
        rel = rel[: rel.index(".ko") + 3]
        cpio.file(f"lib/modules/{rel}", _read_module(path))
        load.append(rel if required else f"?{rel}")  # "?": failure is fine (softdep)
    cpio.file("etc/modules.load", "".join(f"{m}\n" for m in load).encode())
    return cpio.body(), frozenset(cpio.dirs)


def build_initramfs(
    script: str,
    modules: Sequence[str],
    dest: Path,
    *,
    kver: str | None = None,
    errexit: bool = False,
    files: Mapping[str, bytes | Path] | None = None,
) -> Path:
    """Write an uncompressed newc initramfs to ``dest`` and return ``dest``.

    It holds a static busybox, ``modules`` plus dependencies (loaded in order by /init),
    ``script`` as /script.sh (run with ``sh -e`` if ``errexit``) and optional extra
    ``files`` (guest path -> content or host path, installed executable).
    """
    if kver is None:
        kver = find_kernel()[1]
    base, dirs = _base_archive(kver, tuple(modules))
    extra = _Cpio(first_ino=1_000_000)
    extra.dirs = set(dirs)
    extra.file("script.sh", script.encode(), 0o755)
    if errexit:
        extra.file("etc/errexit", b"")
    for name, content in (files or {}).items():
        data = content.read_bytes() if isinstance(content, Path) else content
        extra.file(name, data, 0o755)
    dest.write_bytes(base + extra.finish())
    return dest


# --------------------------------------------------------------------------- the guest


@dataclass(frozen=True)
class GuestResult:
    """Outcome of a guest run."""

    status: int  # exit status of the user script
    console: str  # everything the serial console printed ("\r\n" -> "\n")
    duration: float  # seconds from QEMU start to the exit marker

    @property
    def output(self) -> str:
        """What the script printed (between the markers, kernel log lines removed)."""
        return "".join(f"{line}\n" for line in self.lines)

    @property
    def lines(self) -> list[str]:
        """The script's output lines (between the markers, kernel log lines removed)."""
        text = self.console
        start = text.find(START_MARKER + "\n")
        text = text[start + len(START_MARKER) + 1 :] if start >= 0 else text
        end = _EXIT_RE.search(text)
        text = text[: end.start()] if end else text
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return [line for line in lines if not _KMSG_RE.match(line)]

    def between(self, begin: str, end: str) -> list[str]:
        """The script's lines strictly between a line equal to ``begin`` and one to ``end``."""
        lines = self.lines
        try:
            i = lines.index(begin)
            j = lines.index(end, i + 1)
        except ValueError as e:
            raise GuestError(f"markers {begin!r}..{end!r} not found in guest output") from e
        return lines[i + 1 : j]


class GuestVM:
    """A QEMU/TCG guest that runs ``script`` once; use as a context manager.

    ``run()`` = ``start()`` + ``wait()``. ``__exit__``/``close()`` always kill QEMU and
    delete the temporary initramfs.
    """

    def __init__(
        self,
        script: str,
        *,
        modules: Sequence[str] = (),
        qemu_args: Sequence[str] = (),
        mem_mb: int = 256,
        timeout: float = 120,
        qemu_binary: str = "qemu-system-x86_64",
        errexit: bool = False,
        files: Mapping[str, bytes | Path] | None = None,
        append: str = "",
        mem_path: str | None = None,
    ) -> None:
        self.script = script
        self.modules = list(modules)
        self.qemu_args = list(qemu_args)
        self.mem_mb = mem_mb
        self.timeout = timeout
        self.qemu_binary = qemu_binary
        self.errexit = errexit
        self.files = dict(files or {})
        self.append = append
        self.mem_path = mem_path  # guest RAM in this file instead of a memfd
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: Path | None = None
        self._buf: list[str] = []
        self._partial = ""
        self._cond = threading.Condition()
        self._status: int | None = None
        self._eof = False
        self._reader: threading.Thread | None = None
        self._t0 = 0.0
        self._t_exit = 0.0
        self._verbose = bool(os.environ.get("VHOSTUSER_VM_VERBOSE"))

    # -- lifecycle

    def __enter__(self) -> GuestVM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def command(self, qemu: Path, kernel: Path, initrd: Path) -> list[str]:
        """The full QEMU command line."""
        append = f"console=ttyS0 quiet panic=-1 {self.append}".strip()
        return [
            str(qemu),
            "-accel", "tcg", "-nodefaults", "-nographic", "-no-reboot",
            "-serial", "stdio", "-monitor", "none",
            "-m", f"{self.mem_mb}M",
            "-object", self._memory_backend(),
            "-numa", "node,memdev=vm-mem",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
            *self.qemu_args,
        ]  # fmt: skip

    def _memory_backend(self) -> str:
        if self.mem_path is not None:
            return (f"memory-backend-file,id=vm-mem,size={self.mem_mb}M,share=on,"
                    f"mem-path={self.mem_path}")
        return f"memory-backend-memfd,id=vm-mem,size={self.mem_mb}M,share=on"

    def start(self) -> GuestVM:
        """Build the initramfs and launch QEMU; returns immediately."""
        if self.proc is not None:
            raise GuestError("guest already started")
        kernel, kver = find_kernel()
        qemu = find_qemu(self.qemu_binary)
        self._tmpdir = Path(tempfile.mkdtemp(prefix="vhostuser-vm-"))
        initrd = build_initramfs(
            self.script, self.modules, self._tmpdir / "initramfs.cpio",
            kver=kver, errexit=self.errexit, files=self.files,
        )  # fmt: skip
        cmd = self.command(qemu, bootable_kernel(kernel), initrd)
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, name="guest-console", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        out = cast(io.BufferedReader, self.proc.stdout)  # Popen's pipes are buffered readers
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := out.read1(65536):
            text = decoder.decode(chunk).replace("\r", "")
            if self._verbose:
                sys.stderr.write(text)
            with self._cond:
                self._buf.append(text)
                self._partial = (self._partial + text)[-200:]
                if self._status is None and (m := _EXIT_RE.search(self._partial)):
                    self._status = int(m.group(1))
                    self._t_exit = time.monotonic()
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def console(self) -> str:
        """Console output so far."""
        with self._cond:
            return "".join(self._buf)

    def _tail(self, n: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-n:])

    def wait_for(self, text: str, timeout: float | None = None) -> None:
        """Block until ``text`` appears on the console (e.g. a line the script echoes)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._cond:
            while text not in "".join(self._buf):
                if self._eof:
                    raise GuestError(f"guest exited before printing {text!r}:\n{self._tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestError(f"timeout waiting for {text!r}:\n{self._tail()}")
                self._cond.wait(left)

    def wait(self, timeout: float | None = None) -> GuestResult:
        """Wait for the script's exit marker, then for QEMU to power off."""
        if self.proc is None:
            raise GuestError("guest not started")
        deadline = self._t0 + (self.timeout if timeout is None else timeout)
        with self._cond:
            while self._status is None and not self._eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            status = self._status
        if status is None:
            timed_out = not self._eof
            self.kill()
            if timed_out:
                what = f"timed out after {time.monotonic() - self._t0:.0f}s"
            else:
                what = f"QEMU exited with {self.proc.returncode} before the script finished"
            raise GuestError(f"guest {what}; last console lines:\n{self._tail()}")
        try:
            self.proc.wait(timeout=15)  # poweroff -f follows the marker immediately
        except subprocess.TimeoutExpired:
            self.kill()
        if self._reader is not None:
            self._reader.join(timeout=5)
        return GuestResult(status, self.console, self._t_exit - self._t0)

    def run(self) -> GuestResult:
        """Boot, run the script to completion and return its result."""
        return self.start().wait()

    def kill(self) -> None:
        """Kill QEMU if it is still running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Kill QEMU and remove temporary files."""
        self.kill()
        if self.proc is not None and self.proc.stdout is not None:
            if self._reader is not None:
                self._reader.join(timeout=5)
            self.proc.stdout.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
