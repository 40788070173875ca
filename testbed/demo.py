"""scripts/demo (python -m testbed.demo): boot a throw-away consumer VM whose disk is
served by our Python vhost-user-blk running *in an appliance VM*, through the
virtio-vhost-user device; let the consumer make a filesystem and write to it, then read
the result back from the image file on the host.

  consumer guest /dev/vda
    -> QEMU 7.2 (vhost-user-blk-pci)  --vhost-user socket-->  vhost-user-vvu-device
    -> the device tunnels every message over its rxq/txq, exposes the consumer's RAM in a
       BAR (the consumer's RAM file, --window-file), turns doorbells into call eventfds
    -> vfio-user socket -> QEMU 11.1 -> the appliance guest's PCI bus -> inside it:
       vhost-user-blk --vvu pci:ADDRESS (our Python back-end, sleeping on the device's
       INTx through uio_pci_generic; no host back-end in the data path)

--poll: the appliance polls the rings instead of taking interrupts (the exitless mode).
--appliance process: the appliance is a host process driving the device over vfio-user
exactly as a guest driver would.
--direct: the back-end listens on the vhost-user socket itself (plain vhost-user).
--backend qsd: the back-end is qemu-storage-daemon, unmodified, behind
vhost-user-vvu-bridge (in the appliance VM it exports the appliance's own virtio-blk disk,
which is the image).
--backend dpdk: a network instead of a disk: DPDK's testpmd (net_vhost, icmpecho mode),
unmodified, behind vhost-user-vvu-bridge, answers the consumer guest's pings; its packet
counters are compared with the guest's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .appliance import READY, SID_QEMU, appliance_vm, qemu_wrapper, wait_backend_up
from .guest import GuestError, GuestVM

GUEST_SCRIPT = r"""
echo "guest: /dev/vda is $(cat /sys/block/vda/size) sectors, serial '$(cat /sys/block/vda/serial)'"
mke2fs -q -L demo /dev/vda >/dev/null 2>&1
mount -t ext4 /dev/vda /mnt
echo "written by the guest through vhost-user-blk at uptime $(cut -d' ' -f1 /proc/uptime)s" \
    > /mnt/hello.txt
