"""vhost-user-demo: boot a throw-away consumer VM whose disk is served by our Python
vhost-user-blk *through the virtio-vhost-user device*, let the guest make a filesystem and
write to it, then read the result back from the image file on the host.

  consumer guest /dev/vda
    -> QEMU 7.2 (vhost-user-blk-pci)  --vhost-user socket-->  vhost-user-vvu-device
    -> the device tunnels every message over its rxq/txq, exposes the consumer's RAM in a
       BAR, turns doorbells into call eventfds and kicks into MSI-X interrupts
    -> vfio-user socket -> the appliance: vhost-user-blk --vvu (our Python back-end, driving
       the device exactly as a guest driver would; no host back-end in the data path)

With --direct the back-end listens on the vhost-user socket itself (plain vhost-user).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..vm import GuestError, GuestVM

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
    ap = argparse.ArgumentParser(prog="vhost-user-demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=64, help="disk image size (default 64)")
    ap.add_argument("--keep", metavar="DIR", help="keep the image and logs in DIR")
    ap.add_argument("--direct", action="store_true",
                    help="plain vhost-user: no virtio-vhost-user device in between")
    ap.add_argument("--poll", action="store_true",
                    help="the appliance polls the rings (exitless mode) instead of "
                         "taking interrupts")
    args = ap.parse_args(argv)
    if args.size_mb < 16:
        ap.error("--size-mb must be at least 16")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vhost-user-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    image, sock, log = work / "disk.img", work / "blk.sock", work / "vhost-user-blk.log"
    with open(image, "wb") as f:
        f.truncate(args.size_mb << 20)
    say(f"disk image {image} ({args.size_mb} MiB, empty)")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        blk = [sys.executable, "-m", "vhostuser.cli.blk", "--blk-file", str(image),
               "--serial", "python-vhost", "-v"]
        if args.direct:
            say("starting the back-end: vhost-user-blk --socket-path blk.sock --blk-file ...")
            procs.append(_spawn([*blk, "--socket-path", str(sock)], log))
            _wait_path(sock, procs[-1], log)
        else:
            vfu = work / "vvu.sock"
            say("starting the virtio-vhost-user device: vhost-user-vvu-device "
                "--socket-path blk.sock --vfio-user-socket vvu.sock")
            procs.append(_spawn([sys.executable, "-m", "vhostuser.cli.vvu_device",
                                 "--socket-path", str(sock), "--vfio-user-socket", str(vfu),
                                 "-v"], work / "vvu-device.log"))
            _wait_path(sock, procs[-1], work / "vvu-device.log")
            mode = ["--poll"] if args.poll else []
            say("starting the appliance's back-end: vhost-user-blk --vvu vvu.sock --blk-file "
                f"... {' '.join(mode)}")
            procs.append(_spawn([*blk, "--vvu", str(vfu), *mode], log))
            deadline = time.monotonic() + 15  # until the appliance has attached the device
            while "vfio-user client connected" not in (work / "vvu-device.log").read_text():
                if procs[-1].poll() is not None or time.monotonic() > deadline:
                    raise GuestError(f"the appliance did not attach:\n{log.read_text()}")
                time.sleep(0.05)
        say("booting the consumer: a Linux guest under QEMU (TCG), -device vhost-user-blk-pci")
        qemu = ["-chardev", f"socket,id=c0,path={sock}",
                "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"]
        with GuestVM(GUEST_SCRIPT, modules=["virtio_pci", "virtio_blk", "ext4"],
                     qemu_args=qemu, timeout=180, errexit=True) as vm:
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
        how = "" if args.direct else " through the virtio-vhost-user device"
        say(f"done: the guest's filesystem lives in the image file, written by Python{how}")
        return 0
    except GuestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif os.path.exists(log):
            say(f"back-end log: {log}")



def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)


def _wait_path(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise GuestError(f"{proc.args[2]} did not start:\n{log.read_text()}")
        time.sleep(0.05)


if __name__ == "__main__":
    raise SystemExit(main())
