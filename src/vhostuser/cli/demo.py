"""vhost-user-demo: boot a throw-away QEMU guest whose disk is served by our Python
vhost-user-blk, let the guest make a filesystem and write to it, then read the result
back from the image file on the host.

    host:  vhost-user-blk (Python) --socket--> QEMU (TCG) --virtio-blk--> guest /dev/vda
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
    args = ap.parse_args(argv)
    if args.size_mb < 16:
        ap.error("--size-mb must be at least 16")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vhost-user-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    image, sock, log = work / "disk.img", work / "blk.sock", work / "vhost-user-blk.log"
    with open(image, "wb") as f:
        f.truncate(args.size_mb << 20)
    say(f"disk image {image} ({args.size_mb} MiB, empty)")
    cmd = [sys.executable, "-m", "vhostuser.cli.blk", "--socket-path", str(sock),
           "--blk-file", str(image), "--serial", "python-vhost", "-v"]
    say("starting the back-end: vhost-user-blk --socket-path ... --blk-file ...")
    with open(log, "wb") as logf:
        daemon = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                print(log.read_text(), file=sys.stderr)
                return 1
            time.sleep(0.05)
        say("booting a Linux guest under QEMU (TCG) with -device vhost-user-blk-pci ...")
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
        say("done: the guest's filesystem lives in the image file, written by Python")
        return 0
    except GuestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(15)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif os.path.exists(log):
            say(f"back-end log: {log}")


if __name__ == "__main__":
    raise SystemExit(main())
