"""INTx (pin A) of the virtio-vhost-user device, as a register model over the function's
config space: what an appliance VM's driver uses where it has no MSI-X (no VFIO there,
only uio_pci_generic). Rules (docs/vvu-design.md, "INTx"):

- The *level* is the device's: an event it reported that the driver has not acknowledged
  yet by reading ISR status or the KICKS bitmap (both read-to-clear). The device holds it.
- A vfio-user client gives one trigger eventfd (SET_IRQS index 0). The device signals it
  when the level is high, MSI-X Enable and Interrupt Disable are clear and the line is not
  masked. Signalling masks the line (VFIO_IRQ_INFO_AUTOMASKED): the next signal waits for
  the client's UNMASK, which QEMU sends at the guest's end of interrupt (its next BAR
  access). An UNMASK, a cleared Interrupt Disable or MSI-X Enable, or a new eventfd
  signals again if the level is still high, so nothing is lost between two interrupts.
- Status bit 3 (Interrupt Status) reads 1 while the level is high *or* a signal awaits its
  UNMASK: the client holds the guest's line up until then, and a guest handler that
  believes the status bit (uio_pci_generic's) must not see a raised line with the bit
  clear (it would return IRQ_NONE until the kernel disables the line).
"""

from __future__ import annotations

import os

from .pci import PciConfig


class IntxLine:
    def __init__(self, pci: PciConfig) -> None:
        self.pci = pci
        self.fd: int | None = None
        self.level = False
        self.automasked = False  # signalled, and the client has not unmasked it yet
        self.masked = False  # masked by the client (SET_IRQS MASK)
        self.signals = 0  # how many times the eventfd was signalled

    def set_fd(self, fd: int | None) -> None:
        """SET_IRQS TRIGGER: a new eventfd (None: INTx off); what the old one was
        signalled for is the old one's (its mask by the client stays, as in vfio-pci)."""
        if self.fd is not None:
            os.close(self.fd)
        self.fd = fd
        self.automasked = False
        self.update()

    def mask(self) -> None:
        self.masked = True
        self.update()

    def unmask(self) -> None:
        self.masked = self.automasked = False
        self.update()

    def set_level(self, level: bool) -> None:
        self.level = level
        self.update()

    def update(self) -> None:
        """Interrupt Status, then the signal if the line may be raised now. Call after
        anything the rules depend on changed (the command register, MSI-X Enable)."""
        pci = self.pci
        pci.set_interrupt_status(self.level or self.automasked)
        if (self.level and not self.masked and not self.automasked and self.fd is not None
                and not pci.intx_disabled and not pci.msix_enabled):
            self.automasked = True
            self.signal()

    def signal(self) -> None:
        """Write the eventfd (also SET_IRQS TRIGGER with no data: a test of it)."""
        if self.fd is None:
            return
        self.signals += 1
        try:
            os.eventfd_write(self.fd, 1)
        except OSError:  # saturated (a signal is pending anyway), or not an eventfd
            pass

    def reset(self) -> None:
        """Function reset: level low, unmasked (the eventfd stays the client's)."""
        self.level = self.masked = self.automasked = False
        self.update()

    def close(self) -> None:
        self.set_fd(None)
