"""vhost-user over a virtio-vhost-user device: the appliance side.

`VvuLink` brings the device up as a guest driver would (through our vfio-user client):
rxq/txq with posted buffers, MSI-X vectors on eventfds, BACKEND_UP. `VvuChannel` and
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
is an MMIO write, and the window is BAR 4 itself.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from dataclasses import dataclass

from ..appliance.sysfs_pci import HugePageRam, MmioNotifier, SysfsPciError, SysfsPciFunction
from ..appliance.uio import UioInterrupts
from ..appliance.virtio_pci import ISR, NO_VECTOR, VirtioPciDriver
from ..engine.backend import ResourceError
from ..engine.notify import EventfdNotifier, Notifier
from ..memory import MemoryTableError, seal_against_shrinking
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
from ..shutdown import StopSignal, readable
from ..sockets import PeerClosed
from ..unix_channel import Idle
from ..vfio_user.client import DeviceError, Region, VfioUserClient
from ..virtq.guest_ram import GuestRam
from ..vvu.abi import (
    CFG_DOORBELL,
    CFG_NOTIFICATION,
    CFG_SHARED_MEMORY,
    FIRST_FILE_REGION,
    KICK_FD_VECTOR,
    KICK_FDS,
    KICKS,
    S_BACKEND_UP,
    S_FRONTEND_UP,
    WINDOW_BASE_CAP,
)

log = logging.getLogger(__name__)

F = FrontendReq
V_CONFIG, V_RXQ, V_TXQ, V_FIRST_VRING = 0, 1, 2, 3
RX_BUFFERS, BUFFER_SIZE = 32, 8192  # a message is at most 12 + 4096 bytes
RAM_SIZE = 2 << 20  # the driver's rings and buffers
POLL_INTERVAL = 0.0005  # seconds between looks at rxq with no interrupts
STATUS_POLL = 0.05  # seconds between reads of the status register with no interrupts
PCI_PREFIX = "pci:"
FEATURES = (1 << 32) | (1 << 28) | (1 << 29)  # VERSION_1, INDIRECT_DESC, EVENT_IDX


class LinkError(Exception):
    """The device is not what the link needs: not a virtio-vhost-user device, a doorbell
    or a vring it does not have."""


class TxqFull(ConnectionError):
    """No txq buffer is free: the device does not consume what we send."""


@dataclass(frozen=True)
class Token:
    """Stands where the consumer's message carried an fd (the device consumed it)."""

    kind: str  # "memory", "call", "err", "kick", "backend", "log" or "log-signal"
    vring: int = 0


