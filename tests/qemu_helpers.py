"""Helpers for tests that boot QEMU guests against our vhost-user-blk back-end.

`BlkDaemon` runs ``vhost-user-blk`` as a subprocess in its own process group (so its
queue workers, forked children, can be found and accounted for), waits until its socket
listens, and stops it with SIGTERM, checking the exit status.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from daemon import Program

from testbed.guest import GuestError, GuestVM, find_busybox, find_kernel, find_qemu

CHECKOUT = Path(__file__).resolve().parents[1]  # testbed/ is run from here

MiB = 1 << 20
BLK_MODULES = ["virtio_pci", "virtio_blk"]
_SO_ACCEPTCON = 0x00010000  # /proc/net/unix "Flags" of a listening socket
# A queue worker gave up: the guest's I/O on that queue would hang until the timeout.
QUEUE_FAILURE = re.compile(r"^.* ERROR: .*queue \d+: (?:stopped|cannot start|device failed).*$",
                           re.M)


def require_guest_prerequisites() -> str:
    """Fail (never skip) when QEMU, a kernel or a static busybox is missing; returns the
    kernel version."""
    try:
        find_qemu()
        find_busybox()
        return find_kernel()[1]
    except GuestError as e:
        pytest.fail(f"guest VM prerequisites missing: {e}")


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found in PATH: apt-get install {package}")
    return path


def blk_qemu_args(sock: Path, num_queues: int = 1, smp: int = 1,
                  packed: bool = False) -> list[str]:
    """`packed`: the device offers packed virtqueues (Linux takes them)."""
    ring = ",packed=on" if packed else ""
    args = ["-chardev", f"socket,id=c0,path={sock}",
            "-device", f"vhost-user-blk-pci,chardev=c0,num-queues={num_queues}{ring}"]
    if smp > 1:
        args += ["-smp", str(smp)]
    return args


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (state is [0], ppid [1], pgid [2])."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rindex(")") + 2 :].split()


def _live_pids(select: Callable[[list[str]], bool]) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and fields[0] not in ("Z", "X") and select(fields):
                pids.append(int(entry))
    return sorted(pids)


def children_of(pid: int) -> list[int]:
    """Living (non-zombie) children of ``pid``."""
    return _live_pids(lambda f: int(f[1]) == pid)


def group_members(pgid: int) -> list[int]:
    """Living (non-zombie) processes of process group ``pgid``."""
    return _live_pids(lambda f: int(f[2]) == pgid)


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def migrate(src_qmp: Path, incoming: Path, context: Callable[[], str],
            max_bandwidth: int | None = None, timeout: float = 180) -> None:
    """Live-migrate the QEMU whose QMP socket is `src_qmp` to the one listening on
    `incoming` (`-incoming unix:...`): wait for that socket, `migrate`, and poll
    `query-migrate` until it completes; fail with `context()` if it fails or takes longer
    than `timeout`. `max_bandwidth` (bytes/s) slows it down to several passes over memory."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    if not wait_until(incoming.exists, 30):
        pytest.fail(f"the destination QEMU does not listen on {incoming}\n{context()}")
    qmp = QEMUMonitorProtocol(str(src_qmp))
    qmp.connect()
    try:
        if max_bandwidth is not None:
            qmp.cmd("migrate-set-parameters", **{"max-bandwidth": max_bandwidth})
        qmp.cmd("migrate", uri=f"unix:{incoming}")  # an error raises

        def status() -> str:
            return str(qmp.cmd("query-migrate").get("status"))

        wait_until(lambda: status() in ("completed", "failed", "cancelled"), timeout, 0.2)
        if (now := status()) != "completed":
            pytest.fail(f"migration {now}\n{context()}")
    finally:
        qmp.close()


