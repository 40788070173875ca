"""INTx of the virtio-vhost-user device, driven over vfio-user as QEMU drives it under TCG
(one trigger eventfd; UNMASK at the guest's end of interrupt; Interrupt Disable and MSI-X
Enable written through to the device) and as uio_pci_generic relies on it (Interrupt
Status in the status register). The rules are the kernel vfio-pci's for INTx (level
triggered, automasked when signalled) and PCI's (Interrupt Disable: no INTx asserted)."""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_vvu_device import Device, consumer

from vhostuser.appliance.virtio_pci import VirtioPciDriver
from vhostuser.protocol import FrontendReq, request
from vhostuser.protocol import payloads as p
from vhostuser.protocol.virtio_pci import NO_VECTOR, VirtioCfgType
from vhostuser.unix_channel import UnixChannel
from vhostuser.vfio_user import protocol as vp
from vhostuser.vfio_user.client import VfioUserClient
from vhostuser.virtq.guest_ram import GuestRam
from vhostuser.virtq.split_driver import DriverRing
from vhostuser.vvu.abi import CFG_NOTIFICATION, KICKS, S_BACKEND_UP

CONFIG = 7
COMMAND, STATUS, INTERRUPT_PIN = 0x04, 0x06, 0x3D
INTX_DISABLE, INTERRUPT_STATUS = 0x400, 0x08
FEATURES = (1 << 32) | (1 << 28) | (1 << 29)


class IntxDriver:
    """A driver with no MSI-X eventfds: config and rxq events enabled (any vector), txq
    not (NO_VECTOR)."""

    def __init__(self, dev: Device) -> None:
        self.dev = dev
        self.client = VfioUserClient(dev.vfu)
        self.ram = GuestRam(1 << 20, guest_addr=0x1_0000_0000)
        self.pci = VirtioPciDriver(self.client, self.ram)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK)
        self.client.set_irq_eventfds(vp.PciIrq.INTX, 0, [self.efd])
        self.pci.init(FEATURES, config_vector=0)
        self.rxq: DriverRing = self.pci.setup_queue(0, 64, 0)
        self.pci.setup_queue(1, 64, NO_VECTOR)
        for _ in range(16):
            self.rxq.add([(self.ram.alloc(4096), 4096, True)])
        self.pci.driver_ok()
        self.pci.kick(0)
        self.pci.config_write(0, struct.pack("<I", S_BACKEND_UP))

    def signalled(self) -> bool:
        """Whether the device signalled INTx (checked after a round trip to it: every
        signal it decided on before answering is in the eventfd by then)."""
        self.client.read(CONFIG, 0, 4)
        if not select.select([self.efd], [], [], 0)[0]:
            return False
        os.eventfd_read(self.efd)
        return True

    def wait_signal(self, timeout: float = 5.0) -> None:
        assert select.select([self.efd], [], [], timeout)[0], "no INTx"
        os.eventfd_read(self.efd)

    def status_bit(self) -> bool:
        return bool(self.client.read_u(CONFIG, STATUS, 2) & INTERRUPT_STATUS)

    def command(self, set_bits: int = 0, clear_bits: int = 0) -> None:
        cmd = self.client.read_u(CONFIG, COMMAND, 2)
        self.client.write_u(CONFIG, COMMAND, 2, (cmd | set_bits) & ~clear_bits)

    def isr(self) -> int:
        cap = self.pci.caps[VirtioCfgType.ISR]
        return self.client.read_u(cap.bar, cap.offset, 1)

    def kicks(self) -> int:
        cap = self.pci.caps[CFG_NOTIFICATION]
        return self.client.read_u(cap.bar, cap.offset + KICKS, 4)

    def eoi(self) -> None:
        self.client.unmask_irq(vp.PciIrq.INTX)

    def message_arrives(self, fe: UnixChannel) -> None:
        """The consumer sends a message (one with no reply: the device relays the next
        only once a reply is in); wait until the device has put it in rxq."""
        fe.send(request(FrontendReq.SET_OWNER))
        deadline = time.monotonic() + 5
        while not self.rxq.take_used():
            assert time.monotonic() < deadline, "the message did not reach rxq"
            time.sleep(0.001)

    def close(self) -> None:
        self.pci.close()
        self.client.close()
        self.ram.close()
        os.close(self.efd)


@pytest.fixture
def intx(tmp_path: Path) -> Iterator[IntxDriver]:
    dev = Device(tmp_path, "--max-queues", "40")
    drv = IntxDriver(dev)
    yield drv
    drv.close()
    dev.stop()


def test_intx_is_offered_as_vfio_pci_offers_it(intx: IntxDriver) -> None:
    info = intx.client.irq_info(vp.PciIrq.INTX)
    assert info.count == 1
    assert info.flags == (vp.IrqInfoFlag.EVENTFD | vp.IrqInfoFlag.MASKABLE
                          | vp.IrqInfoFlag.AUTOMASKED)
    assert intx.client.read_u(CONFIG, INTERRUPT_PIN, 1) == 1  # INTA#
    # uio_pci_generic's probe: Interrupt Disable must toggle and read back
    intx.command(set_bits=INTX_DISABLE)
    assert intx.client.read_u(CONFIG, COMMAND, 2) & INTX_DISABLE
    intx.command(clear_bits=INTX_DISABLE)
    assert not intx.client.read_u(CONFIG, COMMAND, 2) & INTX_DISABLE


