"""TAP interfaces (/dev/net/tun): one fd per queue, frames without packet information."""

from __future__ import annotations

import fcntl
import os
import struct

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_MULTI_QUEUE = 0x0100
_IFF_NO_PI = 0x1000


def open_tap(ifname: str, queues: int = 1) -> list[int]:
    """Attach to the TAP interface `ifname` (created if missing, as the kernel does):
    `queues` non-blocking fds, a multi-queue interface when more than one."""
    if not 0 < len(ifname.encode()) < 16 or "/" in ifname:
        raise ValueError(f"bad interface name {ifname!r}")
    flags = _IFF_TAP | _IFF_NO_PI | (_IFF_MULTI_QUEUE if queues > 1 else 0)
    fds: list[int] = []
    try:
        for _ in range(queues):
            try:
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                raise OSError(e.errno, f"cannot open /dev/net/tun: {e.strerror}") from e
            fds.append(fd)
            try:
                fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", ifname.encode(), flags))
            except OSError as e:
                hint = (" (a single-queue TAP cannot take several queues: create it with "
                        "`ip tuntap add ... multi_queue`)" if queues > 1 else "")
                raise OSError(e.errno, f"cannot attach TAP {ifname}: {e.strerror}{hint}") from e
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds
