"""The seeds' diagram with both sides in VMs: the appliance is a Linux guest under stock
QEMU 11.1 with the virtio-vhost-user device attached over vfio-user, and our unchanged
vhost-user-blk runs *inside it* (`--vvu pci:ADDRESS`: the device on the guest's own PCI
bus, driven from user space through sysfs, sleeping on the device's INTx through
uio_pci_generic, or polling with --poll). A QEMU 7.2 consumer guest's virtio-blk disk is
served by it.

    consumer guest --> QEMU 7.2 --vhost-user--> vhost-user-vvu-device --vfio-user-->
        QEMU 11.1 --PCI--> appliance guest: vhost-user-blk --vvu pci:...

The consumer keeps its RAM in the device's window file (--window-file), which the
appliance's QEMU maps into BAR 4 when it attaches the device: the appliance reads the
consumer's rings and buffers with no exit and no message. The device log proves it: no
window access is trapped in poll mode, and with INTx only the few made between an
interrupt and the appliance having QEMU map the BARs again. The appliance runs the host's
Python and this checkout from a read-only 9p share of the host's root; the disk image is
on a second, writable share."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qemu_helpers import CHECKOUT
from test_qemu_vvu import PATTERN_AT, SCRIPT, start_device
from test_vvu_qemu import qemu11  # noqa: F401  (fixture)

from testbed.appliance import READY, appliance_vm, qemu_wrapper, wait_backend_up
from testbed.guest import GuestVM

MB = 1 << 20
CONSUMER_MB = 256
REREAD = r"""
dd if=/dev/vda bs=1M skip=8 count=1 iflag=direct 2>/dev/null | sha256sum | sed 's/^/READBACK /'
"""


@pytest.fixture
def qemu11_host_root(qemu11: str, tmp_path_factory: pytest.TempPathFactory) -> str:  # noqa: F811
    """sid QEMU 11.1 (set up by the qemu11 fixture) that also sees the host's root."""
    return qemu_wrapper(tmp_path_factory.mktemp("qemu11-host"))


def trapped_and_intx(device_log: str) -> list[tuple[int, int]]:
    """Per consumer session: (window accesses trapped, INTx signals), from the counts the
    device logs, and then zeroes, after "consumer session ended" — and once more when it
    exits (what came after the last session: added to it)."""
    out: list[tuple[int, int]] = []
    for line in device_log.splitlines():
        words = line.split()
        counts = "trapped during the session" in line or "INTx raised" in line
        if "consumer session ended" in line or (counts and not out):
            out.append((0, 0))
        if "window access(es) trapped during the session" in line:
            out[-1] = (out[-1][0] + int(words[words.index("INFO:") + 1]), out[-1][1])
        elif "INTx raised" in line:
            out[-1] = (out[-1][0], out[-1][1] + int(words[words.index("raised") + 1]))
    return out


def assert_window_mapped(device_log: str) -> None:
    """The appliance's QEMU mapped the window: in poll mode no window access is a message;
    with INTx only those made between an interrupt and the appliance having QEMU map the
    BARs again (appliance/uio.py): up to ~40 per interrupt with a back-end that polls the
    window nonstop on every vCPU (testpmd), up to ~8 for ours, where a session touches the window
    10^4 to 10^5 times (all of them messages, were the BARs not mapped again)."""
    sessions = trapped_and_intx(device_log)
    assert sessions, "no consumer session ended"
    for trapped, intx in sessions:
        assert trapped <= 100 * intx, f"(trapped, INTx) per session: {sessions}"


