from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# The project's programs (vhost-user-switch, ...) are looked up in PATH by some tests: take
# them from this interpreter's environment (the checkout's .venv), never from another install.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])

from daemon import Daemon

IMAGE_MB = 16


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 16 MiB raw image with a recognisable pattern in every sector."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        for s in range(IMAGE_MB * 2048):
            f.write(s.to_bytes(4, "little") * 128)
    return path


@pytest.fixture
def blk_daemon(tmp_path: Path, image: Path) -> Iterator[Callable[..., Daemon]]:
    """Start `vhost-user-blk` on `image` with extra args; each is stopped (SIGTERM) and
    must exit 0 with no worker left behind."""
    started: list[Daemon] = []

    def start(*extra: str, img: Path = image) -> Daemon:
        sock = tmp_path / f"blk{len(started)}.sock"
        d = Daemon(["vhostuser.cli.blk", "--socket-path", str(sock), "--blk-file", str(img),
                    *extra], sock, tmp_path / f"blk{len(started)}.log")
        started.append(d)
        return d

    yield start
    for d in started:
        pid, kids = d.proc.pid, d.children()
        rc = d.stop()
        assert rc == 0, f"back-end exited {rc}:\n{d.log()}"
        assert "Traceback" not in d.log(), d.log()
        assert not os.path.exists(f"/proc/{pid}"), "back-end process left behind"
        deadline = time.monotonic() + 5
        while any(os.path.exists(f"/proc/{k}") for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [k for k in kids if os.path.exists(f"/proc/{k}")], "worker left behind"
