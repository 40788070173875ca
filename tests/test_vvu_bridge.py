"""vhost-user-vvu-bridge: unmodified vhost-user back-ends served through the
virtio-vhost-user device, here with a process appliance (the device over vfio-user, the
bridge and the back-end as processes beside it) and a QEMU 7.2 consumer guest:

    consumer guest --virtio-blk--> QEMU 7.2 --vhost-user--> vhost-user-vvu-device
        --(rxq/txq, window, doorbells, vectors)--> vhost-user-vvu-bridge
        --vhost-user (AF_UNIX, rewritten fds)--> qemu-storage-daemon 7.2 (unmodified)

The in-VM appliance runs the same bridge in test_vvu_appliance_vm.py.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from qemu_helpers import CHECKOUT, require_tool
from test_qemu_vvu import MB, PATTERN_AT, SCRIPT, start, start_device, wait_for

from testbed.guest import GuestVM

SID_QEMU = Path(__file__).resolve().parents[1] / "scripts" / "sid-qemu"


def qsd_cmd(img: Path, sock: Path, sid: bool = False) -> str:
    """qemu-storage-daemon exporting `img` on `sock`: Debian 12's (7.2), or with `sid`
    the sid chroot's (11.1), which tells its front-end when the disk is resized."""
    qsd = (f"{shlex.quote(str(SID_QEMU))} exec -- /usr/bin/qemu-storage-daemon" if sid
           else shlex.quote(require_tool("qemu-storage-daemon", "qemu-system-common")))
    return (f"{qsd} --blockdev driver=file,node-name=file0,filename={img} "
            "--blockdev driver=raw,node-name=disk0,file=file0 "
            "--export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
            f"addr.path={sock},writable=on,num-queues=1")


def run_consumer(tmp_path: Path, img: Path, backend: list[str]) -> None:
    """A consumer guest's disk served by `backend` (the bridge's arguments after --vvu):
    the guest writes a pattern, reads it back, makes a file system and copies into it; the
    host checks the image."""
    vhost, vfu = tmp_path / "vhost.sock", tmp_path / "vfu.sock"
    pattern = os.urandom(MB)
    dev = start_device(tmp_path)
    bridge = None
    try:
        bridge = start(["vhostuser.cli.vvu_bridge", "--vvu", str(vfu), *backend, "-vv"],
                       tmp_path / "bridge.log")
        wait_for(tmp_path / "device.log", "vfio-user client connected", dev)
        qemu = ["-chardev", f"socket,id=c0,path={vhost}",
                "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"]
        with GuestVM(SCRIPT, modules=["virtio_pci", "virtio_blk", "ext4"], qemu_args=qemu,
                     timeout=180, errexit=True, files={"/pattern": pattern}) as vm:
            result = vm.run()
        assert result.status == 0, result.console[-3000:] + (
            tmp_path / "bridge.log").read_text()[-5000:]
        out = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in result.lines if " " in ln}
        digest = hashlib.sha256(pattern).hexdigest()
        assert out["SIZE"] == str(32 * MB // 512)
        assert out["READBACK"].split()[0] == digest
        assert out["COPY"].split()[0] == digest
        assert out["FILE"] == "through virtio-vhost-user"
    finally:
        for proc in (bridge, dev):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [p.wait(15) for p in (bridge, dev) if p is not None]
    log = (tmp_path / "bridge.log").read_text()
    assert codes == [0] * len(codes), log[-4000:]
    assert "Traceback" not in log, log
    data = img.read_bytes()
    assert data[PATTERN_AT : PATTERN_AT + MB] == pattern
    fs = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
    assert fs.returncode == 0, fs.stdout + fs.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /hello", str(img)], capture_output=True,
                         text=True)
    assert cat.stdout.strip() == "through virtio-vhost-user"


def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(32 * MB)
    return img


@pytest.mark.parametrize("mode", [[], ["--poll"], ["--watch-rings"]],
                         ids=["interrupt", "poll", "watch-rings"])
