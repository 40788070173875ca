"""vhost-user over a virtio-vhost-user device: the appliance side.

`VvuLink` (appliance/vvu_link.py) brings the device up as a guest driver would: rxq/txq
with posted buffers, MSI-X vectors on eventfds, BACKEND_UP. `VvuChannel` and
`VvuResources` then give the engine exactly what the AF_UNIX transport gives it: messages,
and in place of each fd a token that `VvuResources` turns into the device's equivalent —

- a memory region: a view of the shared-memory BAR (region i at its mmap_offset);
- a call/err eventfd: the doorbell's ioeventfd, which *is* the consumer's eventfd, so a
  worker process signals the consumer directly;
- a kick eventfd: the consumer's own, where the device hands it over (vfio-user: the
  device stops reading it, so kicks reach the worker with no hop through the device);
  else the MSI-X vector the driver assigned to that vring (interrupt mode); or nothing:
  the worker polls the ring (`poll=True`, the exitless mode).

The engine, the workers and the devices are unchanged.

The device is reached either over its vfio-user socket (a process driving it as a guest
would) or, inside the appliance VM, on the VM's own PCI bus through sysfs
(``pci:0000:00:04.0``): BARs mmap-ed, rings in a huge page, INTx through uio_pci_generic
(ISR status and the KICKS bitmap say which sources fired) or none (poll mode), a doorbell
is an MMIO write, and the window is BAR 4 itself. What differs between the two ways is in
`vvu_access.py`; the link here is the same driver for both.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..appliance.vvu_link import V_FIRST_VRING, LinkError, VvuLink
from ..engine.backend import ResourceError
from ..engine.notify import Notifier
from ..protocol import (
    HEADER_SIZE,
    Channel,
    FrontendReq,
    Header,
    Message,
    ProtocolError,
    decode_header,
    decode_request,
    encode,
    expected_fds,
)
from ..protocol.payloads import MemRegion
from ..protocol.virtio_pci import NO_VECTOR
from ..shutdown import StopSignal
from ..unix_channel import Idle

log = logging.getLogger(__name__)

F = FrontendReq


@dataclass(frozen=True)
class Token:
    """Stands where the consumer's message carried an fd (the device consumed it)."""

    kind: str  # "memory", "call", "err", "kick", "backend", "log" or "log-signal"
    vring: int = 0


class VvuChannel:
    """The engine's message channel over one consumer session of a `VvuLink`."""

    def __init__(self, link: VvuLink, stop: StopSignal | None = None) -> None:
        self.link = link
        self.stop = stop

    def recv_raw(self, idle: Idle | None = None) -> tuple[Header, bytes, list[Token]]:
        return split_message(self.link.recv(self.stop, idle))

    def send(self, msg: Message) -> None:
        log.debug("txq: reply to %d", msg.request)
        self.link.send(encode(msg))

    def fds(self) -> list[int]:
        return self.link.access.fds()  # as a connection is held: the device

    def close(self) -> None:
        pass  # the link outlives a session


def split_message(data: bytes) -> tuple[Header, bytes, list[Token]]:
    """A message from rxq as the engine takes it: header, body, tokens for its fds."""
    header = decode_header(data[:HEADER_SIZE])
    body = data[HEADER_SIZE:]
    if len(body) != header.size:
        raise ProtocolError(f"rxq message of {len(data)} bytes, header says "
                            f"{HEADER_SIZE + header.size}")
    log.debug("rxq: request %d, %d bytes", header.request, len(body))
    return header, body, tokens_for(header, body)


def tokens_for(header: Header, body: bytes) -> list[Token]:
    """The tokens standing for the fds the consumer's message carried."""
    try:
        msg = decode_request(Channel.FRONTEND, header, body, None)
    except ProtocolError:
        return []  # the engine's own decoding reports the error
    n = expected_fds(Channel.FRONTEND, msg)
    kind = {F.SET_VRING_CALL: "call", F.SET_VRING_ERR: "err", F.SET_VRING_KICK: "kick",
            F.SET_MEM_TABLE: "memory", F.ADD_MEM_REG: "memory",
            F.SET_BACKEND_REQ_FD: "backend", F.SET_LOG_BASE: "log",
            F.SET_LOG_FD: "log-signal"}.get(FrontendReq(msg.request))
    if kind is None or not n:
        return []
    vring = getattr(msg.payload, "index", 0)
    return [Token(kind, vring) for _ in range(n)]