def test_level_automask_and_end_of_interrupt(intx: IntxDriver) -> None:
    dev = intx.dev
    assert not intx.signalled() and not intx.status_bit()
    fe = consumer(dev.vhost)
    intx.wait_signal()  # FRONTEND_UP: a config change
    assert intx.status_bit()
    intx.message_arrives(fe)  # a queue event while the line is masked: no second signal
    assert not intx.signalled()
    intx.eoi()  # the level is still high: signalled again at once
    assert intx.signalled()
    assert intx.isr() == 3  # queue and config; read-to-clear
    assert intx.status_bit()  # the signal still awaits its end of interrupt
    intx.eoi()
    assert not intx.status_bit() and not intx.signalled() and intx.isr() == 0
    # a new event after the end of interrupt: one signal
    intx.message_arrives(fe)
    assert intx.signalled() and intx.status_bit()
    assert intx.isr() == 1
    intx.eoi()
    assert not intx.signalled()
    fe.close()


def test_interrupt_disable_holds_the_signal_back(intx: IntxDriver) -> None:
    dev = intx.dev
    fe = consumer(dev.vhost)
    intx.wait_signal()
    intx.isr()
    intx.command(set_bits=INTX_DISABLE)  # what uio_pci_generic's handler does
    intx.eoi()
    intx.message_arrives(fe)
    assert not intx.signalled()
    assert intx.status_bit()  # the status shows the level, disabled or not
    intx.command(clear_bits=INTX_DISABLE)  # the driver is done: the held event is signalled
    assert intx.signalled()
    assert intx.isr() == 1
    intx.eoi()
    assert not intx.status_bit()
    fe.close()


def test_kicks_bitmap_says_which_vrings(intx: IntxDriver) -> None:
    dev = intx.dev
    cap = intx.pci.caps[CFG_NOTIFICATION]
    fe = consumer(dev.vhost)
    intx.wait_signal()
    kicks = {}
    for vring, vector in ((1, 7), (33, 0), (2, NO_VECTOR)):  # 2: no vector, no interrupt
        intx.client.write(cap.bar, cap.offset, struct.pack("<HH", vring, vector))
        kicks[vring] = os.eventfd(0, os.EFD_NONBLOCK)
        fe.send(request(FrontendReq.SET_VRING_KICK, p.VringFile.make(vring)), (kicks[vring],))
    deadline = time.monotonic() + 5
    got = 0
    while got < 3:
        assert time.monotonic() < deadline
        got += len(intx.rxq.take_used())
    intx.isr()
    intx.eoi()
    while intx.signalled():  # whatever the messages raised, acknowledged
        intx.isr()
        intx.eoi()
    os.eventfd_write(kicks[2], 1)
    assert not intx.signalled()
    word = {0: cap.offset + KICKS, 1: cap.offset + KICKS + 4}  # vrings 0..31, 32..63
    os.eventfd_write(kicks[33], 1)
    intx.wait_signal()
    assert intx.isr() == 0  # a kick is no queue or config event
    assert intx.client.read_u(cap.bar, word[1], 4) == 1 << (33 - 32)
    assert intx.client.read_u(cap.bar, word[1], 4) == 0  # read-to-clear
    intx.eoi()
    assert not intx.signalled() and not intx.status_bit()
    os.eventfd_write(kicks[1], 1)
    intx.wait_signal()
    assert intx.status_bit()
    assert intx.client.read_u(cap.bar, word[0], 8) == 1 << 1  # both words in one read
    intx.eoi()
    assert not intx.status_bit() and not intx.signalled()
    for fd in kicks.values():
        os.close(fd)
    fe.close()


def test_no_intx_while_msix_is_enabled(intx: IntxDriver) -> None:
    dev = intx.dev
    config = intx.client.read(CONFIG, 0, 256)
    at = config[0x34]
    while config[at] != 0x11:  # the MSI-X capability
        at = config[at + 1]
    control = struct.unpack_from("<H", config, at + 2)[0]
    cap = intx.pci.caps[CFG_NOTIFICATION]
    intx.client.write(cap.bar, cap.offset, struct.pack("<HH", 1, 7))  # vring 1: a vector
    fe = consumer(dev.vhost)
    intx.wait_signal()
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    fe.send(request(FrontendReq.SET_VRING_KICK, p.VringFile.make(1)), (kick,))
    deadline = time.monotonic() + 5
    while not intx.rxq.take_used():
        assert time.monotonic() < deadline
    intx.isr()
    intx.eoi()
    intx.signalled()
    # MSI-X enabled: events are MSI-X's (this driver gave no eventfds): no INTx, none held
    intx.client.write_u(CONFIG, at + 2, 2, control | 0x8000)
    intx.message_arrives(fe)
    assert not intx.signalled()
    intx.client.write_u(CONFIG, at + 2, 2, control)
    assert not intx.signalled() and intx.kicks() == 0
    # enabled with the function masked, as the appliance's driver passes through to have
    # QEMU map the BARs again (appliance/uio.py): a kick meanwhile is held, not lost
    intx.client.write_u(CONFIG, at + 2, 2, control | 0x8000 | 0x4000)
    os.eventfd_write(kick, 1)
    intx.client.read(CONFIG, 0, 4)
    deadline = time.monotonic() + 5
    while not intx.status_bit():  # the device has taken the kick: the level is up
        assert time.monotonic() < deadline, "the kick was not seen"
    assert not intx.signalled()
    intx.client.write_u(CONFIG, at + 2, 2, control)  # INTx again: raised at once
    assert intx.signalled() and intx.kicks() == 1 << 1
    intx.eoi()
    assert not intx.signalled()
    os.close(kick)
    fe.close()