cp /bin/busybox /mnt/busybox
sync
echo "guest: busybox copied, sha256 $(sha256sum /mnt/busybox | cut -c1-16)..."
umount /mnt
mount -t ext4 -o ro /dev/vda /mnt
echo "guest: after remount: $(cat /mnt/hello.txt)"
umount /mnt
"""


def say(text: str) -> None:
    arrow = "\033[1m==>\033[0m" if sys.stdout.isatty() else "==>"
    print(f"{arrow} {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=64, help="disk image size (default 64)")
    ap.add_argument("--keep", metavar="DIR", help="keep the image and logs in DIR")
    ap.add_argument("--direct", action="store_true",
                    help="plain vhost-user: no virtio-vhost-user device in between")
    ap.add_argument("--appliance", choices=("vm", "process"), default="vm",
                    help="the appliance is a VM (default; QEMU 11.1 from the sid chroot) "
                         "or a host process")
    ap.add_argument("--poll", action="store_true",
                    help="the appliance polls the rings (exitless mode) instead of taking "
                         "interrupts (in an appliance VM: INTx through uio_pci_generic)")
    ap.add_argument("--backend", choices=("python", "qsd", "dpdk"), default="python",
                    help="our vhost-user-blk (default); qemu-storage-daemon, unmodified, "
                         "behind vhost-user-vvu-bridge; or a network: DPDK testpmd behind it")
    args = ap.parse_args(argv)
    if args.size_mb < 16:
        ap.error("--size-mb must be at least 16")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vhost-user-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.backend == "dpdk":
        return _net_demo(args, work)
    image, sock, log = work / "disk.img", work / "blk.sock", work / "vhost-user-blk.log"
    with open(image, "wb") as f:
        f.truncate(args.size_mb << 20)
    say(f"disk image {image} ({args.size_mb} MiB, empty)")
    procs: list[subprocess.Popen[bytes]] = []
    vm_appliance = not args.direct and args.appliance == "vm"
    stack = contextlib.ExitStack()
    try:
        blk = ["vhostuser.cli.blk", "--blk-file", str(image), "--serial", "python-vhost", "-v"]
        qsd = args.backend == "qsd"
        mem_path = None
        if args.direct:
            if qsd:
                say("starting the back-end: qemu-storage-daemon ... --export "
                    "type=vhost-user-blk,addr.path=blk.sock,...")
                procs.append(_spawn(shlex.split(_qsd(str(image), str(sock), "file")), log))
            else:
                say("starting the back-end: vhost-user-blk --socket-path blk.sock "
                    "--blk-file ...")
                procs.append(_spawn([sys.executable, "-m", *blk, "--socket-path", str(sock)],
                                    log))
            _wait_path(sock, procs[-1], log)
        else:
            vfu, dev_log = work / "vvu.sock", work / "vvu-device.log"
            window = ["--window-file", str(work / "consumer-ram")] if vm_appliance else []
            say("starting the virtio-vhost-user device: vhost-user-vvu-device "
                f"--socket-path blk.sock --vfio-user-socket vvu.sock {' '.join(window[:1])}")
            procs.append(_spawn([sys.executable, "-m", "vhostuser.cli.vvu_device",
                                 "--socket-path", str(sock), "--vfio-user-socket", str(vfu),
                                 *window, "-v"], dev_log))
            _wait_path(sock, procs[-1], dev_log)
            if vm_appliance:
                mem_path = window[1]
                stack.enter_context(_start_appliance_vm(vfu, work, image, log, dev_log, qsd,
                                                        args.poll))
            else:
                mode = ["--poll"] if args.poll else []
                if qsd:
                    back = work / "qsd.sock"
                    say("starting the appliance: vhost-user-vvu-bridge --vvu vvu.sock "
                        "--backend-socket qsd.sock --backend-cmd 'qemu-storage-daemon ...' "
                        + " ".join(mode))
                    cmd = ["vhostuser.cli.vvu_bridge", "--vvu", str(vfu), "--backend-socket",
                           str(back), "--backend-cmd", _qsd(str(image), str(back), "file"),
                           "-v"]
                else:
                    say("starting the appliance's back-end: vhost-user-blk --vvu vvu.sock "
                        f"--blk-file ... {' '.join(mode)}")
                    cmd = [*blk, "--vvu", str(vfu)]
                procs.append(_spawn([sys.executable, "-m", *cmd, *mode], log))
                _wait_log(dev_log, "driver set BACKEND_UP", procs[-1], log, 15)
        say("booting the consumer: a Linux guest under QEMU 7.2 (TCG), "
            "-device vhost-user-blk-pci" + (", RAM in the device's window file"
                                            if mem_path else ""))
        qemu = ["-chardev", f"socket,id=c0,path={sock}",
                "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"]
        with GuestVM(GUEST_SCRIPT, modules=["virtio_pci", "virtio_blk", "ext4"],
                     qemu_args=qemu, timeout=240, errexit=True, mem_path=mem_path) as vm:
            result = vm.run()
        for line in result.lines:
            print(f"    {line}")
        if result.status != 0:
            say(f"the guest script failed (status {result.status})")
            return 1
        say(f"guest finished in {result.duration:.1f} s; checking the image on the host")
        debugfs = shutil.which("debugfs") or "/sbin/debugfs"
        out = subprocess.run([debugfs, "-R", "cat /hello.txt", str(image)],
                             capture_output=True, text=True)
        if out.returncode != 0 or "written by the guest" not in out.stdout:
            say(f"host could not read the file back: {out.stderr.strip()}")
            return 1
        print(f"    host: debugfs reads /hello.txt from {image.name}: {out.stdout.strip()}")
        how = ("" if args.direct else " in an appliance VM" if vm_appliance
               else " in an appliance process")
        how += "" if args.direct else ", through the virtio-vhost-user device"
        who = "qemu-storage-daemon" if qsd else "Python"
        how += ", behind vhost-user-vvu-bridge" if qsd and not args.direct else ""
        say(f"done: the guest's filesystem lives in the image file, written by {who}{how}")
        return 0
    except (GuestError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        _clean_up(stack, procs, None if args.keep else work)
        if args.keep and os.path.exists(log):
            say(f"back-end log: {log}")



def _qsd(image: str, sock: str, driver: str) -> str:
    """qemu-storage-daemon exporting `image` as vhost-user-blk on `sock`. writethrough=on:
    QSD tells the guest its cache is write-through, so it must be (no flush will come)."""
    return shlex.join([
        "qemu-storage-daemon", "--blockdev", f"driver={driver},node-name=f0,filename={image}",
        "--blockdev", "driver=raw,node-name=disk0,file=f0", "--export",
        f"type=vhost-user-blk,id=e0,node-name=disk0,addr.type=unix,addr.path={sock},"
        "writable=on,writethrough=on,num-queues=1"])  # quoted: a work dir may have spaces


@contextlib.contextmanager
def _start_appliance_vm(vfu: Path, work: Path, image: Path, log: Path,
                        dev_log: Path, qsd: bool, poll: bool) -> Iterator[None]:
    """Boot the appliance guest (QEMU 11.1, the device attached over vfio-user) and wait
    until the back-end inside it has brought the device up; its console goes to `log`.
    With `qsd`, the image is the appliance's own virtio-blk disk, which qemu-storage-daemon
    exports behind the bridge."""
    if qsd:
        backend = ["vhostuser.cli.vvu_bridge", "--backend-socket", "/run/qsd.sock",
                   "--backend-cmd", _qsd("/dev/vda", "/run/qsd.sock", "host_device"), "-v"]
        modules, qemu_args = ["virtio_blk"], ["-drive", f"file={image},if=virtio,format=raw"]
        inside = ("vhost-user-vvu-bridge --vvu pci:... --backend-cmd 'qemu-storage-daemon "
                  f"... /dev/vda' (the appliance's disk: {image.name})")
        driver = "vhost-user-vvu-bridge (qemu-storage-daemon behind it)"
    else:
        backend = ["vhostuser.cli.blk", "--blk-file", f"/mnt/{image.name}", "--serial",
                   "python-vhost", "-v"]
        modules, qemu_args = [], []
        inside = (f"vhost-user-blk --vvu pci:... --blk-file /mnt/{image.name} (a 9p share "
                  f"of {work})")
        driver = "vhost-user-blk"
    if poll:
        backend.append("--poll")
        inside += ", --poll"
    say("booting the appliance: a Linux guest under QEMU 11.1 (sid chroot, TCG) with the "
        f"device attached over vfio-user; inside it: {inside}")
    subprocess.run([str(SID_QEMU), "setup"], check=True, capture_output=True)
    with appliance_vm(vfu, work, backend, qemu_wrapper(work), modules=modules,
                      qemu_args=qemu_args) as vm:
        try:
            vm.start()
            vm.wait_for(READY, 120)
            wait_backend_up(vm, dev_log)
            bdf = vm.console.split(READY, 1)[1].split()[0]
            how = ("polling" if "interrupts: INTx" not in vm.console
                   else "sleeping on INTx through uio_pci_generic")
            say(f"appliance: the device is pci:{bdf} on its bus; {driver} drives it, {how}")
            yield
        finally:
            log.write_text(vm.console)


PINGS = 5
NET_GUEST = rf"""
for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do echo 1 > $f; done
ip link set lo up
ip addr add 192.0.2.1/24 dev eth0
ip link set eth0 up
# testpmd in icmpecho mode answers the ARP request and the pings
ping -c {PINGS} -W 5 192.0.2.2 | grep -E 'bytes from|packet loss'
echo "guest: sent $(cat /sys/class/net/eth0/statistics/tx_packets) frames, received \
$(cat /sys/class/net/eth0/statistics/rx_packets)"
"""


def _testpmd(sock: str, prefix: str) -> str:
    return shlex.join([
        "dpdk-testpmd", "--lcores", "0@0,1@1", "--no-huge", "-m", "192", "--no-pci",
        f"--file-prefix={prefix}", "--vdev", f"net_vhost0,iface={sock},queues=1", "--",
        "--forward-mode=icmpecho", "--total-num-mbufs=2048", "--stats-period", "1"])


def _net_demo(args: argparse.Namespace, work: Path) -> int:
    """--backend dpdk: the consumer's NIC on testpmd, through the device (or directly)."""
    sock, log = work / "net.sock", work / "testpmd.log"
    procs: list[subprocess.Popen[bytes]] = []
    stack = contextlib.ExitStack()
    mode = ["--poll"] if args.poll else []
    console: Callable[[], str] | None = None  # testpmd's output, in the appliance VM
    try:
        mem_path = None
        if args.direct:
            say("starting the back-end: dpdk-testpmd --vdev net_vhost0,iface=net.sock "
                "--forward-mode=icmpecho")
            procs.append(_spawn(shlex.split(_testpmd(str(sock), "demo")), log))
            _wait_path(sock, procs[-1], log)
        else:
            vfu, dev_log = work / "vvu.sock", work / "vvu-device.log"
            window = (["--window-size", "512M", "--window-file", str(work / "consumer-ram")]
                      if args.appliance == "vm" else [])
            say("starting the virtio-vhost-user device: vhost-user-vvu-device "
                "--socket-path net.sock --vfio-user-socket vvu.sock " + " ".join(window[2:3]))
            procs.append(_spawn([sys.executable, "-m", "vhostuser.cli.vvu_device",
                                 "--socket-path", str(sock), "--vfio-user-socket", str(vfu),
                                 *window, "-v"], dev_log))
            _wait_path(sock, procs[-1], dev_log)
            if args.appliance == "vm":
                mem_path = window[3]
                bridge = ["vhostuser.cli.vvu_bridge", "--backend-socket", "/run/dpdk.sock",
                          "--backend-cmd", "/usr/bin/" + _testpmd("/run/dpdk.sock", "appl"),
                          "-v", *mode]
                say("booting the appliance: a Linux guest under QEMU 11.1 (sid chroot, TCG) "
                    "with the device attached over vfio-user; inside it: vhost-user-vvu-bridge "
                    "--vvu pci:... --backend-cmd 'dpdk-testpmd ... --forward-mode=icmpecho'")
                subprocess.run([str(SID_QEMU), "setup"], check=True, capture_output=True)
                vm = stack.enter_context(appliance_vm(vfu, work, bridge, qemu_wrapper(work),
                                                      mem_mb=768, qemu_args=["-smp", "2"]))
                stack.callback(lambda: log.write_text(vm.console))
                console = lambda: vm.console  # noqa: E731
                vm.start()
                vm.wait_for(READY, 120)
                wait_backend_up(vm, dev_log)
                say("appliance: the bridge drives the device; testpmd is its back-end")
            else:
                back = work / "dpdk.sock"
                say("starting the appliance: vhost-user-vvu-bridge --vvu vvu.sock "
                    "--backend-socket dpdk.sock --backend-cmd 'dpdk-testpmd ...' "
                    + " ".join(mode))
                procs.append(_spawn([sys.executable, "-m", "vhostuser.cli.vvu_bridge", "--vvu",
                                     str(vfu), "--backend-socket", str(back), "--backend-cmd",
                                     _testpmd(str(back), "demo"), "-v", *mode], log))
                _wait_log(dev_log, "driver set BACKEND_UP", procs[-1], log, 15)
        say("booting the consumer: a Linux guest under QEMU 7.2 (TCG), -device virtio-net-pci "
            "on a vhost-user netdev; it pings 192.0.2.2 (testpmd echoes)")
        qemu = ["-chardev", f"socket,id=c0,path={sock}",
                "-netdev", "vhost-user,id=n0,chardev=c0,queues=1",
                # vectors=0: QEMU 7.2 under TCG crashes when a vhost-user-net device's
                # driver sets DRIVER_OK with MSI-X (tests/qemu_net_helpers.py)
                "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01,vectors=0"]
        with GuestVM(NET_GUEST, modules=["virtio_pci", "virtio_net"], qemu_args=qemu,
                     timeout=240, errexit=True, mem_path=mem_path) as guest:
            result = guest.run()
        for line in result.lines:
            print(f"    {line}")
        pings = re.search(r"(\d+) packets transmitted, (\d+) packets received", result.output)
        if result.status != 0 or pings is None or pings.groups() != (str(PINGS), str(PINGS)):
            say("the pings did not all come back")
            return 1
        sent = re.search(r"sent (\d+) frames, received (\d+)", result.output)
        if sent is None:
            say("the guest printed no packet counts")
            return 1
        frames = (int(sent.group(1)), int(sent.group(2)))
        counted = _testpmd_counts(console if console is not None
                                  else lambda: log.read_text(errors="replace"), frames)
        print(f"    testpmd: (RX-packets, TX-packets) = {counted}")
        if counted != frames:
            say("testpmd's counts differ from the guest's")
            return 1
        say("done: testpmd counted exactly the frames the guest sent and received")
        return 0
    except (GuestError, OSError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        _clean_up(stack, procs, None if args.keep else work)


def _clean_up(stack: contextlib.ExitStack, procs: list[subprocess.Popen[bytes]],
              work: Path | None) -> None:
    """Stop the VMs, then the processes (newest first; killed if SIGTERM is not enough),
    then remove `work` (None: keep it)."""
    stack.close()
    for proc in reversed(procs):
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)


def _testpmd_counts(text: Callable[[], str], expect: tuple[int, int]) -> tuple[int, int] | None:
    """testpmd's last (RX, TX) packet counts; it prints them every second, so wait up to
    15 s for a display that has `expect`."""
    deadline = time.monotonic() + 15
    while True:
        out = text()
        rx = re.findall(r"RX-packets:\s+(\d+)", out)
        tx = re.findall(r"TX-packets:\s+(\d+)", out)
        last = (int(rx[-1]), int(tx[-1])) if rx and tx else None
        if last == expect or time.monotonic() > deadline:
            return last
        time.sleep(0.5)


def _wait_log(path: Path, text: str, proc: subprocess.Popen[bytes], log: Path,
              timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise GuestError(f"waiting for {text!r} in {path.name}:\n{log.read_text()}")
        time.sleep(0.05)


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)


def _wait_path(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise GuestError(f"{path} did not appear:\n{log.read_text()}")
        time.sleep(0.05)


if __name__ == "__main__":
    raise SystemExit(main())
