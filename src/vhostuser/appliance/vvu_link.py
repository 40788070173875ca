"""The virtio-vhost-user device driven as a guest driver would, from the appliance side:
rxq/txq with posted buffers, MSI-X vectors on eventfds (or INTx, or polling), BACKEND_UP;
messages in and out, the window, the doorbells and the eventfds the device hands over.
transport/vvu.py serves the engine through it; the bridge relays through it. How the
device is reached (vfio-user, or sysfs inside the appliance VM) is `vvu_access.py`'s.
"""

from __future__ import annotations

import logging
import os
import struct
import time

from ..engine.notify import Notifier
from ..protocol.payloads import MemRegion
from ..protocol.virtio_pci import NO_VECTOR, VirtioCfgType
from ..shutdown import StopSignal, readable
from ..sockets import PeerClosed
from ..unix_channel import Idle
from ..vfio_user.client import DeviceError
from ..vvu.abi import (
    CFG_DOORBELL,
    CFG_NOTIFICATION,
    CFG_SHARED_MEMORY,
    FEATURES,
    KICK_FD_VECTOR,
    KICK_FDS,
    KICKS,
    S_BACKEND_UP,
    S_FRONTEND_UP,
)
from .uio import UioInterrupts
from .virtio_pci import VirtioPciDriver
from .vvu_access import open_access

log = logging.getLogger(__name__)

V_CONFIG, V_RXQ, V_TXQ, V_FIRST_VRING = 0, 1, 2, 3
RX_BUFFERS, BUFFER_SIZE = 32, 8192  # a message is at most 12 + 4096 bytes
POLL_INTERVAL = 0.0005  # seconds between looks at rxq with no interrupts
STATUS_POLL = 0.05  # seconds between reads of the status register with no interrupts


class LinkError(Exception):
    """The device is not what the link needs: not a virtio-vhost-user device, a doorbell
    or a vring it does not have."""


class TxqFull(ConnectionError):
    """No txq buffer is free: the device does not consume what we send."""


class VvuLink:
    def __init__(self, device: str, poll: bool = False) -> None:
        """`device`: the device's vfio-user socket, or ``pci:`` and its PCI address on this
        machine's bus (inside the appliance VM: INTx through uio_pci_generic, unless
        `poll`, or the driver is missing, and then no interrupts at all)."""
        self.access = open_access(device)
        self.client = self.access.function  # the registers
        self.ram = self.access.ram
        self.interrupts = self.access.msix
        self.uio: UioInterrupts | None = None
        self._status, self._status_until = 0, 0.0
        try:
            self.pci = VirtioPciDriver(self.client, self.ram)
        except BaseException:
            self.access.close()
            raise
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
        self.access.started()
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
        False (poll mode) where there is none to take."""
        self.uio = self.access.intx(count, self._acknowledge)
        if self.uio is None:
            return False
        self.pci.vectors = list(self.uio.fds)
        return True

    def _acknowledge(self) -> list[int]:
        """INTx: the vectors whose sources fired, from ISR status (config change; a queue:
        rxq or txq) and the KICKS bitmap (vring i: V_FIRST_VRING + i), both read-to-clear."""
        isr_cap, note = self.pci.caps[VirtioCfgType.ISR], self.pci.caps[CFG_NOTIFICATION]
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
        consumer's memory that holds it."""
        return self.access.window_view(self.pci.caps[CFG_SHARED_MEMORY], desc)

    def window_fd(self, desc: MemRegion) -> tuple[int, int]:
        """An fd that another process can mmap for region `desc`, and the region's offset
        in it (the caller closes the fd): the BAR's sysfs file inside the appliance VM,
        the consumer's memory file that the device offers as a vfio-user region outside."""
        return self.access.window_fd(self.pci.caps[CFG_SHARED_MEMORY], desc)

    def doorbell(self, offset: int) -> Notifier:
        """What rings the doorbell at `offset`: its ioeventfd (vfio-user), or an MMIO write
        (on the PCI bus, where the hypervisor forwards it to the device)."""
        notifier = self.access.doorbell(self.pci.caps[CFG_DOORBELL], offset)
        if notifier is None:
            raise LinkError(f"the device has no doorbell eventfd at {offset:#x}")
        return notifier

    def doorbell_fd(self, offset: int) -> int | None:
        """A dup of the ioeventfd behind the doorbell at `offset`, if the device has one
        (on a PCI bus a doorbell is an MMIO write, with no eventfd)."""
        return self.access.io_fd(self.pci.caps[CFG_DOORBELL].bar, offset)

    def kick_fd(self, vring: int) -> int | None:
        """The consumer's own kick eventfd of `vring` (a dup, the caller's to close),
        which the device then stops reading: over vfio-user, where the device offers it
        (KICK_FD_VECTOR); None elsewhere, and then the vring has no vector (the caller
        sets one). The device may have taken a kick meanwhile: signal the fd once after
        handing it on."""
        if not self.access.hands_over_fds or vring >= self.max_queues:
            return None
        cap = self.pci.caps[CFG_NOTIFICATION]
        found = None
        try:
            self.notification_vector(vring, KICK_FD_VECTOR)
            found = self.access.io_fd(cap.bar, cap.offset + KICK_FDS + 4 * vring)
        except DeviceError as e:
            log.warning("vring %d: the device does not hand over its kick eventfd: %s",
                        vring, e)
        if found is None:  # an older device, or the vring has no kick fd (any more)
            self.notification_vector(vring, NO_VECTOR)
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
        self.access.close()