def test_qemu_storage_daemon_behind_the_bridge(tmp_path: Path, mode: list[str]) -> None:
    """Over vfio-user the device hands the consumer's own kick eventfds over (interrupt
    and poll mode alike: nothing polls, no vector is raised); with --watch-rings the
    bridge watches the avail indexes instead, as it does in an appliance VM."""
    img, sock = image(tmp_path), tmp_path / "qsd.sock"
    run_consumer(tmp_path, img, ["--backend-socket", str(sock),
                                 "--backend-cmd", qsd_cmd(img, sock), *mode])
    log = (tmp_path / "bridge.log").read_text()
    handed = "vring 0: the back-end reads the consumer's kick eventfd" in log
    watched = "vring 0: the bridge watches its avail index" in log
    assert (handed, watched) == ((False, True) if mode == ["--watch-rings"] else (True, False))


def test_our_blk_behind_the_bridge(tmp_path: Path) -> None:
    """Our vhost-user-blk on AF_UNIX behind the bridge: the same result as `--vvu`."""
    img, sock = image(tmp_path), tmp_path / "blk.sock"
    cmd = shlex.join([sys.executable, "-m", "vhostuser.cli.blk", "--socket-path", str(sock),
                      "--blk-file", str(img)])
    run_consumer(tmp_path, img, ["--backend-socket", str(sock), "--backend-cmd", cmd])


