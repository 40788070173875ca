"""A Linux guest under stock QEMU 11.1 (Debian sid, in a chroot) with our
virtio-vhost-user device attached over vfio-user sees it on its PCI bus: IDs, BAR sizes
and the capability list are read from sysfs inside the guest."""

from __future__ import annotations

import json
import shlex
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from daemon import Program

from testbed.guest import GuestVM

ROOT = Path(__file__).resolve().parent.parent
SID_QEMU = ROOT / "scripts" / "sid-qemu"

SCRIPT = r"""
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x107f ]; then
    echo "ID $(cat $d/vendor) $(cat $d/device) $(cat $d/class)" \
         "$(cat $d/subsystem_vendor) $(cat $d/subsystem_device)"
    i=0
    while read start end flags; do echo "BAR $i $start $end $flags"; i=$((i+1)); done < $d/resource
    echo "CFG $(od -An -v -tx1 $d/config | tr -d ' \n')"
  fi
done
"""


@pytest.fixture(scope="module")
def qemu11(tmp_path_factory: pytest.TempPathFactory) -> str:
    r = subprocess.run([str(SID_QEMU), "setup"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"sid QEMU chroot setup failed:\n{r.stdout}\n{r.stderr}"
    wrapper = tmp_path_factory.mktemp("qemu11") / "qemu-system-x86_64"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(str(SID_QEMU))} run -- "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def caps(cfg: bytes) -> list[tuple[int, bytes]]:
    """(cap id, bytes from the cap) for each capability in the list."""
    out, ptr, seen = [], cfg[0x34], set()
    while ptr and ptr not in seen:
        seen.add(ptr)
        out.append((cfg[ptr], cfg[ptr:]))
        ptr = cfg[ptr + 1]
    return out


def test_guest_sees_the_device(qemu11: str, tmp_path: Path) -> None:
    vfu, vhost = str(tmp_path / "vfu.sock"), str(tmp_path / "vhost.sock")
    dev = Program.python(["vhostuser.cli.vvu_device", "--vfio-user-socket", vfu,
                          "--socket-path", vhost, "--max-queues", "32", "--window-size",
                          "512M", "-v"], tmp_path / "device.log", ready=[vhost, vfu])
    try:
        device = json.dumps({"driver": "vfio-user-pci",
                             "socket": {"type": "unix", "path": vfu}})
        with GuestVM(SCRIPT, modules=["virtio_pci"], qemu_binary=qemu11, timeout=180,
                     qemu_args=["-device", device]) as vm:
            result = vm.run()
        assert result.status == 0, result.console[-3000:]
        lines = {ln.split(" ", 1)[0]: ln for ln in result.lines if ln[:3] in ("ID ", "CFG")}
        assert lines["ID"].split()[1:] == ["0x1af4", "0x107f", "0xff0000", "0x1af4", "0x0040"]
        bars = {}
        for ln in result.lines:
            if ln.startswith("BAR "):
                _, i, start, end, flags = ln.split()
                if int(start, 16):
                    bars[int(i)] = (int(end, 16) - int(start, 16) + 1, int(flags, 16))
        assert {i: size for i, (size, _) in bars.items()} == {
            0: 0x4000, 1: 0x1000, 2: 0x2000, 4: 512 << 20}
        assert bars[4][1] & 0x2000, "BAR 4 is not prefetchable"  # IORESOURCE_PREFETCH
        cfg = bytes.fromhex(lines["CFG"].split()[1])
        assert len(cfg) >= 256 and cfg[6] & 0x10  # capability list present
        found = caps(cfg)
        virtio = {c[3]: c for cid, c in found if cid == 0x09}  # by cfg_type
        assert sorted(virtio) == [1, 2, 3, 4, 6, 7, 8]
        bar_of = {t: c[4] for t, c in virtio.items()}
        assert bar_of == {1: 0, 2: 0, 3: 0, 4: 0, 6: 2, 7: 2, 8: 4}
        assert struct.unpack_from("<I", virtio[2], 16)[0] == 4  # notify_off_multiplier
        assert struct.unpack_from("<I", virtio[6], 16)[0] == 4  # doorbell_off_multiplier
        shm_len = struct.unpack_from("<I", virtio[8], 12)[0] | struct.unpack_from(
            "<I", virtio[8], 20)[0] << 32
        assert virtio[8][5] == 0 and shm_len == 512 << 20  # shmid 0, the whole window
        msix = [c for cid, c in found if cid == 0x11]
        assert len(msix) == 1 and (struct.unpack_from("<H", msix[0], 2)[0] & 0x7FF) + 1 == 35
    finally:
        assert dev.stop() == 0, dev.log()
    text = dev.log()
    assert "vfio-user client connected" in text and "Traceback" not in text


def test_the_appliance_sees_a_checkout_on_a_file_system_of_its_own(
        qemu11: str, tmp_path: Path) -> None:
    """`sid-qemu run -H` shows the appliance VM the host's root, from which it runs this
    checkout: a checkout on a mount of its own (a tmpfs /tmp, a /home partition), here a
    mount inside another one and a space in its path, is there too, read-only; a bind of
    / alone left it empty."""
    outer = tmp_path / "separate"
    mnt = outer / "inner mount"
    outer.mkdir()
    mounted = []
    try:
        subprocess.run(["mount", "-t", "tmpfs", "outer", str(outer)], check=True)
        mounted.append(outer)
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "inner", str(mnt)], check=True)
        mounted.append(mnt)
        checkout = mnt / "a checkout"
        (checkout / "scripts").mkdir(parents=True)
        shutil.copy(SID_QEMU, checkout / "scripts")
        (checkout / "marker").write_text("seen\n")
        inside = f"/run/host{checkout}/marker"
        r = subprocess.run([str(checkout / "scripts" / "sid-qemu"), "exec", "-H", "--", "sh",
                            "-c", f'cat "{inside}"; echo x > "{inside}.new" || echo READ-ONLY'],
                           capture_output=True, text=True, timeout=60)
        assert r.stdout.split() == ["seen", "READ-ONLY"], r.stdout + r.stderr
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", "--lazy", str(m)], check=False)
