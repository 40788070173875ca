"""virtio-net (virtio 1.x §5.1): feature bits, the per-packet header, config space and the
RARP announcement. The data path on the queues is in net_rings.py, the packet switching in
`vhostuser.switch`; a port of the switch is a `NetPort` device.

A switch port offers the checksum and segmentation offloads (net_offload.py): frames keep
their header through the switch and are finished in software for a port that cannot take
them. A port bridged to a TAP device opens it with IFF_VNET_HDR and offers what the kernel
takes (all but UFO): frames go to the kernel with their headers, and the kernel hands us
unfinished frames only as far as the guest negotiated to take them (TUNSETOFFLOAD).
"""

from __future__ import annotations

import logging
import os
import struct
from typing import Any

from ..engine.device import ConfigError, Device, Events, QueueService
from ..engine.queue import DeviceQueue
from ..protocol.constants import ProtocolFeature, VirtioFeature
from . import net_kernel
from .net_offload import (
    F_GUEST_ANNOUNCE,
    F_GUEST_CSUM,
    F_GUEST_ECN,
    F_GUEST_TSO4,
    F_GUEST_TSO6,
    GSO_NONE,
    NEEDS_CSUM,
    OFFLOADS,
    TAP_OFFLOADS,
)
from .tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    VNET_HDR_LEN,
    open_tap,
    set_offload,
    set_queue,
)

log = logging.getLogger(__name__)

F_MTU = 1 << 3
F_MAC = 1 << 5
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16
F_MQ = 1 << 22
F_IN_ORDER = 1 << 35  # VIRTIO_F_IN_ORDER

S_LINK_UP = 1

ETH_HLEN = 14
VLAN_HLEN = 4
MIN_MTU, MAX_MTU = 68, 65535
BROADCAST = b"\xff" * 6

_CONFIG = struct.Struct("<6sHHH")  # mac, status, max_virtqueue_pairs, mtu
# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
_HDR12 = struct.Struct("<BBHHHHH")


def header_size(features: int) -> int:
    """12 bytes with VERSION_1 or MRG_RXBUF, else the legacy 10."""
    return 12 if features & (VirtioFeature.VERSION_1 | F_MRG_RXBUF) else 10


def rx_header(hdr_len: int, num_buffers: int = 1) -> bytes:
    """The header written in front of a received frame: no offload, `num_buffers` chains."""
    return _HDR12.pack(0, GSO_NONE, 0, 0, 0, 0, num_buffers)[:hdr_len]


