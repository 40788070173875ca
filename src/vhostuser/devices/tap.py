"""TAP interfaces (/dev/net/tun): one fd per queue, frames without packet information; with
`vnet_hdr`, each behind a 12-byte virtio-net header (IFF_VNET_HDR), so checksums and
segmentation can be left to the kernel, and it leaves them to us as far as `set_offload`
says."""

from __future__ import annotations

import errno
import fcntl
import os
import struct

_TUNSETIFF = 0x400454CA
_TUNSETQUEUE = 0x400454D9
_IFF_TAP = 0x0002
_IFF_MULTI_QUEUE = 0x0100
_IFF_ATTACH_QUEUE = 0x0200
_IFF_DETACH_QUEUE = 0x0400
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_TUNSETOFFLOAD = 0x400454D0
_TUNSETVNETHDRSZ = 0x400454D8
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 1, 2, 4, 8
VNET_HDR_LEN = 12  # virtio_net_hdr_mrg_rxbuf, whatever the guest's own header is


def open_tap(ifname: str, queues: int = 1, vnet_hdr: bool = False) -> list[int]:
    """Attach to the TAP interface `ifname` (created if missing, as the kernel does):
    `queues` non-blocking fds, a multi-queue interface when more than one. Queues past the
    first are detached (`set_queue`) until their pair runs: the kernel spreads the host's
    flows over the attached queues only."""
    if not 0 < len(ifname.encode()) < 16 or "/" in ifname:
        raise ValueError(f"bad interface name {ifname!r}")
    flags = (_IFF_TAP | _IFF_NO_PI | (_IFF_MULTI_QUEUE if queues > 1 else 0)
             | (_IFF_VNET_HDR if vnet_hdr else 0))
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
            if vnet_hdr:
                fcntl.ioctl(fd, _TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        # the interface's offloads outlive whoever set them (a TAP made beforehand may
        # have them on from an earlier run): none until the guest says what it takes
        set_offload(fds[0], 0)
        for fd in fds[1:]:
            set_queue(fd, False)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def set_queue(fd: int, attached: bool) -> None:
    """Attach a multi-queue TAP's queue `fd` to its interface, or detach it."""
    flag = _IFF_ATTACH_QUEUE if attached else _IFF_DETACH_QUEUE
    try:
        fcntl.ioctl(fd, _TUNSETQUEUE, struct.pack("16sH22x", b"", flag))
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: it already is
            raise


def set_offload(fd: int, flags: int) -> None:
    """What the kernel may hand us unfinished (TUN_F_*: checksums, TSO): the interface's
    own offloads, for all its queues."""
    fcntl.ioctl(fd, _TUNSETOFFLOAD, flags)
