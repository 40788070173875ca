"""Run a back-end program as a real subprocess, with its log kept for assertions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from vhostuser.frontend.blk import BlkClient
from vhostuser.frontend.client import Frontend
from vhostuser.protocol import VirtioFeature

BLK_FEATURES = (VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX
                | VirtioFeature.RING_INDIRECT_DESC | (1 << 1) | (1 << 2) | (1 << 5) | (1 << 6)
                | (1 << 9) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14))


class Program(subprocess.Popen[bytes]):
    """A program a test runs — the one way tests start one: its output (stdout and stderr)
    in the file `log`, in a session of its own (its workers share its process group, so
    what is left of it can be found and killed), ready once `ready` holds (paths that
    exist, or a callable) within `timeout` seconds; else it is killed and the test fails
    with its log (`ready` as a callable is given the program). A `subprocess.Popen`
    besides."""

    def __init__(self, argv: Sequence[str], log: Path | str,
                 ready: Iterable[Path | str] | Callable[[Program], bool] = (),
                 timeout: float = 15.0, env: dict[str, str] | None = None,
                 pass_fds: Sequence[int] = ()) -> None:
        self.log_path = Path(log)
        with open(self.log_path, "wb") as out:
            super().__init__(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True, env=env,
                             pass_fds=pass_fds)
        if callable(ready):
            def check() -> bool:
                return ready(self)
        else:
            paths = [str(p) for p in ready]

            def check() -> bool:
                return all(os.path.exists(p) for p in paths)

        deadline = time.monotonic() + timeout
        while not check():
            if self.poll() is not None or time.monotonic() > deadline:
                state = ("exited " + str(self.returncode) if self.returncode is not None
                         else f"not ready after {timeout} s")
                self.kill_group()
                pytest.fail(f"{' '.join(map(str, argv))}: {state}\n{self.log()}")
            time.sleep(0.02)

    @staticmethod
    def python(argv: Sequence[str], log: Path | str, **kw: Any) -> Program:
        """`python -m ARGV` with this interpreter (the checkout's)."""
        return Program([sys.executable, "-m", *argv], log, **kw)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 10.0, count: int = 1) -> str:
        """Wait until `text` has appeared `count` times in the log (the program living)."""
        deadline = time.monotonic() + timeout
        while (out := self.log()).count(text) < count:
            if self.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the log (exit status "
                                     f"{self.returncode}):\n{out}")
            time.sleep(0.05)
        return out

    def stop(self, timeout: float = 15.0, group: bool = False) -> int:
        """SIGTERM (to its whole process group if `group`), then SIGKILL to the group after
        `timeout`: the exit status."""
        if self.poll() is None:
            if group:
                os.killpg(self.pid, signal.SIGTERM)
            else:
                self.send_signal(signal.SIGTERM)
            try:
                self.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
        return self.wait()

    def kill_group(self) -> None:
        """SIGKILL to the program and everything in its process group."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait()


class Daemon:
    def __init__(self, argv: list[str], sock: Path, log: Path,
                 prefix: tuple[str, ...] = ()) -> None:
        """`python -m ARGV -vv` (after `prefix`, e.g. `ip netns exec NS`)."""
        self.sock = str(sock)
        self.log_path = log
        self.proc = Program([*prefix, sys.executable, "-m", *argv, "-vv"], log,
                            ready=[self.sock])

    def log(self) -> str:
        return self.proc.log()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def children(self) -> list[int]:
        """PIDs of the worker processes right now."""
        path = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
        try:
            return [int(x) for x in open(path).read().split()]
        except FileNotFoundError:
            return []

    def wait_log(self, text: str, timeout: float = 10.0, count: int = 1) -> str:
        """Wait until `text` has appeared `count` times in the log."""
        return self.proc.wait_log(text, timeout, count)

    def stop(self) -> int:
        return self.proc.stop()


def blk_session(sock: str, queues: int = 1, features: int = BLK_FEATURES,
                size: int = 128) -> tuple[Frontend, list[BlkClient]]:
    """A front-end negotiated and set up with `queues` rings, and a client per queue."""
    fe = Frontend(sock)
    fe.negotiate(features)
    fe.set_mem_table()
    for i in range(queues):
        fe.setup_queue(i, size)
    return fe, [BlkClient(fe, i, arena=4 << 20) for i in range(queues)]
