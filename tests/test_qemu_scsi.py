"""vhost-user-scsi with a QEMU 7.2 guest (Linux's virtio_scsi and sd): two LUNs appear as
disks with the size, vendor, model, serial and WWN we give them; O_DIRECT writes land in the
image; a file system is made and checked on the host; a discard punches a hole in the image;
the read-only LUN refuses writes; a grown image is seen by the running guest."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from qemu_helpers import BackendDaemon, require_guest_prerequisites, require_tool, watchdog

from testbed.guest import GuestVM

MiB = 1 << 20
MODULES = ["virtio_pci", "virtio_scsi", "sd_mod", "ext4"]
SCRIPT = r"""
for b in /sys/block/sd*; do
    n=${b##*/}
    addr=$(basename $(readlink $b/device))
    echo "DISK $addr $n $(cat $b/size) $(cat $b/ro) $(cat $b/device/vendor) \
$(cat $b/device/model | tr ' ' _) $(cat $b/device/wwid) $(tail -c +5 $b/device/vpd_pg80)"
    [ "$addr" = "0:0:0:0" ] && rw=$n
    [ "$addr" = "0:0:0:1" ] && ro=$n
done
echo "FEATURES $(cat /sys/bus/virtio/drivers/virtio_scsi/virtio*/features)"
echo "MAXKB $(cat /sys/block/$rw/queue/max_sectors_kb)"
dd if=/pat of=/dev/$rw bs=64k seek=128 oflag=direct 2>/dev/null
echo "DIRECT $(dd if=/dev/$rw bs=64k skip=128 count=16 iflag=direct 2>/dev/null | sha256sum)"
dd if=/pat of=/dev/$rw bs=64k seek=160 oflag=direct 2>/dev/null
blkdiscard -o $((10 * 1048576 + 262144)) -l 262144 /dev/$rw
echo "DISCARDED $?"
if dd if=/pat of=/dev/$ro bs=4k count=1 oflag=direct 2>/dev/null; then echo "ROWRITE ok";
else echo "ROWRITE refused"; fi
mke2fs -b 4096 /dev/$rw 4096 >/dev/null
mkdir -p /mnt/fs
mount -t ext4 /dev/$rw /mnt/fs
cp /pat /mnt/fs/pat.bin
sync
umount /mnt/fs
before=$(cat /sys/block/$rw/size)
echo RESIZE-NOW
i=0
while [ "$(cat /sys/block/$rw/size)" = "$before" ] && [ $i -lt 300 ]; do
    sleep 0.1; i=$((i + 1))
done
echo "RESIZED $(cat /sys/block/$rw/size)"
"""


@pytest.fixture(scope="module", autouse=True)
def kver() -> str:
    return require_guest_prerequisites()


def test_guest_disks_on_two_luns(tmp_path: Path) -> None:
    debugfs = require_tool("debugfs", "e2fsprogs")
    e2fsck = require_tool("e2fsck", "e2fsprogs")
    rw, ro = tmp_path / "rw.img", tmp_path / "ro.img"
    rw.write_bytes(b"")
    os.truncate(rw, 32 * MiB)
    ro.write_bytes(os.urandom(MiB))
    os.truncate(ro, 16 * MiB)
    pat = os.urandom(MiB)
    args = ["--disk", f"{rw},serial=SER-0,wwn=5000c500a1b2c3d4", "--disk", f"{ro},read-only"]
    with BackendDaemon(tmp_path, "vhost-user-scsi", args, name="scsi") as d:
        vm = GuestVM(SCRIPT, modules=MODULES, timeout=120, files={"pat": pat},
                     qemu_args=["-chardev", f"socket,id=c0,path={d.sock}",
                                "-device", "vhost-user-scsi-pci,chardev=c0"])
        with vm, watchdog(d, vm):
            vm.start()
            vm.wait_for("RESIZE-NOW", 90)
            os.truncate(rw, 48 * MiB)
            result = vm.wait()
        assert result.status == 0, f"{result.console[-3000:]}\n{d.describe()}"
        assert d.stop() == 0, d.describe()
        assert "Traceback" not in d.log, d.describe()
    disks = {f[1]: f[2:] for f in (ln.split() for ln in result.lines if ln.startswith("DISK "))}
    out = dict(ln.split(" ", 1) for ln in result.lines if " " in ln and ln[:4] != "DISK")
    assert sorted(disks) == ["0:0:0:0", "0:0:0:1"], result.console[-3000:]
    _, size, ro_flag, vendor, model, wwid, serial = disks["0:0:0:0"]
    assert (size, ro_flag, vendor, model) == (str(32 * MiB // 512), "0", "VHOSTUSR",
                                              "Python_SCSI_disk")
    assert wwid == "naa.5000c500a1b2c3d4" and serial == "SER-0"
    assert disks["0:0:0:1"][1:3] == [str(16 * MiB // 512), "1"]
    assert out["DIRECT"].split()[0] == hashlib.sha256(pat).hexdigest()
    assert out["DISCARDED"] == "0" and out["ROWRITE"] == "refused"
    assert out["FEATURES"][2] == "1", "the guest did not negotiate VIRTIO_SCSI_F_CHANGE"
    assert int(out["MAXKB"]) >= 512, "the guest splits its I/O small"
    assert out["RESIZED"] == str(48 * MiB // 512)
    data = rw.read_bytes()
    assert data[8 * MiB : 9 * MiB] == pat, "the O_DIRECT write is not in the image"
    assert data[10 * MiB : 10 * MiB + (256 << 10)] == pat[: 256 << 10]
    assert data[10 * MiB + (256 << 10) : 10 * MiB + (512 << 10)] == bytes(256 << 10)
    assert data[10 * MiB + (512 << 10) : 11 * MiB] == pat[512 << 10 :]
    hole = os.lseek(os.open(rw, os.O_RDONLY), 10 * MiB + (256 << 10), os.SEEK_HOLE)
    assert hole == 10 * MiB + (256 << 10), "the discard did not punch a hole"
    fsck = subprocess.run([e2fsck, "-fn", str(rw)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run([debugfs, "-R", "cat /pat.bin", str(rw)], capture_output=True)
    assert cat.stdout == pat
    assert ro.read_bytes()[:MiB] != bytes(MiB) and len(ro.read_bytes()) == 16 * MiB


HOTPLUG_SCRIPT = r"""
echo "BEFORE $(ls /sys/block | grep sd | tr '\n' ' ')"
echo ADD-NOW
i=0; while [ ! -e /sys/block/sdb ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
echo "ADDED $(ls /sys/block | grep sd | tr '\n' ' ')$(cat /sys/block/sdb/size) \
$(tail -c +5 /sys/block/sdb/device/vpd_pg80)"
dd if=/pat of=/dev/sdb bs=64k count=1 oflag=direct 2>/dev/null
echo "WROTE $?"
echo REMOVE-NOW
i=0; while [ -e /sys/block/sdb ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
echo "REMOVED $(ls /sys/block | grep sd | tr '\n' ' ')"
"""


def test_luns_hot_added_and_removed(tmp_path: Path) -> None:
    """`vhost-user-scsi lun add/remove` while the guest runs: Linux's virtio_scsi takes
    the transport-reset events — a new disk appears, takes a write, and goes."""
    a, b, ctl = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "ctl.sock"
    for img in (a, b):
        with open(img, "wb") as f:
            f.truncate(8 * MiB)
    pat = os.urandom(64 << 10)

    def lun(*args: str) -> str:
        out = subprocess.run(["vhost-user-scsi", "lun", "--control", str(ctl), *args],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout

    with BackendDaemon(tmp_path, "vhost-user-scsi", ["--disk", str(a), "--control",
                                                     str(ctl)], name="scsi") as d:
        vm = GuestVM(HOTPLUG_SCRIPT, modules=MODULES, timeout=120, files={"pat": pat},
                     qemu_args=["-chardev", f"socket,id=c0,path={d.sock}",
                                "-device", "vhost-user-scsi-pci,chardev=c0"])
        with vm, watchdog(d, vm):
            vm.start()
            vm.wait_for("ADD-NOW", 90)
            lun("add", f"{b},serial=HOT-ADDED")
            vm.wait_for("REMOVE-NOW", 60)
            lun("remove", "1")
            result = vm.wait()
        assert result.status == 0, f"{result.console[-3000:]}\n{d.describe()}"
        assert d.stop() == 0, d.describe()
        assert "Traceback" not in d.log, d.describe()
    out = dict(ln.split(" ", 1) for ln in result.lines if " " in ln)
    assert out["BEFORE"] == "sda ", result.console[-2000:]
    assert out["ADDED"] == f"sda sdb {8 * MiB // 512} HOT-ADDED", result.console[-2000:]
    assert out["WROTE"] == "0" and out["REMOVED"] == "sda "
    assert b.read_bytes()[: 64 << 10] == pat