def tx_header_ok(hdr: bytes | memoryview) -> bool:
    """A transmitted frame's header asks for nothing we did not offer (no checksum to
    finish, no segmentation)."""
    return not hdr[0] & NEEDS_CSUM and hdr[1] == GSO_NONE


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"bad MAC address {text!r} (want xx:xx:xx:xx:xx:xx)")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ValueError(f"{text} is a multicast address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def rarp_frame(mac: bytes) -> bytes:
    """A RARP "reverse request" broadcast from `mac`, as QEMU and DPDK announce a moved
    guest: it makes switches learn where `mac` now lives."""
    eth = BROADCAST + mac + b"\x80\x35"
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    return (eth + arp).ljust(60, b"\0")


class NetPort(Device):
    """One vhost-user port: a virtio-net device with `queue_pairs` rx/tx pairs (rx = 2k,
    tx = 2k+1). Its queues are served by the switch's loop, not by worker processes; the
    data path on them is devices/net_rings.py."""

    name = "vhost-user-net"
    protocol_features = int(ProtocolFeature.MQ | ProtocolFeature.RARP | ProtocolFeature.MTU
                            | ProtocolFeature.CONFIG)

    def __init__(self, mac: bytes, queue_pairs: int = 1, mtu: int = 1500,
                 tap: str | None = None, offloads: bool = True) -> None:
        if not 1 <= queue_pairs <= 128:
            raise ValueError(f"queue pairs must be 1..128, not {queue_pairs}")
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"MTU must be {MIN_MTU}..{MAX_MTU}, not {mtu}")
        self.mac = mac
        self.queue_pairs = queue_pairs
        self.num_queues = 2 * queue_pairs
        self.max_queue_size = 1024
        self.mtu = mtu
        self.offloads = offloads
        self.negotiated = 0
        self.hdr_len = 12
        self.announce: list[bytes] = []  # RARP frames waiting to be sent into the switch
        self.tx_arena: Any = None  # where the compiled transmit path puts frames (net_kernel)
        # bytes of chains a compiled transmit burst stops at (None: net_kernel.ARENA),
        # read when the burst's frame array is made (at the first take): the switch sets
        # it where frames go on to another port (FORWARD_BURST), before that
        self.tx_burst_bytes: int | None = None
        # standalone with a TAP: one TAP queue per pair, each pair in a worker of its own
        self.tap_fds = open_tap(tap, queue_pairs, offloads) if tap is not None else []
        self.vnet_tap = bool(self.tap_fds) and offloads  # frames behind VNET_HDR_LEN
        if self.tap_fds and net_kernel.available():  # loaded here, before workers fork
            log.info("frames taken and delivered by the compiled kernels")

    def queue_num(self) -> int:
        return self.queue_pairs  # vhost-user-net reports queue *pairs* (QEMU, DPDK)

    def features(self) -> int:
        # IN_ORDER: every queue's chains are returned in the order they were taken
        # (net_rings.py completes each burst whole, in ring order); GUEST_ANNOUNCE: a
        # front-end that has the guest announce itself after a migration may (QEMU does
        # then, and sends no RARP)
        offloads = 0
        if self.offloads:
            offloads = (TAP_OFFLOADS if self.tap_fds else OFFLOADS) | F_GUEST_ANNOUNCE
        return F_MTU | F_MAC | F_MRG_RXBUF | F_STATUS | F_MQ | F_IN_ORDER | offloads

    def set_features(self, features: int) -> None:
        self.negotiated = int(features)  # (a plain int: the data path tests bits per burst)
        self.hdr_len = header_size(features)
        if self.vnet_tap:
            self._tap_offloads(features)

    def _tap_offloads(self, features: int) -> None:
        """The TAP hands us unfinished frames only as far as the guest takes them (if the
        kernel refuses that, less: checksums only, or none; net_rings.py finishes what the
        guest cannot take either way)."""
        flags = 0
        if features & F_GUEST_CSUM:
            flags = TUN_F_CSUM
            for bit, tun in ((F_GUEST_TSO4, TUN_F_TSO4), (F_GUEST_TSO6, TUN_F_TSO6)):
                if features & bit:
                    flags |= tun
            if flags & (TUN_F_TSO4 | TUN_F_TSO6) and features & F_GUEST_ECN:
                flags |= TUN_F_TSO_ECN  # (the kernel takes ECN only with TSO)
        for attempt in dict.fromkeys((flags, flags & TUN_F_CSUM, 0)):
            try:
                set_offload(self.tap_fds[0], attempt)
                return
            except OSError as e:
                log.warning("cannot set the TAP's offloads to %#x: %s", attempt, e.strerror)

    def get_config(self) -> bytes:
        return _CONFIG.pack(self.mac, S_LINK_UP, self.queue_pairs, self.mtu)

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        raise ConfigError("virtio-net config space is read-only")

    def set_mtu(self, mtu: int) -> None:
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise ConfigError(f"MTU {mtu} outside {MIN_MTU}..{MAX_MTU}")
        self.mtu = mtu

    def send_rarp(self, mac: bytes) -> None:
        if self.tap_fds:  # straight out to the host's network
            try:
                os.write(self.tap_fds[0],
                         bytes(VNET_HDR_LEN if self.vnet_tap else 0) + rarp_frame(mac))
            except OSError as e:
                raise ConfigError(f"cannot send the RARP announcement: {e.strerror}") from e
            return
        self.announce.append(rarp_frame(mac))

    def max_frame(self) -> int:
        return self.mtu + ETH_HLEN + VLAN_HLEN

    def reset(self) -> None:
        self.negotiated = 0
        self.hdr_len = 12
        self.announce.clear()
        if self.vnet_tap:
            self._tap_offloads(0)

    def queue_groups(self) -> list[list[int]]:
        return [[2 * k, 2 * k + 1] for k in range(self.queue_pairs)]  # rx with its tx

    def serve(self, queues: dict[int, DeviceQueue], events: Events) -> QueueService:
        if not self.tap_fds:
            # frames move between the guest memories of different ports, all mapped in the
            # switch's process: its runner serves the queues there (switch/vhost_port.py)
            raise NotImplementedError("switch ports are served by the switch loop")
        from .net_tap import NetTapService  # it imports this module

        return NetTapService(self, queues, events, self.tap_fds[min(queues) // 2],
                             attach=min(queues) // 2 > 0)

    def stopped(self, indices: list[int]) -> None:
        """A pair's worker is gone: its TAP queue takes no more of the host's flows (the
        first stays, so the interface keeps one)."""
        pair = min(indices) // 2
        if self.tap_fds and pair > 0:
            try:
                set_queue(self.tap_fds[pair], False)
            except OSError as e:
                log.warning("TAP queue %d: cannot detach it: %s", pair, e.strerror)

    def worker_fds(self, indices: list[int]) -> list[int]:
        return [self.tap_fds[min(indices) // 2]] if self.tap_fds else []  # its pair's

    def close(self) -> None:
        for fd in self.tap_fds:
            os.close(fd)
        self.tap_fds = []
