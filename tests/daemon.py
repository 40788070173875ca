"""Run a back-end program as a real subprocess, with its log kept for assertions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vhostuser.frontend.blk import BlkClient
from vhostuser.frontend.client import Frontend
from vhostuser.protocol import VirtioFeature

BLK_FEATURES = (VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX
                | VirtioFeature.RING_INDIRECT_DESC | (1 << 1) | (1 << 2) | (1 << 5) | (1 << 6)
                | (1 << 9) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14))


class Daemon:
    def __init__(self, argv: list[str], sock: Path, log: Path,
                 prefix: tuple[str, ...] = ()) -> None:
        """`python -m ARGV -vv` (after `prefix`, e.g. `ip netns exec NS`)."""
        self.sock = str(sock)
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", *argv, "-vv"],
                                     stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 15
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"back-end did not start:\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

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
        deadline = time.monotonic() + timeout
        while (out := self.log()).count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the back-end log:\n{out}")
            time.sleep(0.05)
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def blk_session(sock: str, queues: int = 1, features: int = BLK_FEATURES,
                size: int = 128) -> tuple[Frontend, list[BlkClient]]:
    """A front-end negotiated and set up with `queues` rings, and a client per queue."""
    fe = Frontend(sock)
    fe.negotiate(features)
    fe.set_mem_table()
    for i in range(queues):
        fe.setup_queue(i, size)
    return fe, [BlkClient(fe, i, arena=4 << 20) for i in range(queues)]