class VvuLink:
    def __init__(self, device: str, poll: bool = False) -> None:
        """`device`: the device's vfio-user socket, or ``pci:`` and its PCI address on this
        machine's bus (inside the appliance VM: INTx through uio_pci_generic, unless
        `poll`, or the driver is missing, and then no interrupts at all)."""
        self.client: VfioUserClient | SysfsPciFunction
        if device.startswith(PCI_PREFIX):
            self.client = SysfsPciFunction(device[len(PCI_PREFIX):])
            self.ram: GuestRam = HugePageRam()
        else:
            self.client = VfioUserClient(device)
            self.ram = GuestRam(RAM_SIZE, guest_addr=0x1_0000_0000)
        self.interrupts = isinstance(self.client, VfioUserClient)
        self.uio: UioInterrupts | None = None
        self._status, self._status_until = 0, 0.0
        self.pci = VirtioPciDriver(self.client, self.ram)
        try:
            self._bring_up(poll)
        except BaseException:
            self.close()
            raise

    def _bring_up(self, poll: bool) -> None:
        pci = self.pci
        for need in (CFG_DOORBELL, CFG_NOTIFICATION, CFG_SHARED_MEMORY):
            if need not in pci.caps:
                raise LinkError(f"not a virtio-vhost-user device: no cfg_type {need}")
        self.max_queues = struct.unpack("<I", pci.config_read(4, 4))[0]
        if self.interrupts:
            pci.setup_vectors(V_FIRST_VRING + self.max_queues)
        elif not poll:
            self.interrupts = self._intx(V_FIRST_VRING + self.max_queues)
        pci.init(FEATURES, self._vector(V_CONFIG))
        if isinstance(self.client, SysfsPciFunction):
            # an INTx of an earlier back-end's (or of the device with nobody to take it)
            # left QEMU's BAR mappings off: have it map them again, poll mode too
            self.client.remap_bars()
        self.rxq = pci.setup_queue(0, 64, self._vector(V_RXQ))
        self.txq = pci.setup_queue(1, 64, self._vector(V_TXQ))
        self.rx_bufs: dict[int, int] = {}
        for _ in range(RX_BUFFERS):
            gpa = self.ram.alloc(BUFFER_SIZE)
            self.rx_bufs[self.rxq.add([(gpa, BUFFER_SIZE, True)])] = gpa
        self.tx_free = [self.ram.alloc(BUFFER_SIZE) for _ in range(16)]
        self.tx_busy: dict[int, int] = {}
        self.pending: list[bytes] = []
        pci.driver_ok()
        pci.kick(0)

    def _vector(self, v: int) -> int:
        return v if self.interrupts else NO_VECTOR

    def _intx(self, count: int) -> bool:
        """INTx on `count` eventfds, one per vector the driver would have had with MSI-X;
        False (poll mode) where uio_pci_generic cannot have the device."""
        assert isinstance(self.client, SysfsPciFunction)
        try:
            self.client.bind_uio()
            self._acknowledge()  # creates its register views before the thread shares them
            self.uio = UioInterrupts(self.client, count, self._acknowledge)
        except (SysfsPciError, OSError) as e:
            log.warning("no interrupts (%s): polling", e)
            return False
        self.pci.vectors = list(self.uio.fds)
        log.info("interrupts: INTx through uio_pci_generic (/dev/%s)", self.client.uio_name())
        return True

    def _acknowledge(self) -> list[int]:
        """INTx: the vectors whose sources fired, from ISR status (config change; a queue:
        rxq or txq) and the KICKS bitmap (vring i: V_FIRST_VRING + i), both read-to-clear."""
        isr_cap, note = self.pci.caps[ISR], self.pci.caps[CFG_NOTIFICATION]
        isr = self.client.read_u(isr_cap.bar, isr_cap.offset, 1)
        fired = ([V_CONFIG] if isr & 2 else []) + ([V_RXQ, V_TXQ] if isr & 1 else [])
        for word in range((self.max_queues + 31) // 32):
            bits = self.client.read_u(note.bar, note.offset + KICKS + 4 * word, 4)
            fired += [V_FIRST_VRING + 32 * word + b for b in range(32) if bits >> b & 1]
        return fired

    # -- status ----------------------------------------------------------------------------

    def status(self, fresh: bool = False) -> int:
        """The device's status register. Without interrupts nothing says when it changes,
        and on a PCI bus each read is a trapped access that the hypervisor turns into a
        message to the device: polled, it is read at most every STATUS_POLL seconds."""
        if self.interrupts or fresh or time.monotonic() >= self._status_until:
            self._status = struct.unpack("<I", self.pci.config_read(0, 4))[0]
            self._status_until = time.monotonic() + STATUS_POLL
        return self._status

    def set_backend_up(self, up: bool) -> None:
        self.pci.config_write(0, struct.pack("<I", S_BACKEND_UP if up else 0))
        self._status_until = 0.0  # read it again next time

    def frontend_up(self) -> bool:
        return bool(self.status() & S_FRONTEND_UP)

    def begin_session(self) -> None:
        """Get ready for the next consumer: end any session the device still holds, drop
        what is left of it, set BACKEND_UP (the device clears it when a session ends)."""
        if self.status(fresh=True) & S_BACKEND_UP:  # the engine gave up on a session
            self.set_backend_up(False)
        # BACKEND_UP is clear, so nothing new can arrive: what is in rxq is stale
        if self.uio is not None:
            self.uio.start()  # here, not earlier: the back-end may have confined itself
        self._take_rx()
        self.pending.clear()
        self.set_backend_up(True)

    def in_session(self, fresh: bool = False) -> bool:
        return self.status(fresh) == S_BACKEND_UP | S_FRONTEND_UP

    def wait_frontend(self, stop: StopSignal | None) -> None:
        """Start a session and block until a consumer is connected."""
        self.begin_session()
        while not self.frontend_up():
            if not self.status() & S_BACKEND_UP:  # a consumer came and went before we
                self.begin_session()  # looked: the device ended that session
            self._wait([V_CONFIG], stop, STATUS_POLL)

    def event_fds(self) -> list[int]:
        """Eventfds that fire when a message arrives or the session changes (none with no
        interrupts: then call `take_messages` and `in_session` from time to time)."""
        if not self.interrupts:
            return []
        return [self.pci.vectors[V_RXQ], self.pci.vectors[V_CONFIG]]

    def take_messages(self) -> list[bytes]:
        """Non-blocking: the messages that have arrived (their vectors' counts cleared)."""
        for fd in self.event_fds():
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
        self._take_rx()
        out, self.pending = self.pending, []
        return out

    def _wait(self, vectors: list[int], stop: StopSignal | None,
              timeout: float | None) -> list[int]:
        if not self.interrupts:  # no interrupts: pause briefly, the caller looks again
            pause = POLL_INTERVAL if timeout is None else min(timeout, POLL_INTERVAL)
            if stop is None:
                time.sleep(pause)
                return vectors
            ready = readable([stop.fds()[0]], pause)
            if ready or stop.signum is not None:
                stop.wait(stop.fds()[0], 0)  # raises Shutdown
            return vectors
        fds = {self.pci.vectors[v]: v for v in vectors}
        watch = list(fds) + ([stop.fds()[0]] if stop is not None else [])
        ready = readable(watch, timeout)
        if stop is not None and (stop.fds()[0] in ready or stop.signum is not None):
            stop.wait(stop.fds()[0], 0)  # raises Shutdown
        fired = []
        for fd in ready:
            if fd in fds:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                fired.append(fds[fd])
        return fired

    # -- messages --------------------------------------------------------------------------

    def recv(self, stop: StopSignal | None, idle: Idle | None = None) -> bytes:
        """The next message from rxq; PeerClosed when the consumer's session ends.
        `idle` = (seconds, fn): call fn every that many seconds while nothing comes."""
        last = time.monotonic()
        while True:
            if self.pending:
                return self.pending.pop(0)
            if self._take_rx():
                continue
            if self.status() != S_BACKEND_UP | S_FRONTEND_UP:  # the session is over
                raise PeerClosed()
            if idle is not None and time.monotonic() - last >= idle[0]:
                idle[1]()
                last = time.monotonic()
            self._wait([V_RXQ, V_CONFIG], stop, idle[0] if idle is not None else None)

    def _take_rx(self) -> bool:
        """Move completed rxq buffers into `pending` and post them again."""
        used = self.rxq.take_used()
        if not used:
            return False
        # copy every message out before reposting any buffer: the ids are free again
        gpas = [self.rx_bufs.pop(head) for head, _ in used]
        self.pending += [bytes(self.ram.at(g, n)) for g, (_, n) in zip(gpas, used, strict=True)]
        for gpa in gpas:
            self.rx_bufs[self.rxq.add([(gpa, BUFFER_SIZE, True)])] = gpa
        self.pci.kick(0)
        return True

    def send(self, data: bytes) -> None:
        for head, _ in self.txq.take_used():
            self.tx_free.append(self.tx_busy.pop(head))
        if not self.tx_free:
            raise TxqFull("txq full: the device does not consume replies")
        gpa = self.tx_free.pop()
        self.ram.at(gpa, len(data))[:] = data
        self.tx_busy[self.txq.add([(gpa, len(data), False)])] = gpa
        self.pci.kick(1)

    # -- resources -------------------------------------------------------------------------

    def window_view(self, desc: MemRegion) -> memoryview:
        """Region `desc` (its mmap_offset is its offset in the window) as a view of the
        consumer's memory file that holds it: vfio-user regions 9, 10, ... are the
        window's files, each with its window base (the device re-reads them per table)."""
        start, end = desc.mmap_offset, desc.mmap_offset + desc.size
        if isinstance(self.client, SysfsPciFunction):  # the BAR is the window
            cap = self.pci.caps[CFG_SHARED_MEMORY]
            bar = self.client.map_bar(cap.bar)
            if end > min(cap.length, len(bar) - cap.offset):
                raise MemoryTableError(f"region {desc} lies outside the window")
            return memoryview(bar)[cap.offset + start : cap.offset + end]
        region, offset = self._window_file(desc)
        try:
            return memoryview(self.client.map_region(region))[offset : offset + desc.size]
        finally:
            if region.fd is not None:
                os.close(region.fd)

    def window_fd(self, desc: MemRegion) -> tuple[int, int]:
        """An fd that another process can mmap for region `desc`, and the region's offset
        in it (the caller closes the fd): the BAR's sysfs file inside the appliance VM,
        the consumer's memory file that the device offers as a vfio-user region outside."""
        start, end = desc.mmap_offset, desc.mmap_offset + desc.size
        if isinstance(self.client, SysfsPciFunction):
            cap = self.pci.caps[CFG_SHARED_MEMORY]
            fd = self.client.open_bar(cap.bar)
            if end > min(cap.length, os.fstat(fd).st_size - cap.offset):
                os.close(fd)
                raise MemoryTableError(f"region {desc} lies outside the window")
            return fd, cap.offset + start
        region, offset = self._window_file(desc)
        assert region.fd is not None
        return region.fd, region.offset + region.mmap_areas[0][0] + offset

    def _window_file(self, desc: MemRegion) -> tuple[Region, int]:
        """The vfio-user region (with its fd, the caller's to close) of the window file
        that holds `desc`, and where `desc` starts in its mappable area."""
        assert isinstance(self.client, VfioUserClient)
        start, end = desc.mmap_offset, desc.mmap_offset + desc.size
        for index in range(FIRST_FILE_REGION, FIRST_FILE_REGION + 64):
            region = self.client.region(index)
            if not region.size:
                break
            base = next((int.from_bytes(getattr(c, "data", b"")[:8], "little")
                         for c in region.caps
                         if getattr(c, "id", None) == WINDOW_BASE_CAP), None)
            if (base is not None and base <= start and end <= base + region.size
                    and region.fd is not None and region.mmap_areas):
                seal_against_shrinking(region.fd)  # the consumer's file: no SIGBUS for us
                return region, start - base
            if region.fd is not None:
                os.close(region.fd)
        raise MemoryTableError(f"region {desc} is in none of the window's memory files")

    def doorbell(self, offset: int) -> Notifier:
        """What rings the doorbell at `offset`: its ioeventfd (vfio-user), or an MMIO write
        (on the PCI bus, where the hypervisor forwards it to the device)."""
        cap = self.pci.caps[CFG_DOORBELL]
        if isinstance(self.client, SysfsPciFunction):
            return MmioNotifier(self.client.map_bar(cap.bar), cap.offset + offset)
        fd = self.doorbell_fd(offset)
        if fd is None:
            raise LinkError(f"the device has no doorbell eventfd at {offset:#x}")
        return EventfdNotifier(fd)

    def doorbell_fd(self, offset: int) -> int | None:
        """A dup of the ioeventfd behind the doorbell at `offset`, if the device has one."""
        if not isinstance(self.client, VfioUserClient):
            return None  # on a PCI bus a doorbell is an MMIO write, with no eventfd
        return self._io_fd(self.pci.caps[CFG_DOORBELL].bar, offset)

    def kick_fd(self, vring: int) -> int | None:
        """The consumer's own kick eventfd of `vring` (a dup, the caller's to close),
        which the device then stops reading: over vfio-user, where the device offers it
        (KICK_FD_VECTOR); None elsewhere, and then the vring has no vector (the caller
        sets one). The device may have taken a kick meanwhile: signal the fd once after
        handing it on."""
        if not isinstance(self.client, VfioUserClient) or vring >= self.max_queues:
            return None
        cap = self.pci.caps[CFG_NOTIFICATION]
        found = None
        try:
            self.notification_vector(vring, KICK_FD_VECTOR)
            found = self._io_fd(cap.bar, cap.offset + KICK_FDS + 4 * vring)
        except DeviceError as e:
            log.warning("vring %d: the device does not hand over its kick eventfd: %s",
                        vring, e)
        if found is None:  # an older device, or the vring has no kick fd (any more)
            self.notification_vector(vring, NO_VECTOR)
        return found

    def _io_fd(self, bar: int, offset: int) -> int | None:
        assert isinstance(self.client, VfioUserClient)
        pairs = self.client.io_fds(bar)
        found = None
        for off, fd in pairs:
            if off == offset and found is None:
                found = os.dup(fd)
        for fd in {fd for _, fd in pairs}:
            os.close(fd)
        return found

    def notification_vector(self, vring: int, vector: int) -> None:
        cap = self.pci.caps[CFG_NOTIFICATION]
        self.client.write(cap.bar, cap.offset, struct.pack("<HH", vring, vector))

    def close(self) -> None:
        try:
            self.set_backend_up(False)
            self.pci.reset()  # no vector left set: nothing raises INTx for nobody
        except (OSError, DeviceError):
            pass
        if self.uio is not None:
            self.uio.close()  # its eventfds are the driver's vectors
            self.pci.vectors = []
        self.pci.close()
        self.client.close()
        self.ram.close()


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
    except Exception:
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
    shared_log = True  # the dirty log does: the device places it in the window
    shared_state = False  # no DEVICE_STATE file crosses it (the relay refuses the requests)

    def __init__(self, link: VvuLink, poll: bool = False, kick_fds: bool = True) -> None:
        """`kick_fds`: take the consumer's own kick eventfds where the device hands them
        over (False: always the MSI-X vectors, or polling)."""
        self.link = link
        self.poll = poll or not link.interrupts
        self.kick_fds = kick_fds
        # In an appliance VM the window is BAR 4, mapped once at attach: a log placed in it
        # later is reached only through trapped accesses, where an atomic OR is a read and
        # a write apart (a bit another worker set meanwhile is lost): no logging there.
        self.shared_log = not isinstance(link.client, SysfsPciFunction)
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
