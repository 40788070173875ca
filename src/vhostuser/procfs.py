"""/proc, opened once at import: what this process reads there (its own fds) must stay
reachable after it confines itself (a chroot or a mount namespace without /proc). Paths
are relative to it: `self/fd/N` is resolved for whichever process asks."""

from __future__ import annotations

import os

PROC_FD = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def own_fd(fd: int) -> str:
    """The path of our fd `fd` relative to PROC_FD."""
    return f"self/fd/{fd}"


def fd_target(fd: int) -> str:
    """What our fd `fd` refers to, as /proc/self/fd/N reads ("anon_inode:[eventfd]")."""
    return os.readlink(own_fd(fd), dir_fd=PROC_FD)
