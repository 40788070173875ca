"""Interrupts of a PCI function bound to Linux's uio_pci_generic, turned into one eventfd
per interrupt source: what lets a driver in the appliance VM sleep (no VFIO there, whose
MSI-X would need an IOMMU; uio_pci_generic gives INTx).

The kernel's handler masks INTx (Interrupt Disable, in the command register) when the
function's Interrupt Status bit says the interrupt is its own, and counts it on
/dev/uioN. A thread waits there, then:

1. restores the hypervisor's BAR mappings, first, as the back-end's workers may be
   reaching the window meanwhile: QEMU's vfio-user-pci turns them off at an INTx to spot
   the end of interrupt (a BAR access), and with no x-intx-mmap-timeout-ms property they
   stay off while INTx is in use: every access to the consumer's memory in BAR 4 would be
   a message. Setting and clearing MSI-X Enable (function masked: nothing is sent) makes
   it disable INTx — which ends the interrupt and maps the BARs again — and enable it anew;
2. asks `acknowledge()` for the sources that fired: it reads the device's read-to-clear
   cause registers;
3. signals the sources' eventfds;
4. clears Interrupt Disable: a source that fired meanwhile raises the line again (the
   device keeps its level until the cause registers are read).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable

from ..shutdown import readable
from .sysfs_pci import SysfsPciFunction

log = logging.getLogger(__name__)


class UioInterrupts:
    """`count` eventfds (`fds`, the caller's to read), signalled as `acknowledge` says."""

    def __init__(self, fn: SysfsPciFunction, count: int,
                 acknowledge: Callable[[], Iterable[int]]) -> None:
        self.fn = fn
        self.acknowledge = acknowledge
        self.uio = fn.open_uio()
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self.interrupts = 0
        self._thread = threading.Thread(target=self._run, name=f"intx {fn.bdf}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.fn.set_intx_disabled(False)
            while True:
                ready = readable([self.uio, self._stop_r], None)
                if self._stop_r in ready:
                    return
                os.read(self.uio, 4)  # the event count: each wake-up is one interrupt
                self.interrupts += 1
                self.fn.remap_bars()
                fired = list(self.acknowledge())
                for source in fired:
                    os.eventfd_write(self.fds[source], 1)
                self.fn.set_intx_disabled(False)
        except Exception as e:  # the device or its driver is gone: the driver polls on
            log.error("%s: interrupts stopped: %s", self.fn.bdf, e)
            for fd in self.fds:  # wake everyone: they look at the device and find out
                os.eventfd_write(fd, 1)

    def close(self) -> None:
        if self._stop_w < 0:
            return
        os.write(self._stop_w, b"x")
        self._thread.join()
        for fd in (self.uio, self._stop_r, self._stop_w, *self.fds):
            os.close(fd)
        self._stop_w = -1
        self.fds = []
