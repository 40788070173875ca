"""vhost-user-rng driven by the Python front-end: buffers are filled with the source's bytes
in order (a file of known random bytes here, so every byte is checked), the rate limit holds
requests back without losing them, a source that has nothing yet or ends is handled, and the
command line refuses bad arguments. The guest's view is in test_qemu_rng.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon

from vhostuser.frontend.client import Frontend
from vhostuser.frontend.rng import RngClient
from vhostuser.protocol import VirtioFeature

FEATURES = VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX


@pytest.fixture
def source(tmp_path: Path) -> bytes:
    data = os.urandom(64 << 10)
    (tmp_path / "source").write_bytes(data)
    return data


def start(tmp_path: Path, *extra: str, source: str | None = None) -> Daemon:
    sock = tmp_path / "rng.sock"
    return Daemon(["vhostuser.cli.rng", "--socket-path", str(sock), "--source",
                   source or str(tmp_path / "source"), *extra], sock, tmp_path / "rng.log")


@pytest.fixture
def session(tmp_path: Path, source: bytes) -> Iterator[tuple[Daemon, Frontend, RngClient]]:
    d = start(tmp_path)
    fe = Frontend(d.sock)
    try:
        yield d, *connect(fe)
    finally:
        fe.close()
        assert d.stop() == 0, d.log()
        assert "Traceback" not in d.log(), d.log()


def connect(fe: Frontend, size: int = 16) -> tuple[Frontend, RngClient]:
    fe.negotiate(FEATURES)
    fe.set_mem_table()
    fe.setup_queue(0, size)
    return fe, RngClient(fe)


def test_buffers_are_filled_from_the_source_in_order(
        session: tuple[Daemon, Frontend, RngClient], source: bytes) -> None:
    _, _, rng = session
    first = rng.submit(16, kick=False)
    second = rng.submit(50, 50, kick=False)  # one request over two buffers
    third = rng.submit(7)
    got = rng.complete(3)
    assert got == [(first, source[:16]), (second, source[16:116]), (third, source[116:123])]
    empty = rng.submit()  # nothing writable: answered at once, with nothing
    assert rng.complete() == [(empty, b"")]
    assert rng.read(4096) == source[123 : 123 + 4096]


def test_a_source_that_ends_is_reported_and_requests_wait(
        session: tuple[Daemon, Frontend, RngClient], source: bytes) -> None:
    d, fe, rng = session
    big = rng.submit(64 << 10)  # all the source has
    assert rng.complete() == [(big, source)]
    rng.submit(16)
    d.wait_log("the source ended (EOF)")
    assert fe.get_vring_base(0) == 1, "the request the source could not serve was taken"
    assert d.alive()


def test_rate_limit_holds_requests_in_the_ring(tmp_path: Path, source: bytes) -> None:
    """64 bytes per hour: of four 32-byte requests two are served; the others stay in the
    ring, untaken (GET_VRING_BASE says 2), and nothing is lost when the queue stops."""
    d = start(tmp_path, "--max-bytes", "64", "--period", "3600000")
    try:
        with Frontend(d.sock) as fe:
            _, rng = connect(fe)
            heads = [rng.submit(32, kick=False) for _ in range(4)]
            fe.kick(0)
            assert rng.complete(2) == [(heads[0], source[:32]), (heads[1], source[32:64])]
            assert fe.get_vring_base(0) == 2
    finally:
        assert d.stop() == 0, d.log()


def test_rate_limit_serves_the_rest_in_later_periods(tmp_path: Path, source: bytes) -> None:
    """32 bytes per 50 ms: six requests need six periods; all are served, in order."""
    d = start(tmp_path, "--max-bytes", "32", "--period", "50")
    try:
        with Frontend(d.sock) as fe:
            _, rng = connect(fe)
            heads = [rng.submit(32, kick=False) for _ in range(6)]
            fe.kick(0)
            got = rng.complete(6, timeout=20)
            assert got == [(h, source[32 * i : 32 * (i + 1)]) for i, h in enumerate(heads)]
    finally:
        assert d.stop() == 0, d.log()


def test_a_fifo_source_with_nothing_yet_is_waited_for(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # a writer from the start (RDWR never blocks)
    d = start(tmp_path, source=str(fifo))
    try:
        with Frontend(d.sock) as fe:
            _, rng = connect(fe)
            head = rng.submit(16)
            d.wait_log("has nothing yet")
            os.write(writer, b"0123456789abcdef")
            assert rng.complete() == [(head, b"0123456789abcdef")]
    finally:
        os.close(writer)
        assert d.stop() == 0, d.log()


def test_a_ring_outside_guest_memory_stops_the_queue_not_the_daemon(
        tmp_path: Path, source: bytes) -> None:
    d = start(tmp_path)
    try:
        with Frontend(d.sock) as fe:
            _, rng = connect(fe)
            rng.ring.add([(fe.ram_size + 4096, 16, True)])  # beyond the guest's RAM
            fe.kick(0)
            d.wait_log("queue 0: stopped")
        with Frontend(d.sock) as fe:  # the next front-end is served
            _, rng = connect(fe)
            assert rng.read(16) == source[:16]
    finally:
        assert d.stop() == 0, d.log()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhostuser.cli.rng", *args],
                          capture_output=True, text=True, timeout=30)


def test_print_capabilities() -> None:
    out = run_cli("--print-capabilities")
    assert out.returncode == 0 and json.loads(out.stdout) == {"type": "rng", "features": []}


@pytest.mark.parametrize("args, message", [
    (["--period", "0"], "--period must be between"),
    (["--max-bytes", "0"], "--max-bytes must be at least 1"),
    ([], "exactly one of --socket-path"),
])
def test_bad_arguments_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    sock = ["--socket-path", str(tmp_path / "s")] if args else []
    out = run_cli(*sock, *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_a_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    out = run_cli("--socket-path", str(tmp_path / "s"), "--source", str(tmp_path / "none"))
    assert out.returncode == 1
    assert out.stderr.startswith("error: ") and "No such file" in out.stderr, out.stderr
    assert not (tmp_path / "s").exists()


def test_requests_after_one_served_from_the_source_s_event_are_kicked(tmp_path: Path) -> None:
    """With EVENT_IDX the driver kicks only past the device's avail_event: a request the
    device took on its own event (the FIFO became readable) must move that point, or the
    driver's next request is never kicked (seen in review: /dev/hwrng hung)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)
    d = start(tmp_path, source=str(fifo))
    try:
        with Frontend(d.sock) as fe:
            _, rng = connect(fe)
            first = rng.submit(16)
            d.wait_log("has nothing yet")
            os.write(writer, bytes(range(32)))  # served from the fd's event
            assert rng.complete() == [(first, bytes(range(16)))]
            second = rng.submit(16)  # kicked only if avail_event moved on
            assert rng.complete() == [(second, bytes(range(16, 32)))]
    finally:
        os.close(writer)
        assert d.stop() == 0, d.log()


