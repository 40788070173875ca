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
   a message. Setting and clearing MSI-X Enable (function masked: no message is sent, and
   the device holds what happens meanwhile for INTx) makes QEMU disable INTx — which ends
   the interrupt and maps the BARs again — and enable it anew;
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
FALLBACK = 0.001  # s between wake-ups of everyone once interrupts have failed


class UioInterrupts:
    """`count` eventfds (`fds`, the caller's to read), signalled as `acknowledge` says
    once `start` has been called — after the process has confined itself: a thread keeps
    the mount namespace and root it was started in."""

    def __init__(self, fn: SysfsPciFunction, count: int,
                 acknowledge: Callable[[], Iterable[int]]) -> None:
        self.fn = fn
        self.acknowledge = acknowledge
        self.fds: list[int] = []
        self.uio = fn.open_uio()
        self._stop_r = self._stop_w = -1
        try:
            self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
            for _ in range(count):
                self.fds.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        except OSError:
            self._close_fds()
            raise
        self.interrupts = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None and self._stop_w >= 0:
            self._thread = threading.Thread(target=self._run, name=f"intx {self.fn.bdf}",
                                            daemon=True)
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
        except Exception as e:
            log.error("%s: interrupts failed (%s): every source is signalled every %g ms "
                      "from now on (the driver polls)", self.fn.bdf, e, FALLBACK * 1000)
            self._fallback()

    def _fallback(self) -> None:
        """Wake every waiter every FALLBACK seconds: each looks at its ring or queue and
        finds its work (or finds the device gone), as in poll mode."""
        while not readable([self._stop_r], FALLBACK):
            for fd in self.fds:
                try:
                    os.eventfd_write(fd, 1)
                except OSError:
                    pass

    def close(self) -> None:
        if self._stop_w < 0:
            return
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join()
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self.uio, self._stop_r, self._stop_w, *self.fds):
            if fd >= 0:
                os.close(fd)
        self.uio = self._stop_r = self._stop_w = -1
        self.fds = []