@pytest.mark.parametrize("mode", [[], ["--poll"]], ids=["interrupt", "poll"])
def test_consumer_disk_served_from_an_appliance_vm(qemu11_host_root: str, tmp_path: Path,
                                                   mode: list[str]) -> None:
    img, vfu, vhost = tmp_path / "disk.img", tmp_path / "vfu.sock", tmp_path / "vhost.sock"
    window = tmp_path / "window.mem"
    with open(img, "wb") as f:
        f.truncate(32 * MB)
    pattern = os.urandom(MB)
    dev = start_device(tmp_path, "--window-size", "512M", "--window-file", str(window))
    try:
        appliance = appliance_vm(vfu, tmp_path, ["vhostuser.cli.blk", "--blk-file",
                                                 "/mnt/disk.img", "-v", *mode], qemu11_host_root)
        consumer = GuestVM(SCRIPT, modules=["virtio_pci", "virtio_blk", "ext4"], timeout=200,
                           errexit=True, files={"/pattern": pattern}, mem_mb=CONSUMER_MB,
                           mem_path=str(window),
                           qemu_args=["-chardev", f"socket,id=c0,path={vhost}",
                                      "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"])
        with appliance, consumer:
            try:
                appliance.start()
                appliance.wait_for(READY, 120)
                wait_backend_up(appliance, tmp_path / "device.log")
                result = consumer.run()
                # the consumer restarts (same RAM file): the appliance serves it again
                # without its QEMU remapping anything
                again = GuestVM(REREAD, modules=["virtio_pci", "virtio_blk"], timeout=200,
                                mem_mb=CONSUMER_MB, mem_path=str(window),
                                qemu_args=consumer.qemu_args)
                with again:
                    second = again.run()
            finally:
                (tmp_path / "appliance.log").write_text(appliance.console)
        assert result.status == 0, (result.console[-3000:] + "\n--- appliance ---\n"
                                    + appliance.console[-3000:])
        assert second.status == 0, second.console[-3000:]
        reread = [ln for ln in second.lines if ln.startswith("READBACK ")]
        assert reread and reread[0].split()[1] == hashlib.sha256(pattern).hexdigest()
        out = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in result.lines if " " in ln}
        digest = hashlib.sha256(pattern).hexdigest()
        assert out["SIZE"] == str(32 * MB // 512)
        assert out["READBACK"].split()[0] == digest
        assert out["COPY"].split()[0] == digest
        assert out["FILE"] == "through virtio-vhost-user"
        data = img.read_bytes()  # written by the appliance VM, checked on the host
        assert data[PATTERN_AT : PATTERN_AT + MB] == pattern
        fs = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
        assert fs.returncode == 0, fs.stdout + fs.stderr
    finally:
        if dev.poll() is None:
            dev.send_signal(signal.SIGTERM)
        code = dev.wait(15)
    log = (tmp_path / "device.log").read_text()
    assert code == 0 and "Traceback" not in log, log[-3000:]
    assert log.count("consumer connected") == 2
    sessions = trapped_and_intx(log)
    assert len(sessions) == 2
    if mode:  # poll mode: no interrupt, and not one access to the window is a message
        assert "interrupts: INTx" not in appliance.console
        assert "window access trapped" not in log, "the appliance's QEMU did not map the window"
        assert sessions == [(0, 0), (0, 0)]
    else:
        # the back-end sleeps on INTx: the device raised it in both sessions, and after
        # each interrupt the appliance had QEMU map the BARs again: only accesses made
        # between an interrupt and that are messages (a session touches the window some
        # 10^5 times: mkfs, 1 MiB written and read back, a file copied)
        assert "interrupts: INTx through uio_pci_generic" in appliance.console
        assert all(intx > 0 for _, intx in sessions), sessions
        assert_window_mapped(log)


def test_the_readme_demo(qemu11: str, tmp_path: Path) -> None:  # noqa: F811
    """`scripts/demo`'s program, as the README runs it (default: the appliance VM)."""
    r = subprocess.run([sys.executable, "-m", "testbed.demo", "--keep", str(tmp_path)],
                       capture_output=True, text=True, timeout=400, cwd=CHECKOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "appliance: the device is pci:0000:" in r.stdout
    assert "host: debugfs reads /hello.txt from disk.img: written by the guest" in r.stdout
    assert "in an appliance VM, through the virtio-vhost-user device" in r.stdout


def test_consumer_nic_served_from_an_appliance_vm(qemu11_host_root: str,
                                                  tmp_path: Path) -> None:
    """Network: the consumer guest's NIC is a port of our switch running inside the
    appliance VM (`vhost-user-switch --port vvu=pci:ADDRESS --tap vtap0`); the appliance's
    own kernel is at the far end of the TAP uplink. The consumer pings it and sends it a
    file whose checksum must match on arrival."""
    from qemu_net_helpers import NET_MODULES, mac, net_qemu_args
    from test_qemu_net import B_IP, SENDER

    vfu, vhost, window = tmp_path / "vfu.sock", tmp_path / "vhost.sock", tmp_path / "win.mem"
    dev = start_device(tmp_path, "--window-size", "512M", "--window-file", str(window))
    receiver = f"""
i=0
until ip link show vtap0 >/dev/null 2>&1 || [ $i -ge 300 ]; do i=$((i+1)); sleep 0.2; done
ip addr add {B_IP}/24 dev vtap0
ip link set vtap0 up
echo TAP-UP
timeout 100 nc -l -p 5000 > /tmp/f
echo "DST $(sha256sum < /tmp/f)"
echo RECEIVED
kill $backend
"""
    try:
        appliance = appliance_vm(vfu, tmp_path, ["vhostuser.cli.switch", "--port",
                                                 "vvu={vvu}", "--tap", "vtap0", "-v"],
                                 qemu11_host_root, after=receiver)
        consumer = GuestVM(SENDER, modules=NET_MODULES, timeout=200, mem_mb=CONSUMER_MB,
                           mem_path=str(window), qemu_args=net_qemu_args(vhost, mac(1)))
        with appliance, consumer:
            try:
                appliance.start()
                wait_backend_up(appliance, tmp_path / "device.log")
                appliance.wait_for("TAP-UP", 60)
                result = consumer.run()
                appliance.wait_for("RECEIVED", 60)
            finally:
                (tmp_path / "appliance.log").write_text(appliance.console)
        assert result.status == 0, result.console[-3000:]
        out = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in result.lines if " " in ln}
        assert out["PING_RC"] == "0" and " 0% packet loss" in out["PING"], out
        dst = [ln for ln in appliance.console.splitlines() if ln.startswith("DST ")]
        assert dst and dst[0].split()[1] == out["SRC"].split()[0], (dst, out["SRC"])
    finally:
        if dev.poll() is None:
            dev.send_signal(signal.SIGTERM)
        code = dev.wait(15)
    log = (tmp_path / "device.log").read_text()
    assert code == 0 and "Traceback" not in log, log[-3000:]
    assert_window_mapped(log)


def test_consumer_hwrng_served_from_an_appliance_vm(qemu11_host_root: str,
                                                   tmp_path: Path) -> None:
    """Entropy: the consumer's virtio-rng is served by our unchanged vhost-user-rng inside
    the appliance VM, from a source file on the appliance's share; what the consumer reads
    from /dev/hwrng is a run of that file."""
    from test_qemu_rng import SCRIPT as RNG_SCRIPT

    vfu, vhost, window = tmp_path / "vfu.sock", tmp_path / "vhost.sock", tmp_path / "win.mem"
    source = os.urandom(1 << 20)
    (tmp_path / "source").write_bytes(source)
    dev = start_device(tmp_path, "--window-size", "512M", "--window-file", str(window))
    try:
        appliance = appliance_vm(vfu, tmp_path, ["vhostuser.cli.rng", "--source",
                                                 "/mnt/source", "-v"], qemu11_host_root)
        consumer = GuestVM(RNG_SCRIPT, modules=["virtio_pci", "virtio_rng"], timeout=200,
                           mem_mb=CONSUMER_MB, mem_path=str(window),
                           append="rng_core.default_quality=0",
                           qemu_args=["-chardev", f"socket,id=c0,path={vhost}",
                                      "-device", "vhost-user-rng-pci,chardev=c0"])
        with appliance, consumer:
            try:
                appliance.start()
                appliance.wait_for(READY, 120)
                wait_backend_up(appliance, tmp_path / "device.log")
                result = consumer.run()
            finally:
                (tmp_path / "appliance.log").write_text(appliance.console)
        assert result.status == 0, (result.console[-3000:] + "\n--- appliance ---\n"
                                    + appliance.console[-3000:])
        out = dict(ln.split(" ", 1) for ln in result.lines if " " in ln)
        assert out.get("CURRENT") == "virtio_rng.0", result.console[-3000:]
        got = bytes.fromhex(out["HEX"])
        assert len(got) == 4096 and got in source, "the consumer's bytes are not our source's"
    finally:
        if dev.poll() is None:
            dev.send_signal(signal.SIGTERM)
        code = dev.wait(15)
    log = (tmp_path / "device.log").read_text()
    assert code == 0 and "Traceback" not in log, log[-3000:]
    assert_window_mapped(log)


SCSI_CONSUMER = r"""
for b in /sys/block/sd*; do dev=${b##*/}; done
echo "DISK $dev $(cat /sys/block/$dev/size) $(cat /sys/block/$dev/device/vendor)"
dd if=/pattern of=/dev/$dev bs=64k seek=32 oflag=direct 2>/dev/null
echo "READBACK $(dd if=/dev/$dev bs=64k skip=32 count=16 iflag=direct 2>/dev/null | sha256sum)"
"""


def test_consumer_scsi_disk_served_from_an_appliance_vm(qemu11_host_root: str,
                                                        tmp_path: Path) -> None:
    """SCSI: the consumer's vhost-user-scsi-pci LUN is served by our unchanged
    vhost-user-scsi inside the appliance VM; the pattern the consumer writes with O_DIRECT
    reads back and is in the image on the host."""
    vfu, vhost, window = tmp_path / "vfu.sock", tmp_path / "vhost.sock", tmp_path / "win.mem"
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(16 * MB)
    pattern = os.urandom(MB)
    dev = start_device(tmp_path, "--window-size", "512M", "--window-file", str(window))
    try:
        appliance = appliance_vm(vfu, tmp_path, ["vhostuser.cli.scsi", "--disk",
                                                 "/mnt/disk.img", "-v"], qemu11_host_root)
        consumer = GuestVM(SCSI_CONSUMER, modules=["virtio_pci", "virtio_scsi", "sd_mod"],
                           timeout=200, errexit=True, files={"/pattern": pattern},
                           mem_mb=CONSUMER_MB, mem_path=str(window),
                           qemu_args=["-chardev", f"socket,id=c0,path={vhost}",
                                      "-device", "vhost-user-scsi-pci,chardev=c0"])
        with appliance, consumer:
            try:
                appliance.start()
                appliance.wait_for(READY, 120)
                wait_backend_up(appliance, tmp_path / "device.log")
                result = consumer.run()
            finally:
                (tmp_path / "appliance.log").write_text(appliance.console)
        assert result.status == 0, (result.console[-3000:] + "\n--- appliance ---\n"
                                    + appliance.console[-3000:])
        out = dict(ln.split(" ", 1) for ln in result.lines if " " in ln)
        assert out["DISK"].split()[1:] == [str(16 * MB // 512), "VHOSTUSR"], out
        assert out["READBACK"].split()[0] == hashlib.sha256(pattern).hexdigest()
        assert img.read_bytes()[2 * MB : 3 * MB] == pattern
    finally:
        if dev.poll() is None:
            dev.send_signal(signal.SIGTERM)
        code = dev.wait(15)
    log = (tmp_path / "device.log").read_text()
    assert code == 0 and "Traceback" not in log, log[-3000:]
    assert_window_mapped(log)


def test_consumer_vsock_served_from_an_appliance_vm(qemu11_host_root: str,
                                                    tmp_path: Path) -> None:
    """vsock: the consumer's AF_VSOCK streams reach host programs that run inside the
    appliance VM, beside our unchanged vhost-user-vsock: one stream each way echoed
    whole (sha256 on both sides), four streams from the consumer at once."""
    from test_qemu_vsock import MODULES as VSOCK_MODULES
    from test_qemu_vsock import SCRIPT as VSOCK_SCRIPT

    size, streams = 1 << 20, 4
    here = Path(__file__).parent
    vfu, vhost, window = tmp_path / "vfu.sock", tmp_path / "vhost.sock", tmp_path / "win.mem"
    dev = start_device(tmp_path, "--window-size", "512M", "--window-file", str(window))
    host_side = (f"TMPDIR=/run chroot /host {shlex.quote(sys.executable)} "
                 f"{shlex.quote(str(here / 'vsock_host.py'))} "
                 f"/run/vm.vsock {size} {streams}\nkill $backend")
    try:
        appliance = appliance_vm(vfu, tmp_path, ["vhostuser.cli.vsock", "--guest-cid", "3",
                                                 "--uds-path", "/run/vm.vsock", "-v"],
                                 qemu11_host_root, after=host_side)
        script = (VSOCK_SCRIPT.replace("@PYTHON@", shlex.quote(sys.executable))
                  .replace("@GUEST@", f"{shlex.quote(str(here / 'vsock_guest.py'))} "
                                      f"{streams} {64 << 10}"))
        consumer = GuestVM(script, modules=VSOCK_MODULES, timeout=300, mem_mb=CONSUMER_MB,
                           mem_path=str(window), qemu_args=[
                               "-cpu", "max",
                               "-virtfs", "local,path=/,mount_tag=host,security_model=none,"
                                          "readonly=on",
                               "-chardev", f"socket,id=c0,path={vhost}",
                               "-device", "vhost-user-vsock-pci,chardev=c0"])
        with appliance, consumer:
            try:
                appliance.start()
                appliance.wait_for(READY, 120)
                wait_backend_up(appliance, tmp_path / "device.log")
                result = consumer.run()
                appliance.wait_for("HOST echoed", 60)
            finally:
                (tmp_path / "appliance.log").write_text(appliance.console)
        assert result.status == 0, (result.console[-3000:] + "\n--- appliance ---\n"
                                    + appliance.console[-3000:])
        out = dict(ln.split(" ", 1) for ln in result.lines if " " in ln)
        host = [ln for ln in appliance.console.splitlines() if ln.startswith("HOST sent ")]
        assert host and host[0].split()[3:] == ["echo", "ok"], appliance.console[-3000:]
        assert out["ECHOED"].split() == [str(size), host[0].split()[2]]
        assert out["STREAMS"] == f"{streams} ok"
        assert f"HOST echoed {streams} streams" in appliance.console
    finally:
        if dev.poll() is None:
            dev.send_signal(signal.SIGTERM)
        code = dev.wait(15)
    log = (tmp_path / "device.log").read_text()
    assert code == 0 and "Traceback" not in log, log[-3000:]


def test_consumer_keyboard_served_from_an_appliance_vm(qemu11_host_root: str,
                                                       tmp_path: Path) -> None:
    """input: a QEMU 11.1 consumer's virtio keyboard (7.2's vhost-user-input needs KVM) is
    our unchanged vhost-user-input inside the appliance VM, fed by a program beside it
    (tests/input_injector.py); the consumer reads its keys and its caps-lock LED comes
    back to that program."""
    here = Path(__file__).parent
    vfu, vhost, window = tmp_path / "vfu.sock", tmp_path / "vhost.sock", tmp_path / "win.mem"
    dev = start_device(tmp_path, "--window-size", "512M", "--window-file", str(window))
    injector = (f"TMPDIR=/run chroot /host {shlex.quote(sys.executable)} "
                f"{shlex.quote(str(here / 'input_injector.py'))} "
                "/run/events.sock\nwait $backend")
    consumer_script = f"""
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro host /host
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs dev /host/dev
chroot /host {shlex.quote(sys.executable)} {shlex.quote(str(here / 'input_consumer.py'))}
"""
    try:
        appliance = appliance_vm(vfu, tmp_path, ["vhostuser.cli.input", "--events",
                                                 "/run/events.sock", "-v"],
                                 qemu11_host_root, after=injector)
        consumer = GuestVM(consumer_script, qemu_binary=qemu11_host_root, timeout=300,
                           modules=["virtio_pci", "9pnet_virtio", "9p", "virtio_input",
                                    "evdev"],
                           mem_mb=CONSUMER_MB, mem_path=str(window), qemu_args=[
                               "-cpu", "max",
                               "-virtfs", "local,path=/run/host,mount_tag=host,"
                                          "security_model=none,readonly=on",
                               "-chardev", f"socket,id=c0,path={vhost}",
                               "-device", "vhost-user-input-pci,chardev=c0"])
        with appliance, consumer:
            try:
                appliance.start()
                appliance.wait_for(READY, 120)
                wait_backend_up(appliance, tmp_path / "device.log")
                result = consumer.run()
                appliance.wait_for("STATUS", 30)
            finally:
                (tmp_path / "appliance.log").write_text(appliance.console)
        assert result.status == 0, (result.console[-3000:] + "\n--- appliance ---\n"
                                    + appliance.console[-3000:])
        assert {"NAME vhost-user keyboard", "GOT KEY_A", "GOT KEY_B"} <= set(result.lines)
        status = [ln for ln in appliance.console.splitlines() if ln.startswith("STATUS ")]
        assert status and json.loads(status[0][7:]) == {"type": 0x11, "code": 1, "value": 1}
    finally:
        if dev.poll() is None:
            dev.send_signal(signal.SIGTERM)
        code = dev.wait(15)
    log = (tmp_path / "device.log").read_text()
    assert code == 0 and "Traceback" not in log, log[-3000:]


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-v"]))


FS_CONSUMER = r"""
mount -t virtiofs app /mnt
echo "SEED $(cat /mnt/seed.txt)"
mkdir /mnt/made && cp /pattern /mnt/made/pattern.bin && sync
echo "BACK $(sha256sum /mnt/made/pattern.bin | cut -c1-64)"
echo "LIST $(ls /mnt | tr '\n' ' ')"
umount /mnt && echo "UMOUNT $?"
"""


def test_consumer_share_served_from_an_appliance_vm(qemu11_host_root: str,
                                                    tmp_path: Path) -> None:
    """virtio-fs: the consumer mounts a directory that our unchanged vhost-user-fs serves
    from inside the appliance VM (its default mount-namespace sandbox there); what the
    consumer writes lands in the directory, on the host."""
    vfu, vhost, window = tmp_path / "vfu.sock", tmp_path / "vhost.sock", tmp_path / "win.mem"
    share = tmp_path / "share"
    share.mkdir()
    (share / "seed.txt").write_text("from the host\n")
    pattern = os.urandom(MB)
    dev = start_device(tmp_path, "--window-size", "512M", "--window-file", str(window))
    try:
        appliance = appliance_vm(vfu, tmp_path, ["vhostuser.cli.fs", "--shared-dir",
                                                 "/mnt/share", "--tag", "app", "-v"],
                                 qemu11_host_root)
        consumer = GuestVM(FS_CONSUMER, modules=["virtio_pci", "virtiofs"], timeout=200,
                           errexit=True, files={"/pattern": pattern}, mem_mb=CONSUMER_MB,
                           mem_path=str(window),
                           qemu_args=["-chardev", f"socket,id=c0,path={vhost}",
                                      "-device", "vhost-user-fs-pci,chardev=c0,tag=app"])
        with appliance, consumer:
            try:
                appliance.start()
                appliance.wait_for(READY, 120)
                wait_backend_up(appliance, tmp_path / "device.log")
                result = consumer.run()
            finally:
                (tmp_path / "appliance.log").write_text(appliance.console)
        assert result.status == 0, (result.console[-3000:] + "\n--- appliance ---\n"
                                    + appliance.console[-3000:])
        out = dict(ln.split(" ", 1) for ln in result.lines if " " in ln)
        assert out["SEED"] == "from the host"
        assert out["BACK"] == hashlib.sha256(pattern).hexdigest()
        assert out["LIST"] == "made seed.txt " and out["UMOUNT"] == "0"
        assert (share / "made" / "pattern.bin").read_bytes() == pattern
    finally:
        if dev.poll() is None:
            dev.send_signal(signal.SIGTERM)
        code = dev.wait(15)
    log = (tmp_path / "device.log").read_text()
    assert code == 0 and "Traceback" not in log, log[-3000:]
    assert_window_mapped(log)


def test_consumer_disk_served_by_qemu_storage_daemon_in_an_appliance_vm(
        qemu11_host_root: str, tmp_path: Path) -> None:
    """The RFC's claim, working: an *unmodified* qemu-storage-daemon (Debian's 7.2, run from
    the host root share) serves the consumer's disk from inside the appliance VM, behind
    vhost-user-vvu-bridge. The appliance's own virtio-blk disk (a host image) is what QSD
    exports; the consumer writes, reads back, makes a file system; the host checks it.
    (writethrough=on: QSD 7.2 tells the consumer its cache is write-through (wce 0), so no
    flush ever comes; without it the writes would wait in the appliance's page cache.)"""
    img, vfu, vhost = tmp_path / "disk.img", tmp_path / "vfu.sock", tmp_path / "vhost.sock"
    window = tmp_path / "window.mem"
    with open(img, "wb") as f:
        f.truncate(32 * MB)
    pattern = os.urandom(MB)
    qsd = ("/usr/bin/qemu-storage-daemon --blockdev driver=host_device,node-name=file0,"
           "filename=/dev/vda --blockdev driver=raw,node-name=disk0,file=file0 --export "
           "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
           "addr.path=/run/qsd.sock,writable=on,writethrough=on,num-queues=1")
    dev = start_device(tmp_path, "--window-size", "512M", "--window-file", str(window))
    try:
        appliance = appliance_vm(
            vfu, tmp_path, ["vhostuser.cli.vvu_bridge", "--backend-socket", "/run/qsd.sock",
                            "--backend-cmd", qsd, "-v"], qemu11_host_root,
            modules=["virtio_blk"],
            qemu_args=["-drive", f"file={img},if=virtio,format=raw,cache=unsafe"])
        consumer = GuestVM(SCRIPT, modules=["virtio_pci", "virtio_blk", "ext4"], timeout=200,
                           errexit=True, files={"/pattern": pattern}, mem_mb=CONSUMER_MB,
                           mem_path=str(window),
                           qemu_args=["-chardev", f"socket,id=c0,path={vhost}",
                                      "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"])
        with appliance, consumer:
            try:
                appliance.start()
                appliance.wait_for(READY, 120)
                wait_backend_up(appliance, tmp_path / "device.log")
                result = consumer.run()
            finally:
                (tmp_path / "appliance.log").write_text(appliance.console)
        assert result.status == 0, (result.console[-3000:] + "\n--- appliance ---\n"
                                    + appliance.console[-3000:])
        out = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in result.lines if " " in ln}
        digest = hashlib.sha256(pattern).hexdigest()
        assert out["SIZE"] == str(32 * MB // 512)
        assert out["READBACK"].split()[0] == digest
        assert out["COPY"].split()[0] == digest
        assert out["FILE"] == "through virtio-vhost-user"
    finally:
        if dev.poll() is None:
            dev.send_signal(signal.SIGTERM)
        code = dev.wait(15)
    data = img.read_bytes()  # the consumer's sync went through QSD and the appliance's disk
    assert data[PATTERN_AT : PATTERN_AT + MB] == pattern
    fs = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
    assert fs.returncode == 0, fs.stdout + fs.stderr
    log = (tmp_path / "device.log").read_text()
    assert code == 0 and "Traceback" not in log, log[-3000:]
    assert_window_mapped(log)


def test_consumer_nic_served_by_dpdk_testpmd_in_an_appliance_vm(qemu11_host_root: str,
                                                                tmp_path: Path) -> None:
    """DPDK's testpmd (net_vhost, icmpecho), unmodified, answers the consumer guest's pings
    from inside the appliance VM, behind vhost-user-vvu-bridge; the counts it prints every
    second come to equal the guest's own."""
    from dpdk import parse_port_stats
    from qemu_net_helpers import NET_MODULES, net_qemu_args, ping_result, tagged
    from test_vvu_bridge_dpdk import PINGS
    from test_vvu_bridge_dpdk import SCRIPT as PINGER

    vfu, vhost, window = tmp_path / "vfu.sock", tmp_path / "vhost.sock", tmp_path / "win.mem"
    testpmd = ("/usr/bin/dpdk-testpmd --lcores 0@0,1@1 --no-huge -m 192 --no-pci "
               "--file-prefix=appliance --vdev net_vhost0,iface=/run/dpdk.sock,queues=1 -- "
               "--forward-mode=icmpecho --total-num-mbufs=2048 --stats-period 1")
    dev = start_device(tmp_path, "--window-size", "512M", "--window-file", str(window))
    try:
        appliance = appliance_vm(
            vfu, tmp_path, ["vhostuser.cli.vvu_bridge", "--backend-socket", "/run/dpdk.sock",
                            "--backend-cmd", testpmd, "-v"], qemu11_host_root,
            mem_mb=768, qemu_args=["-smp", "2"])
        consumer = GuestVM(PINGER, modules=NET_MODULES, timeout=200, mem_mb=CONSUMER_MB,
                           mem_path=str(window),
                           qemu_args=net_qemu_args(vhost, "52:54:00:00:00:01"))
        with appliance, consumer:
            try:
                appliance.start()
                appliance.wait_for(READY, 120)
                wait_backend_up(appliance, tmp_path / "device.log")
                result = consumer.run()
                assert result.status == 0, (result.console[-3000:] + "\n--- appliance ---\n"
                                            + appliance.console[-3000:])
                sent = int(tagged(result.lines, "SENT"))
                received = int(tagged(result.lines, "RECEIVED"))
                # testpmd prints its counters every second: wait for the display that
                # has them all (a count beyond the guest's would fail at once)
                deadline = time.monotonic() + 30
                while True:
                    shown = parse_port_stats(appliance.console)
                    last = shown[-1][0] if shown else None
                    if last is not None:
                        assert last.rx_packets <= sent and last.tx_packets <= received, last
                        if (last.rx_packets, last.tx_packets) == (sent, received):
                            break
                    assert time.monotonic() < deadline, (last, sent, received,
                                                         appliance.console[-3000:])
                    time.sleep(0.2)
            finally:
                (tmp_path / "appliance.log").write_text(appliance.console)
        assert ping_result(tagged(result.lines, "PING")) == (PINGS, PINGS, 0), result.output
        assert PINGS <= sent <= PINGS + 2, result.output
        assert last.rx_errors == 0 and last.tx_errors == 0, last
    finally:
        if dev.poll() is None:
            dev.send_signal(signal.SIGTERM)
        code = dev.wait(15)
    log = (tmp_path / "device.log").read_text()
    assert code == 0 and "Traceback" not in log, log[-3000:]
    assert_window_mapped(log)


def test_consumer_share_served_by_virtiofsd_in_an_appliance_vm(qemu11_host_root: str,
                                                               tmp_path: Path) -> None:
    """virtiofsd (QEMU 7.2's, unmodified; it wants a higher fs.file-max than a small VM
    has) shares a directory of the appliance VM (a tmpfs: a 9p file cannot take I/O into
    the window, whose pages cannot be pinned) behind
    vhost-user-vvu-bridge. The consumer writes a tree and reads it back; virtiofsd exits
    with its front-end, the bridge starts it again, and a second consumer reads the tree."""
    vfu, vhost, window = tmp_path / "vfu.sock", tmp_path / "vhost.sock", tmp_path / "win.mem"
    pattern = os.urandom(MB)
    virtiofsd = ("sh -c 'echo 1048576 > /proc/sys/fs/file-max && mkdir -p /run/share && "
                 "echo from the appliance > "
                 "/run/share/seed.txt && exec /usr/lib/qemu/virtiofsd "
                 "--socket-path=/run/fs.sock -o source=/run/share -o cache=auto'")
    digest = hashlib.sha256(pattern).hexdigest()
    again = ("mount -t virtiofs app /mnt && echo \"AGAIN $(sha256sum "
             "/mnt/made/pattern.bin | cut -c1-64)\" && umount /mnt")
    qemu = ["-chardev", f"socket,id=c0,path={vhost}",
            "-device", "vhost-user-fs-pci,chardev=c0,tag=app"]
    dev = start_device(tmp_path, "--window-size", "512M", "--window-file", str(window))
    try:
        appliance = appliance_vm(
            vfu, tmp_path, ["vhostuser.cli.vvu_bridge", "--backend-socket", "/run/fs.sock",
                            "--backend-cmd", virtiofsd, "-v"], qemu11_host_root)
        first = GuestVM(FS_CONSUMER.replace("from the host", "from the appliance"),
                        modules=["virtio_pci", "virtiofs"], timeout=200, errexit=True,
                        files={"/pattern": pattern}, mem_mb=CONSUMER_MB, mem_path=str(window),
                        qemu_args=qemu)
        second = GuestVM(again, modules=["virtio_pci", "virtiofs"], timeout=200,
                         errexit=True, mem_mb=CONSUMER_MB, mem_path=str(window),
                         qemu_args=qemu)
        with appliance:
            try:
                appliance.start()
                appliance.wait_for(READY, 120)
                wait_backend_up(appliance, tmp_path / "device.log")
                with first:
                    result = first.run()
                with second:
                    reread = second.run()
            finally:
                (tmp_path / "appliance.log").write_text(appliance.console)
        assert result.status == 0, (result.console[-3000:] + "\n--- appliance ---\n"
                                    + appliance.console[-3000:])
        out = dict(ln.split(" ", 1) for ln in result.lines if " " in ln)
        assert out["SEED"] == "from the appliance"
        assert out["BACK"] == digest
        assert out["LIST"] == "made seed.txt " and out["UMOUNT"] == "0"
        assert reread.status == 0, reread.console[-3000:] + appliance.console[-3000:]
        assert dict(ln.split(" ", 1) for ln in reread.lines if " " in ln)["AGAIN"] == digest
        assert appliance.console.count("back-end started") == 2
    finally:
        if dev.poll() is None:
            dev.send_signal(signal.SIGTERM)
        code = dev.wait(15)
    log = (tmp_path / "device.log").read_text()
    assert code == 0 and "Traceback" not in log, log[-3000:]
    assert_window_mapped(log)
