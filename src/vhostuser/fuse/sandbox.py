"""Confining the file server's process to the shared directory, beside (not instead of)
the per-request confinement of server.py:

- `namespace`: a private mount namespace whose root is the shared directory (bind-mounted
  on itself, pivot_root, the old root detached): nothing else of the host's file systems is
  reachable from the process at all. Needs CAP_SYS_ADMIN.
- `chroot`: chroot into the shared directory. Needs CAP_SYS_CHROOT.
- `none`: only the per-request confinement (openat2 beneath the shared directory).

Applied once the process holds everything it needs from outside: its listening socket or
front-end connection, /proc (open as an fd) and its Python modules (imported).
"""

from __future__ import annotations

import ctypes
import os
from typing import Literal

Sandbox = Literal["namespace", "chroot", "none"]

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNS = 0x00020000
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 1 << 18
_MNT_DETACH = 2
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}


class SandboxError(Exception):
    """The sandbox could not be set up (say which option runs without it)."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(e)}")


def enter(kind: Sandbox, shared_dir: str) -> None:
    if kind == "none":
        return
    try:
        if kind == "chroot":
            os.chroot(shared_dir)
            os.chdir("/")
            return
        _namespace(shared_dir)
    except OSError as e:
        raise SandboxError(f"cannot enter the {kind} sandbox ({e.strerror}); run as root, "
                           "or choose --sandbox none") from e
    except SandboxError as e:
        raise SandboxError(f"cannot enter the {kind} sandbox ({e}); run as root, or choose "
                           "--sandbox none") from e


def _namespace(shared_dir: str) -> None:
    pivot = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if pivot is None:
        raise SandboxError(f"pivot_root on {os.uname().machine} is not known here")
    _check(_libc.unshare(_CLONE_NEWNS), "unshare")
    # nothing we do here may leak to the host's mounts
    _check(_libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate")
    src = os.fsencode(os.path.realpath(shared_dir))
    _check(_libc.mount(src, src, None, _MS_BIND | _MS_REC, None), "bind mount")
    os.chdir(src)
    _libc.syscall.restype = ctypes.c_long
    _check(_libc.syscall(ctypes.c_long(pivot), b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", _MNT_DETACH), "detaching the old root")
    os.chdir("/")
