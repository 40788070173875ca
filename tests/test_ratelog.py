"""ratelog.Limited: what a peer that causes errors at will gets into the log."""

from __future__ import annotations

import logging

import pytest

from vhostuser.ratelog import Limited


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ratelog-test"]


def test_the_first_lines_one_by_one_then_counts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ratelog-test")
    limited = Limited(logging.getLogger("ratelog-test"), first=3, every=10, clock=Clock())
    for i in range(25):
        limited.log(logging.WARNING, "bad request %d", i)
    assert lines(caplog) == ["bad request 0", "bad request 1", "bad request 2",
                             "bad request 9 (10 times so far)",
                             "bad request 19 (20 times so far)"]


def test_a_later_error_is_shown_again(caplog: pytest.LogCaptureFixture) -> None:
    """A flood early on does not hide an error an hour later (a failing disk, say)."""
    caplog.set_level(logging.INFO, logger="ratelog-test")
    clock = Clock()
    limited = Limited(logging.getLogger("ratelog-test"), first=2, every=1000, period=60.0,
                      clock=clock)
    for i in range(50):
        limited.log(logging.ERROR, "flood %d", i)
    clock.now += 59.0
    limited.log(logging.ERROR, "still within the minute")
    clock.now += 1.0
    limited.log(logging.ERROR, "a minute on")
    limited.log(logging.ERROR, "and again")
    limited.log(logging.ERROR, "one too many")
    assert lines(caplog) == ["flood 0", "flood 1", "a minute on (52 times so far)",
                             "and again"]
    assert limited.count == 54