def test_a_resize_in_qemu_storage_daemon_reaches_the_consumer(tmp_path: Path) -> None:
    """A back-end request from an unmodified back-end: qemu-storage-daemon 11.1 (7.2 does
    not notify resizes yet) grows its disk
    (QMP block_resize) and sends CONFIG_CHANGE_MSG on the back-end channel the bridge gave
    it; the bridge puts it on txq, the device relays it to the consumer's QEMU, which
    re-reads the config; the consumer guest sees the new size and reads the new end."""
    from qemu.qmp.legacy import QEMUMonitorProtocol
    from test_qemu_blk import RESIZE_SCRIPT, sha, tagged

    img, sock, qmp_path = tmp_path / "disk.img", tmp_path / "qsd.sock", tmp_path / "qmp.sock"
    with open(img, "wb") as f:
        f.truncate(16 * MB)
    vhost, vfu = tmp_path / "vhost.sock", tmp_path / "vfu.sock"
    cmd = (qsd_cmd(img, sock, sid=True) + " --chardev "
           f"socket,id=m0,path={qmp_path},server=on,wait=off --monitor chardev=m0")
    dev = start_device(tmp_path)
    bridge = None
    try:
        bridge = start(["vhostuser.cli.vvu_bridge", "--vvu", str(vfu), "--backend-socket",
                        str(sock), "--backend-cmd", cmd, "-vv"], tmp_path / "bridge.log")
        wait_for(tmp_path / "device.log", "vfio-user client connected", dev)
        qemu = ["-chardev", f"socket,id=c0,path={vhost}",
                "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"]
        with GuestVM(RESIZE_SCRIPT, modules=["virtio_pci", "virtio_blk"], qemu_args=qemu,
                     timeout=120) as vm:
            vm.start()
            vm.wait_for("RESIZE-NOW", 60)
            qmp = QEMUMonitorProtocol(str(qmp_path))
            qmp.connect()
            try:
                qmp.cmd("block_resize", **{"node-name": "disk0", "size": 24 * MB})
            finally:
                qmp.close()
            with open(img, "r+b") as f:  # the new end, written on the host
                f.seek(24 * MB - 4096)
                f.write(b"T" * 4096)
            result = vm.wait()
        assert result.status == 0, result.console[-3000:]
        assert tagged(result.lines, "BEFORE") == str(16 * MB // 512)
        assert tagged(result.lines, "AFTER") == str(24 * MB // 512)
        assert tagged(result.lines, "TAIL") == sha(b"T" * 4096)
    finally:
        for proc in (bridge, dev):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [p.wait(15) for p in (bridge, dev) if p is not None]
    log = (tmp_path / "bridge.log").read_text()
    assert codes == [0] * len(codes), log[-4000:]
    assert "back-end -> consumer: CONFIG_CHANGE_MSG" in log and "Traceback" not in log
    assert "driver -> consumer: CONFIG_CHANGE_MSG" in (tmp_path / "device.log").read_text()


FS_SCRIPT = r"""
mount -t virtiofs app /mnt
echo "SEED $(cat /mnt/seed.txt)"
mkdir -p /mnt/made/deep && cp /pattern /mnt/made/deep/pattern.bin && sync
echo "BACK $(sha256sum /mnt/made/deep/pattern.bin | cut -c1-64)"
echo "LIST $(ls /mnt | tr '\n' ' ')"
umount /mnt && echo "UMOUNT $?"
"""


@pytest.mark.parametrize("which", ["c", "rust"])
def test_virtiofsd_behind_the_bridge(tmp_path: Path, which: str) -> None:
    """virtiofsd, unmodified — QEMU 7.2's C one, and the Rust one of Debian sid (from the
    chroot) — shares a host directory with a consumer guest behind the bridge. Both exit
    when their front-end leaves; the bridge starts them again for the next consumer, which
    the second guest proves (it reads what the first one wrote)."""
    from test_qemu_fs import VIRTIOFSD, rust_virtiofsd

    vhost, vfu, sock = tmp_path / "vhost.sock", tmp_path / "vfu.sock", tmp_path / "fs.sock"
    share = tmp_path / "share"
    share.mkdir()
    (share / "seed.txt").write_text("from the host\n")
    if which == "c":
        cmd = f"{VIRTIOFSD} --socket-path={sock} -o source={share} -o cache=auto"
    else:
        cmd = shlex.join([*rust_virtiofsd(), f"--socket-path={sock}", f"--shared-dir={share}",
                        "--sandbox=chroot", "--cache=auto"])
    pattern = os.urandom(MB)
    qemu = ["-chardev", f"socket,id=c0,path={vhost}",
            "-device", "vhost-user-fs-pci,chardev=c0,tag=app"]
    dev = start_device(tmp_path)
    bridge = None
    try:
        bridge = start(["vhostuser.cli.vvu_bridge", "--vvu", str(vfu), "--backend-socket",
                        str(sock), "--backend-cmd", cmd, "-v"], tmp_path / "bridge.log")
        wait_for(tmp_path / "device.log", "vfio-user client connected", dev)
        with GuestVM(FS_SCRIPT, modules=["virtio_pci", "virtiofs"], timeout=180,
                     errexit=True, files={"/pattern": pattern}, qemu_args=qemu) as vm:
            result = vm.run()
        assert result.status == 0, result.console[-3000:] + (
            tmp_path / "bridge.log").read_text()[-3000:]
        out = dict(ln.split(" ", 1) for ln in result.lines if " " in ln)
        assert out["SEED"] == "from the host"
        assert out["BACK"] == hashlib.sha256(pattern).hexdigest()
        assert out["LIST"] == "made seed.txt " and out["UMOUNT"] == "0"
        assert (share / "made" / "deep" / "pattern.bin").read_bytes() == pattern
        again = ("mount -t virtiofs app /mnt && echo \"AGAIN $(sha256sum "
                 "/mnt/made/deep/pattern.bin | cut -c1-64)\" && umount /mnt")
        with GuestVM(again, modules=["virtio_pci", "virtiofs"], timeout=180,
                     errexit=True, qemu_args=qemu) as vm:
            second = vm.run()
        assert second.status == 0, second.console[-3000:]
        assert dict(ln.split(" ", 1) for ln in second.lines if " " in ln)["AGAIN"] == \
            hashlib.sha256(pattern).hexdigest()
    finally:
        for proc in (bridge, dev):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [p.wait(15) for p in (bridge, dev) if p is not None]
    log = (tmp_path / "bridge.log").read_text()
    assert codes == [0] * len(codes), log[-4000:]
    assert "Traceback" not in log, log
    assert log.count("back-end started") == 2, log  # once per consumer


def test_the_demo_with_qemu_storage_daemon(tmp_path: Path) -> None:
    """`scripts/demo --backend qsd --appliance process`: the seeds' diagram with an
    unmodified C back-end in the appliance (the VM appliance runs the same bridge in
    test_vvu_appliance_vm.py)."""
    r = subprocess.run([sys.executable, "-m", "testbed.demo", "--backend", "qsd",
                        "--appliance", "process", "--keep", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=CHECKOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "host: debugfs reads /hello.txt from disk.img: written by the guest" in r.stdout
    assert ("written by qemu-storage-daemon in an appliance process, through the "
            "virtio-vhost-user device, behind vhost-user-vvu-bridge") in r.stdout
