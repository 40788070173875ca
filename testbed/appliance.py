"""The appliance as a VM: a Linux guest under stock QEMU (≥ 10.1: Debian sid's, from the
chroot of ``scripts/sid-qemu``) with the virtio-vhost-user device attached over vfio-user,
running one of our back-ends *inside* it with ``--vvu pci:ADDRESS``.

The guest is the usual throw-away busybox initramfs (`testbed.guest.GuestVM`). It runs the
host's Python and this package from a read-only 9p share of the host's root file system
(chroot), so nothing is installed into it; a second, writable share (`share`, seen as /mnt
inside) holds the back-end's files, e.g. the disk image.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .guest import GuestError, GuestVM

SID_QEMU = Path(__file__).resolve().parents[1] / "scripts" / "sid-qemu"
MODULES = ["virtio_pci", "9pnet_virtio", "9p", "tun", "uio_pci_generic"]
READY = "APPLIANCE pci:"  # printed with the device's address before the back-end starts

SCRIPT = r"""
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro host /host
mount -t 9p -o trans=virtio,version=9p2000.L share /host/mnt
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs dev /host/dev
# scratch space on /run, not over /tmp: a checkout under the host's /tmp stays visible
mount -t tmpfs run /host/run
echo 1 > /proc/sys/vm/nr_hugepages
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor) $(cat $d/device)" = "0x1af4 0x107f" ] && bdf=${d##*/}
done
[ -n "$bdf" ] || { echo "appliance: no virtio-vhost-user device on the PCI bus"; exit 1; }
vvu=pci:$bdf
echo "@READY@$bdf"
TMPDIR=/run chroot /host @PYTHON@ -m @BACKEND@ &
backend=$!
@AFTER@
wait $backend
"""


def wait_backend_up(vm: GuestVM, device_log: Path, timeout: float = 120) -> None:
    """Wait until the back-end in the appliance has brought the device up (the device logs
    BACKEND_UP); fail at once, with the appliance's console, if the appliance ends first."""
    deadline = time.monotonic() + timeout
    while "driver set BACKEND_UP" not in device_log.read_text(errors="replace"):
        if vm.proc is None or vm.proc.poll() is not None or time.monotonic() > deadline:
            what = "timed out" if time.monotonic() > deadline else "ended"
            raise GuestError(f"the appliance {what} before its back-end brought the device "
                             f"up:\n{vm.console[-3000:]}")
        time.sleep(0.05)


def qemu_wrapper(directory: Path) -> str:
    """A ``qemu-system-x86_64`` for `GuestVM`: sid's QEMU, seeing the host root (-H)."""
    if not SID_QEMU.exists():
        raise FileNotFoundError(f"{SID_QEMU} not found: the appliance VM needs the "
                                "project's checkout (scripts/sid-qemu)")
    wrapper = directory / "qemu-system-x86_64"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(str(SID_QEMU))} run -H -- "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def _with_vvu(arg: str) -> str:
    """`arg` for the shell, double-quoted so that {vvu} becomes the device's $vvu."""
    safe = "".join("\\" + c if c in '"$`\\' else c for c in arg)
    return '"' + safe.replace("{vvu}", "$vvu") + '"'


def appliance_vm(vfio_user_socket: Path, share: Path, backend: Sequence[str], qemu: str,
                 *, after: str = "", mem_mb: int = 384, timeout: float = 300,
                 modules: Sequence[str] = (), qemu_args: Sequence[str] = ()) -> GuestVM:
    """The appliance guest, not started. `backend`: a module and its arguments, where
    ``{vvu}`` stands for the device (``pci:ADDRESS``); without it, ``--vvu pci:ADDRESS`` is
    appended (``["vhostuser.cli.blk", "--blk-file", "/mnt/disk.img"]``). `after`: shell
    run in the guest once the back-end has started (e.g. to configure its TAP device); the
    guest's script ends when the back-end does. `modules` and `qemu_args`: more of them
    (e.g. a disk of the appliance's own: ``-drive`` and ``virtio_blk``)."""
    args = [_with_vvu(a) if "{vvu}" in a else shlex.quote(a) for a in backend]
    if not any("{vvu}" in a for a in backend):
        args += ["--vvu", '"$vvu"']
    script = (SCRIPT.replace("@READY@", READY).replace("@PYTHON@", shlex.quote(sys.executable))
              .replace("@BACKEND@", " ".join(args)).replace("@AFTER@", after))
    device = json.dumps({"driver": "vfio-user-pci",
                         "socket": {"type": "unix", "path": str(vfio_user_socket)}})
    return GuestVM(script, qemu_binary=qemu, modules=[*MODULES, *modules], mem_mb=mem_mb,
                   timeout=timeout,
                   qemu_args=["-cpu", "max",  # numpy needs more than TCG's qemu64 (SSE4.2)
                              "-device", device,
                              "-virtfs", "local,path=/run/host,mount_tag=host,"
                                         "security_model=none,readonly=on,multidevs=remap",
                              "-virtfs", f"local,path={share},mount_tag=share,"
                                         "security_model=none", *qemu_args])
