"""The seeds' diagram, working: a QEMU 7.2 consumer guest whose virtio-blk disk is served
by our vhost-user-blk running over the virtio-vhost-user device (`--vvu`), in interrupt
mode and in poll mode. The same back-end code serves AF_UNIX in test_qemu_blk.py.

    consumer guest --virtio-blk--> QEMU 7.2 --vhost-user--> vhost-user-vvu-device
        --(rxq/txq, window BAR, doorbells, interrupts)--> vhost-user-blk --vvu (appliance)
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from daemon import Program

from testbed.guest import GuestVM

MB = 1 << 20
PATTERN_AT = 8 * MB

SCRIPT = r"""
echo "SIZE $(cat /sys/block/vda/size)"
dd if=/pattern of=/dev/vda bs=1M seek=8 oflag=direct 2>/dev/null
dd if=/dev/vda bs=1M skip=8 count=1 iflag=direct 2>/dev/null | sha256sum | sed 's/^/READBACK /'
mke2fs -q /dev/vda 4096 >/dev/null 2>&1
mount -t ext4 /dev/vda /mnt
cp /pattern /mnt/pattern
echo "through virtio-vhost-user" > /mnt/hello
sync
umount /mnt
mount -t ext4 -o ro /dev/vda /mnt
echo "FILE $(cat /mnt/hello)"
sha256sum /mnt/pattern | sed 's/^/COPY /'
umount /mnt
"""


def start(argv: list[str], log: Path) -> Program:
    return Program.python(argv, log)


def start_device(tmp_path: Path, *extra: str) -> Program:
    """``vhost-user-vvu-device`` on tmp_path/vfu.sock (appliance) and tmp_path/vhost.sock
    (consumer), logging to device.log; returns once both sockets exist."""
    vfu, vhost = tmp_path / "vfu.sock", tmp_path / "vhost.sock"
    return Program.python(["vhostuser.cli.vvu_device", "--vfio-user-socket", str(vfu),
                           "--socket-path", str(vhost), *extra, "-vv"],
                          tmp_path / "device.log", ready=[vhost, vfu], timeout=20)


def wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors="replace")):
        assert proc.poll() is None and time.monotonic() < deadline, path.read_text()
        time.sleep(0.05)


@pytest.mark.parametrize("mode", [[], ["--poll"]], ids=["interrupt", "poll"])
def test_consumer_guest_disk_served_through_the_device(tmp_path: Path, mode: list[str]) -> None:
    img, vfu, vhost = tmp_path / "disk.img", tmp_path / "vfu.sock", tmp_path / "vhost.sock"
    with open(img, "wb") as f:
        f.truncate(32 * MB)
    pattern = os.urandom(MB)
    dev = start_device(tmp_path)
    blk = None
    try:
        blk = start(["vhostuser.cli.blk", "--vvu", str(vfu), "--blk-file", str(img), "-v",
                     *mode], tmp_path / "blk.log")
        wait_for(tmp_path / "device.log", "vfio-user client connected", dev)
        qemu = ["-chardev", f"socket,id=c0,path={vhost}",
                "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"]
        with GuestVM(SCRIPT, modules=["virtio_pci", "virtio_blk", "ext4"], qemu_args=qemu,
                     timeout=180, errexit=True, files={"/pattern": pattern}) as vm:
            result = vm.run()
        assert result.status == 0, result.console[-3000:]
        out = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in result.lines if " " in ln}
        digest = hashlib.sha256(pattern).hexdigest()
        assert out["SIZE"] == str(32 * MB // 512)
        assert out["READBACK"].split()[0] == digest
        assert out["COPY"].split()[0] == digest
        assert out["FILE"] == "through virtio-vhost-user"
        data = img.read_bytes()  # on the host: the pattern where the guest put it (the
        assert data[PATTERN_AT : PATTERN_AT + MB] == pattern  # 4 MiB filesystem ends before)
        fs = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
        assert fs.returncode == 0, fs.stdout + fs.stderr
        cat = subprocess.run(["debugfs", "-R", "cat /hello", str(img)], capture_output=True,
                             text=True)
        assert cat.stdout.strip() == "through virtio-vhost-user"
    finally:
        for proc in (blk, dev):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [p.wait(15) for p in (blk, dev) if p is not None]
    assert codes == [0] * len(codes)
    for log in ("device.log", "blk.log"):
        text = (tmp_path / log).read_text()
        assert "Traceback" not in text and "stopped:" not in text, text


@pytest.mark.parametrize("opts", ["", ",poll"], ids=["interrupt", "poll"])
def test_two_guests_through_the_switch_one_port_over_vvu(tmp_path: Path, opts: str) -> None:
    """Network: consumer guest B's NIC is a switch port served through the
    virtio-vhost-user device; guest A's is a plain port. They ping and move a file."""
    from qemu_net_helpers import SwitchDaemon, format_drops, learned, mac, port_stats
    from test_qemu_net import (
        B_IP,
        FILE_MIB,
        RECEIVER,
        SENDER,
        check_ping,
        finish,
        guest,
        stop_switch,
        tagged,
        wait_up,
    )

    vfu, vhost, sock_a = tmp_path / "vfu.sock", tmp_path / "vhost.sock", tmp_path / "a.sock"
    dev = start_device(tmp_path)
    try:
        mac_a, mac_b = mac(1), mac(2)
        with SwitchDaemon(tmp_path, [f"{sock_a},mac={mac_a}", f"vvu={vfu}{opts}"]) as switch:
            wait_for(tmp_path / "device.log", "vfio-user client connected", dev)
            with guest(SENDER, sock_a, mac_a) as vm_a, guest(RECEIVER, vhost, mac_b) as vm_b:
                vm_a.start()
                vm_b.start()
                wait_up(vm_a, "A", switch)
                wait_up(vm_b, "B", switch)
                res_b = finish(vm_b, "B", switch)
                res_a = finish(vm_a, "A", switch)
            stats = switch.stats()
            stop_switch(switch)
    finally:
        dev.send_signal(signal.SIGTERM)
        assert dev.wait(15) == 0
    a, b = res_a.lines, res_b.lines
    ctx = f"\n--- A ---\n{res_a.output}--- B ---\n{res_b.output}\n{stats}"
    assert tagged(a, "REACHABLE").startswith(B_IP), ctx
    assert tagged(a, "PING_RC") == "0", ctx
    check_ping(a, "PING", 3)
    assert tagged(b, "NC_RC") == "0", ctx
    assert tagged(b, "DST") == tagged(a, "SRC"), "file arrived damaged" + ctx
    assert int(tagged(b, "DSTSIZE")) == FILE_MIB * MB, ctx
    pa, pb = port_stats(stats, "port0"), port_stats(stats, "port1")
    assert pb["tx_bytes"] > FILE_MIB * MB and pb["rx_packets"] > 20, ctx
    assert not format_drops(pa) and not format_drops(pb), ctx
    assert learned(stats).get(mac_b) == "port1", ctx
    text = (tmp_path / "device.log").read_text()
    assert "Traceback" not in text, text


