"""The daemons' exit status: 1 for an error that ends the serving loop, 0 for a stop signal,
and 0 also when the error came after the signal (the peer went away while we were on our way
out: the device and its back-end get SIGTERM together, and the device may be gone before the
back-end has looked at its signal)."""

from __future__ import annotations

import os
import signal

import pytest

from vhostuser.cli.common import until_stopped
from vhostuser.shutdown import StopSignal


def test_an_error_ends_the_loop_with_status_1(capsys: pytest.CaptureFixture[str]) -> None:
    def run(stop: StopSignal) -> None:
        raise ConnectionResetError("the device hung up")

    assert until_stopped(run) == 1
    assert capsys.readouterr().err == "error: the device hung up\n"


def test_a_stop_signal_ends_the_loop_with_status_0(capsys: pytest.CaptureFixture[str]) -> None:
    def run(stop: StopSignal) -> None:
        r, w = os.pipe()  # a peer that never speaks: only the signal ends the wait
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            stop.wait(r)
        finally:
            os.close(r)
            os.close(w)

    assert until_stopped(run) == 0
    assert capsys.readouterr().err == ""


def test_an_error_after_a_stop_signal_is_a_clean_exit(capsys: pytest.CaptureFixture[str]) -> None:
    def run(stop: StopSignal) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # delivered before the next bytecode
        raise ConnectionResetError("the device hung up")

    assert until_stopped(run) == 0
    assert capsys.readouterr().err == ""