def test_requests_after_one_served_by_the_rate_limit_timer_are_kicked(
        tmp_path: Path, source: bytes) -> None:
    """The same through the timer: 16 bytes per 200 ms, each request submitted (and kicked,
    as the driver decides) after the previous one completed."""
    d = start(tmp_path, "--max-bytes", "16", "--period", "200")
    try:
        with Frontend(d.sock) as fe:
            _, rng = connect(fe)
            for i in range(4):  # the 2nd waits for the timer; so may the others
                head = rng.submit(16)
                assert rng.complete(timeout=20) == [(head, source[16 * i : 16 * (i + 1)])]
    finally:
        assert d.stop() == 0, d.log()


def test_a_queue_that_broke_reports_where_it_stopped(tmp_path: Path, source: bytes) -> None:
    """GET_VRING_BASE after a ring error gives the index past what was taken (the bad chain
    counts as taken), never the index the queue started from: the next start must not
    serve completed requests again."""
    d = start(tmp_path)
    try:
        with Frontend(d.sock) as fe:
            _, rng = connect(fe)
            for i in range(3):
                assert rng.read(8) == source[8 * i : 8 * (i + 1)]
            rng.ring.add([(fe.ram_size + 4096, 16, True)])  # beyond the guest's RAM
            fe.kick(0)
            d.wait_log("queue 0: stopped")
            assert fe.get_vring_base(0) == 4
    finally:
        assert d.stop() == 0, d.log()