def _listening(pid: int, path: Path) -> bool:
    """Whether ``path`` is a socket file and process ``pid`` holds a listening AF_UNIX
    socket (checked without connecting, which the back-end would count as a front-end;
    the bound name in /proc/net/unix is not used, as a back-end may bind a temporary
    name and rename it)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
        own = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    own.add(link[8:-1])
    except OSError:
        return False
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 7 and parts[6] in own and int(parts[3], 16) & _SO_ACCEPTCON:
                return True
    return False


class BackendDaemon:
    """``PROGRAM --socket-path SOCK -v [args]`` as a subprocess (one of our back-ends)."""

    def __init__(self, tmp_path: Path, program: str, args: Sequence[str] = (),
                 name: str = "backend", sock: Path | None = None) -> None:
        self.binary = require_tool(program, "the project: pip install -e .")
        self.sock = sock if sock is not None else tmp_path / f"{name}.sock"
        self.log_path = tmp_path / f"{name}.log"
        self.cmd = [self.binary, "--socket-path", str(self.sock), "-v", *args]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        return f"{' '.join(self.cmd)}\n--- daemon log ---\n{self.log}"

    def start(self, timeout: float = 10.0) -> BackendDaemon:
        # Its own session/process group: workers inherit the pgid, so leftovers can be
        # found even after the daemon died and they were re-parented.
        self.proc = Program(self.cmd, self.log_path, timeout=timeout,
                            ready=lambda p: _listening(p.pid, self.sock))
        return self

    def workers(self) -> list[int]:
        """The daemon's current child processes (its queue workers)."""
        return children_of(self.pid)

    def assert_alive(self) -> None:
        assert self.proc is not None
        assert self.proc.poll() is None, (
            f"back-end died with status {self.proc.returncode}\n{self.describe()}")

    def assert_idle(self, timeout: float = 10.0) -> None:
        """Alive, with no worker left once the front-end is gone."""
        self.assert_alive()
        ok = wait_until(lambda: not self.workers(), timeout)
        assert ok, (f"workers {self.workers()} still running {timeout}s after the front-end "
                    f"went away\n{self.describe()}")
        self.assert_alive()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM; returns the exit status and checks that no worker survived."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"back-end ignored SIGTERM for {timeout}s\n{self.describe()}")
        # Workers die with the parent (PDEATHSIG) or are stopped by it; give them a moment.
        wait_until(lambda: not group_members(self.pid), 5.0)
        left = group_members(self.pid)
        assert not left, f"processes {left} of the back-end survived it\n{self.describe()}"
        return rc

    def kill(self) -> None:
        """Forced cleanup (test already failing): SIGKILL the daemon's process group."""
        if self.proc is None:
            return
        if self.proc.poll() is None or group_members(self.pid):
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait()

    def __enter__(self) -> BackendDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


class BlkDaemon(BackendDaemon):
    """``vhost-user-blk --socket-path SOCK --blk-file IMG -v [extra]`` as a subprocess."""

    def __init__(self, tmp_path: Path, image: Path, extra: Sequence[str] = (),
                 name: str = "blk", sock: Path | None = None) -> None:
        super().__init__(tmp_path, "vhost-user-blk", ["--blk-file", str(image), *extra],
                         name, sock)



@contextlib.contextmanager
def watchdog(daemon: BackendDaemon, vm: GuestVM, interval: float = 0.2) -> Iterator[None]:
    """Run a guest under watch: if the back-end logs that a queue broke, kill QEMU at once
    (rather than waiting for the guest timeout) and fail with the back-end's log; a
    GuestError (hang, early exit) also fails with that log."""
    done = threading.Event()
    found: list[str] = []

    def watch() -> None:
        while not done.wait(interval):
            m = QUEUE_FAILURE.search(daemon.log)
            if m:
                found.append(m.group(0))
                vm.kill()
                return

    thread = threading.Thread(target=watch, name="blk-watchdog", daemon=True)
    thread.start()
    failure = None
    try:
        yield
    except GuestError as e:
        why = f"the back-end broke a queue: {found[0]}\n" if found else ""
        failure = f"{why}{e}\n{daemon.describe()}"
    finally:
        done.set()
        thread.join()
    if failure is not None:  # "from None": no chained duplicate of the console
        raise pytest.fail.Exception(failure) from None
