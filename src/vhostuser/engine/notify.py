"""Notifications to the front-end (used buffers, ring errors)."""

from __future__ import annotations

import os
from typing import Protocol

from ..procfs import fd_target

_ONE = (1).to_bytes(8, "little")


def is_eventfd(fd: int) -> bool:
    """Whether `fd` is an eventfd (a kick or call fd must be: anything else could block
    us, or be readable forever)."""
    try:
        return fd_target(fd) == "anon_inode:[eventfd]"
    except OSError:
        return False


class Notifier(Protocol):
    def notify(self) -> None: ...

    def fds(self) -> tuple[int, ...]:
        """What a worker that signals it must keep open."""
        ...

    def close(self) -> None: ...


class EventfdNotifier:
    """Signals an eventfd (a call or err fd from the front-end)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def notify(self) -> None:
        try:
            os.write(self.fd, _ONE)
        except BlockingIOError:  # counter saturated: the peer has a wake-up pending anyway
            pass
        except OSError:  # not ours to fix (the front-end closed or broke its end): the
            pass  # ring still completes; the front-end just is not woken

    def fds(self) -> tuple[int, ...]:
        return (self.fd,) if self.fd >= 0 else ()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NoNotifier:
    """The front-end polls (NOFD): nothing to signal."""

    def notify(self) -> None:
        pass

    def fds(self) -> tuple[int, ...]:
        return ()

    def close(self) -> None:
        pass
