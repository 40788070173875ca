"""/proc, opened once at import: what this process reads there (its own fds) must stay
reachable after it confines itself (a chroot or a mount namespace without /proc). Paths
are relative to it: `self/fd/N` is resolved for whichever process asks."""

from __future__ import annotations

import fcntl
import os

PROC_FD = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def own_fd(fd: int) -> str:
    """The path of our fd `fd` relative to PROC_FD."""
    return f"self/fd/{fd}"


def fd_target(fd: int) -> str:
    """What our fd `fd` refers to, as /proc/self/fd/N reads ("anon_inode:[eventfd]")."""
    return os.readlink(own_fd(fd), dir_fd=PROC_FD)


def own_fds() -> list[int]:
    """Our open fds (as /proc/self/fd lists them, less those that listed them: ours, and
    the copy `os.listdir` reads through)."""
    listing = os.open("self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=PROC_FD)
    try:
        listed = [fd for fd in map(int, os.listdir(listing)) if fd != listing]
    finally:
        os.close(listing)
    return [fd for fd in listed if _is_open(fd)]


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True
