"""Device-side cost per request of the device types beyond blk and net, in-process, no
notifications: a driver-side ring (our front-end's) fills a batch; the device's queue
service takes, serves and completes it as a worker would. Prints the median of --repeat
runs of --seconds each, per device:

- scsi: READ (10) of 4 KiB from an image in /dev/shm (preadv into guest memory);
- rng: a 64-byte request from /dev/urandom;
- input: one event into an 8-byte event buffer (the virtual keyboard's queue);
- vsock: a 4 KiB RW packet from the guest to a host UNIX socket (drained by a thread).

    python bench/devices_micro.py [--batch 32] [--seconds 2] [--repeat 3] [--write]

No C back-end runs these in-process, so there is no peer in the same run: these are our
costs per request, for comparison with bench/blk_ring_micro.py and across versions.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vhostuser.devices.input import InputDevice
from vhostuser.devices.input_sources import VirtualSource
from vhostuser.devices.rng import RngDevice, RngOptions
from vhostuser.devices.scsi import ScsiDevice
from vhostuser.devices.scsi_disk import LunOptions
from vhostuser.devices.vsock import HDR, VsockDevice
from vhostuser.engine.notify import NoNotifier
from vhostuser.engine.queue import DeviceQueue
from vhostuser.memory import GuestMemory, mmap_region
from vhostuser.virtq.guest_ram import GuestRam
from vhostuser.virtq.split import SplitQueue
from vhostuser.virtq.split_driver import DriverRing


class _Timer:
    def cancel(self) -> None:
        pass


class Events:
    def watch(self, fd: int, cb: Callable[[], None]) -> None: ...
    def unwatch(self, fd: int) -> None: ...
    def watch_write(self, fd: int, cb: Callable[[], None]) -> None: ...
    def unwatch_write(self, fd: int) -> None: ...

    def call_later(self, delay: float, cb: Callable[[], None]) -> _Timer:
        return _Timer()


class Rig:
    """Guest RAM, its mapping and driver-side rings."""

    def __init__(self) -> None:
        self.ram = GuestRam(64 << 20)
        self.mem = GuestMemory()
        self.mem.add(self.ram.region(), mmap_region(self.ram.region(), self.ram.fd))

    def queue(self, index: int, size: int = 256) -> tuple[DriverRing, DeviceQueue]:
        drv = DriverRing(self.ram, size)
        return drv, DeviceQueue(SplitQueue(self.mem, drv.layout(), 0, True), index, NoNotifier())


def measure(fill: Callable[[], int], serve: Callable[[], None], drain: Callable[[], None],
            seconds: float) -> float:
    """Device-side µs per request over `seconds` of batches."""
    clock = time.perf_counter
    done, spent = 0, 0.0
    end = clock() + seconds
    while clock() < end:
        n = fill()
        t = clock()
        serve()
        spent += clock() - t
        drain()
        done += n
    return spent / done * 1e6


def scsi_bench(batch: int, seconds: float, tmp: Path) -> float:
    img = Path("/dev/shm") / f"devices_micro_{os.getpid()}.img"
    img.write_bytes(os.urandom(8 << 20))
    try:
        dev = ScsiDevice([LunOptions(str(img))])
        rig = Rig()
        drv, q = rig.queue(2)
        svc = dev.serve({2: q}, Events())  # type: ignore[arg-type]
        slots = []
        for i in range(batch):
            req = rig.ram.alloc(51)
            rig.ram.at(req, 51)[:] = struct.pack("<8sQBBB32s", bytes([1, 0, 0x40, 0, 0, 0, 0, 0]),
                                                 i, 0, 0, 0, struct.pack(">BBIBHB", 0x28, 0,
                                                                         8 * i, 0, 8, 0))
            slots.append([(req, 51, False), (rig.ram.alloc(108), 108, True),
                          (rig.ram.alloc(4096, 4096), 4096, True)])

        def fill() -> int:
            for s in slots:
                drv.add(s)
            return batch

        def serve() -> None:
            while q.available():  # as the worker's run_queue does: 8 at a time
                svc.kicked(q)
            q.notify()

        return measure(fill, serve, drv.take_used, seconds)
    finally:
        img.unlink()


def rng_bench(batch: int, seconds: float, tmp: Path) -> float:
    dev = RngDevice(RngOptions())
    rig = Rig()
    drv, q = rig.queue(0)
    svc = dev.serve({0: q}, Events())  # type: ignore[arg-type]
    bufs = [rig.ram.alloc(64) for _ in range(batch)]

    def fill() -> int:
        for b in bufs:
            drv.add([(b, 64, True)])
        return batch

    def serve() -> None:
        svc.kicked(q)
        q.notify()

    return measure(fill, serve, drv.take_used, seconds)


def input_bench(batch: int, seconds: float, tmp: Path) -> float:
    src = VirtualSource(str(tmp / "events.sock"), "keyboard")
    dev = InputDevice(src.caps, src)
    rig = Rig()
    drv, q = rig.queue(0)
    _, sq = rig.queue(1)
    svc = dev.serve({0: q, 1: sq}, Events())  # type: ignore[arg-type]
    bufs = [rig.ram.alloc(8) for _ in range(batch)]
    events = [(1, 30, i % 2) for i in range(batch)]

    def fill() -> int:
        for b in bufs:
            drv.add([(b, 8, True)])
        svc.pending.extend(events)
        return batch

    def serve() -> None:
        svc.kicked(q)
        q.notify()

    try:
        return measure(fill, serve, drv.take_used, seconds)
    finally:
        src.close()


def vsock_bench(batch: int, seconds: float, tmp: Path) -> float:
    uds = str(tmp / "vm.vsock")
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(f"{uds}_1234")
    lst.listen()
    dev = VsockDevice(3, uds)
    rig = Rig()
    rx, rxq = rig.queue(0)
    tx, txq = rig.queue(1)
    svc = dev.serve({0: rxq, 1: txq}, Events())
    spare = rig.ram.alloc(4096 + 44)
    for _ in range(64):
        rx.add([(rig.ram.alloc(4096 + 44), 4096 + 44, True)])
    req = rig.ram.alloc(44)
    rig.ram.at(req, 44)[:] = HDR.pack(3, 2, 5000, 1234, 0, 1, 1, 0, 1 << 30, 0)
    tx.add([(req, 44, False)])
    svc.kicked(txq)
    host, _ = lst.accept()
    stop = threading.Event()

    def drain_host() -> None:
        while not stop.is_set():
            if not host.recv(1 << 20):
                return

    reader = threading.Thread(target=drain_host, daemon=True)
    reader.start()
    pkts = []
    for _ in range(batch):
        gpa = rig.ram.alloc(44 + 4096)
        rig.ram.at(gpa, 44)[:] = HDR.pack(3, 2, 5000, 1234, 4096, 1, 5, 0, 1 << 30, 0)
        pkts.append(gpa)

    def fill() -> int:
        for gpa in pkts:
            tx.add([(gpa, 44 + 4096, False)])
        return batch

    def serve() -> None:
        svc.kicked(txq)
        txq.notify()
        rxq.notify()

    def drain() -> None:
        tx.take_used()
        for _ in rx.take_used():  # credit updates (headers only): post a buffer again
            rx.add([(spare, 4096 + 44, True)])

    try:
        return measure(fill, serve, drain, seconds)
    finally:
        stop.set()
        host.close()
        svc.close()
        dev.close()
        lst.close()


BENCHES = {"scsi": scsi_bench, "rng": rng_bench, "input": input_bench, "vsock": vsock_bench}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="append to bench/RESULTS.md")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, bench in BENCHES.items():
            runs = []
            for i in range(args.repeat):
                sub = Path(d) / f"{name}{i}"
                sub.mkdir()
                runs.append(bench(args.batch, args.seconds, sub))
            rows.append((name, statistics.median(runs), runs))
            print(f"{name}: {statistics.median(runs):.2f} µs per request (runs: "
                  f"{', '.join(f'{r:.2f}' for r in runs)})", flush=True)
    if args.write:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        now = datetime.datetime.now(datetime.UTC)
        lines = [f"\n## devices_micro {now:%Y-%m-%d %H:%M} UTC\n",
                 f"Command: `python bench/devices_micro.py --batch {args.batch} --seconds "
                 f"{args.seconds} --repeat {args.repeat} --write`\n",
                 f"- machine: {platform.platform()}; {os.cpu_count()} CPUs; commit {commit}",
                 f"- batch {args.batch}, in-process, device side only, median of "
                 f"{args.repeat} runs of {args.seconds} s\n",
                 "| device | request | µs per request (median) | runs |", "|---|---|---|---|"]
        what = {"scsi": "READ (10) 4 KiB", "rng": "64 B", "input": "one event",
                "vsock": "RW 4 KiB guest to host"}
        for name, med, runs in rows:
            lines.append(f"| {name} | {what[name]} | {med:.2f} | "
                         f"{', '.join(f'{r:.2f}' for r in runs)} |")
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