def test_consumer_and_appliance_restarts(tmp_path: Path) -> None:
    """The consumer's QEMU goes and a new one comes (same device, same appliance); then the
    appliance process restarts. Service resumes both times; the data is intact."""
    img, vfu, vhost = tmp_path / "disk.img", tmp_path / "vfu.sock", tmp_path / "vhost.sock"
    with open(img, "wb") as f:
        f.truncate(16 * MB)
    dev = start_device(tmp_path)
    procs = [dev]

    def appliance(n: int) -> subprocess.Popen[bytes]:
        p = start(["vhostuser.cli.blk", "--vvu", str(vfu), "--blk-file", str(img), "-v"],
                  tmp_path / f"blk{n}.log")
        procs.append(p)
        deadline = time.monotonic() + 20
        while (tmp_path / "device.log").read_text().count("vfio-user client connected") < n:
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        return p

    def consumer(script: str) -> list[str]:
        qemu = ["-chardev", f"socket,id=c0,path={vhost}",
                "-device", "vhost-user-blk-pci,chardev=c0"]
        with GuestVM(script, modules=["virtio_pci", "virtio_blk"], qemu_args=qemu,
                     timeout=180, errexit=True) as vm:
            result = vm.run()
        assert result.status == 0, result.console[-3000:]
        return result.lines

    try:
        first = appliance(1)
        consumer("echo one > /tmp/m; dd if=/tmp/m of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null")
        lines = consumer("dd if=/dev/vda bs=4 count=1 2>/dev/null | head -c3; echo;"
                         "echo two > /tmp/m; dd if=/tmp/m of=/dev/vda bs=512 seek=1 "
                         "conv=sync,fsync 2>/dev/null")
        assert lines[-1] == "one"  # a new consumer QEMU read what the first wrote
        first.send_signal(signal.SIGTERM)  # the appliance restarts
        assert first.wait(15) == 0
        appliance(2)
        lines = consumer("dd if=/dev/vda bs=512 skip=1 count=1 2>/dev/null | head -c3; echo")
        assert lines[-1] == "two"
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = [p.wait(15) for p in procs]
    assert codes[0] == 0 and all(c == 0 for c in codes)
    assert img.read_bytes()[:3] == b"one" and img.read_bytes()[512:515] == b"two"


def test_resize_crosses_the_device(tmp_path: Path) -> None:
    """A back-end request through the device with a real consumer: the appliance's
    vhost-user-blk sees its image grow and sends CONFIG_CHANGE_MSG on txq; the device
    relays it to QEMU's back-end channel; QEMU re-reads the config (GET_CONFIG through the
    device) and the consumer guest sees the new size."""
    from test_qemu_blk import RESIZE_SCRIPT, resize_while_the_guest_runs, sha, tagged

    img, vfu, vhost = tmp_path / "disk.img", tmp_path / "vfu.sock", tmp_path / "vhost.sock"
    with open(img, "wb") as f:
        f.truncate(16 * MB)
    dev = start_device(tmp_path)
    blk = None
    try:
        blk = start(["vhostuser.cli.blk", "--vvu", str(vfu), "--blk-file", str(img), "-v"],
                    tmp_path / "blk.log")
        wait_for(tmp_path / "device.log", "driver set BACKEND_UP", dev)
        qemu = ["-chardev", f"socket,id=c0,path={vhost}",
                "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"]
        with GuestVM(RESIZE_SCRIPT, modules=["virtio_pci", "virtio_blk"], qemu_args=qemu,
                     timeout=120) as vm:
            result = resize_while_the_guest_runs(vm, img, 24 * MB)
        assert result.status == 0, result.console[-3000:]
        assert tagged(result.lines, "BEFORE") == str(16 * MB // 512)
        assert tagged(result.lines, "AFTER") == str(24 * MB // 512)
        assert tagged(result.lines, "TAIL") == sha(b"T" * 4096)
    finally:
        for proc in (blk, dev):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [p.wait(15) for p in (blk, dev) if p is not None]
    assert codes == [0] * len(codes), (tmp_path / "blk.log").read_text()[-4000:]
    log = (tmp_path / "device.log").read_text()
    assert "driver -> consumer: CONFIG_CHANGE_MSG" in log and "Traceback" not in log
