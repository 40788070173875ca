"""vhost-user-trace's behaviour as a proxy, with our vhost-user-blk behind it and the
Python front-end before it: the back-end channel ends alone (as without the tracer), a
stop signal ends a session at once, and a trace nobody reads never holds the connection."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon
from qemu_helpers import wait_until

from vhostuser.frontend.client import BackendError, Frontend
from vhostuser.protocol import FrontendReq, ProtocolFeature, VirtioFeature


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Daemon]:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    sock = tmp_path / "back.sock"
    d = Daemon(["vhostuser.cli.blk", "--socket-path", str(sock), "--blk-file", str(img)],
               sock, tmp_path / "blk.log")
    yield d
    assert d.stop() == 0, d.log()


def tracer(tmp_path: Path, backend: Daemon, **kw: object) -> tuple[subprocess.Popen[bytes], str]:
    front = str(tmp_path / "front.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vhostuser.cli.trace", "--listen", front,
                             "--connect", backend.sock], **kw)  # type: ignore[call-overload]
    assert wait_until(lambda: os.path.exists(front), 10)
    return proc, front


def test_the_backend_channel_ends_alone(tmp_path: Path, backend: Daemon) -> None:
    proc, front = tracer(tmp_path, backend, stdout=subprocess.DEVNULL)
    try:
        with Frontend(front) as fe:
            fe.negotiate(VirtioFeature.VERSION_1, ProtocolFeature.REPLY_ACK)  # no BACKEND_REQ
            a, b = socket.socketpair()
            with pytest.raises(BackendError):  # refused, as without the tracer ...
                fe.call(FrontendReq.SET_BACKEND_REQ_FD, fds=(b.fileno(),))
            b.close()
            assert fe.get_u64(FrontendReq.GET_FEATURES)  # ... and the connection goes on
            a.settimeout(5)
            assert a.recv(10) == b""  # the back-end closed its channel: we see it end
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_stop_signal_ends_a_session(tmp_path: Path, backend: Daemon) -> None:
    proc, front = tracer(tmp_path, backend, stdout=subprocess.DEVNULL)
    with Frontend(front) as fe:
        fe.negotiate(VirtioFeature.VERSION_1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        fe.sock.sock.settimeout(5)
        assert fe.sock.sock.recv(10) == b""  # the front-end sees the connection end


def test_a_trace_nobody_reads_does_not_hold_the_connection(tmp_path: Path,
                                                           backend: Daemon) -> None:
    proc, front = tracer(tmp_path, backend, stdout=subprocess.PIPE)  # never read
    try:
        with Frontend(front, reply_timeout=10) as fe:
            fe.negotiate(VirtioFeature.VERSION_1, ProtocolFeature.REPLY_ACK)
            for _ in range(3000):  # far more trace than a pipe holds
                assert fe.get_u64(FrontendReq.GET_FEATURES)
    finally:
        proc.terminate()
        proc.wait(10)