class VvuResources:
    """What the engine asks of a transport, answered by the virtio-vhost-user device."""

    max_mem_slots = 8
    shared_areas = False  # no in-flight area crosses the device (yet)
    shared_log: bool  # the dirty log does, where the device can place it in the window
    shared_state = False  # no DEVICE_STATE file crosses it (the relay refuses the requests)

    def __init__(self, link: VvuLink, poll: bool = False, kick_fds: bool = True) -> None:
        """`kick_fds`: take the consumer's own kick eventfds where the device hands them
        over (False: always the MSI-X vectors, or polling)."""
        self.link = link
        self.poll = poll or not link.interrupts
        self.kick_fds = kick_fds
        self.shared_log = link.access.shared_log
        self.kicks: dict[int, tuple[Token, int]] = {}  # id(token) -> it, the kick fd

    def map_region(self, desc: MemRegion, res: Token) -> memoryview:
        return self.link.window_view(desc)

    def new_area(self, size: int) -> tuple[Token, memoryview]:
        raise ResourceError("no shared area crosses the virtio-vhost-user device")

    def map_area(self, res: Token, size: int, offset: int) -> memoryview:
        """The dirty log: `size` bytes at window offset `offset` (SET_LOG_BASE as the
        device relays it). No other area crosses the device."""
        if res.kind != "log":
            raise ResourceError("no shared area but the dirty log crosses the "
                                   "virtio-vhost-user device")
        return self.link.window_view(MemRegion(0, size, 0, offset))

    def state_file(self, data: bytes) -> Token:
        raise ResourceError("no device state crosses the virtio-vhost-user device")

    def read_state_file(self, res: Token, limit: int) -> bytes:
        raise ResourceError("no device state crosses the virtio-vhost-user device")

    def check_kick(self, res: Token) -> None:
        pass  # the device took the consumer's kick fd; the token stands for it

    def kick_fd(self, res: Token | None) -> int | None:
        """What a worker waits on for kicks: the consumer's own kick eventfd where the
        device hands it over (vfio-user: no hop through the device; in poll mode nobody
        reads it), else the vring's MSI-X vector; None in poll mode."""
        if res is None or res.vring >= self.link.max_queues:
            return None
        known = self.kicks.get(id(res))
        if known is not None and known[0] is res:
            return None if self.poll else known[1]
        fd = self.link.kick_fd(res.vring) if self.kick_fds else None
        if fd is not None:
            self.kicks[id(res)] = (res, fd)
            os.set_blocking(fd, False)  # the consumer's: never wait on its counter
            try:
                os.eventfd_write(fd, 1)  # a kick the device took before handing it over
            except BlockingIOError:
                pass  # saturated: a kick is pending anyway
            return None if self.poll else fd
        if self.poll:
            self.link.notification_vector(res.vring, NO_VECTOR)
            return None
        vector = V_FIRST_VRING + res.vring
        self.link.notification_vector(res.vring, vector)
        return self.link.pci.vectors[vector]

    def notifier(self, res: Token) -> Notifier:
        """A call's, an err's or the dirty log's doorbell (SET_LOG_FD's, at 4 * 2N)."""
        n = self.link.max_queues
        offset = 4 * (2 * n if res.kind == "log-signal"
                      else res.vring if res.kind == "call" else n + res.vring)
        try:
            return self.link.doorbell(offset)
        except LinkError as e:
            raise ResourceError(str(e)) from e

    def backend_channel(self, res: Token) -> VvuBackendChannel:
        return VvuBackendChannel(self.link)

    def close(self, res: Token) -> None:
        known = self.kicks.pop(id(res), None)
        if known is not None and known[0] is res:
            os.close(known[1])


class VvuBackendChannel:
    """Back-end requests go on txq like replies, without the REPLY flag; the device relays
    them to the consumer's back-end channel (docs/vvu-design.md)."""

    def __init__(self, link: VvuLink) -> None:
        self.link = link

    def send(self, msg: Message) -> None:
        log.debug("txq: back-end request %d", msg.request)
        self.link.send(encode(msg))

    def close(self) -> None:
        pass
