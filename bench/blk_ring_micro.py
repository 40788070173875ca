"""Device-side cost per virtio-blk request, in-process, no notifications: the driver side
(our front-end ring) fills batches of 4 KiB reads; the device side pops, serves (preadv
from a file in /dev/shm) and completes them as the worker does. Prints the device-side
time per request (the driver side is not counted).

    python bench/blk_ring_micro.py [--batch 32] [--seconds 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import struct
import time

from vhostuser.devices.blk import BlkDevice, BlkOptions
from vhostuser.engine.notify import NoNotifier
from vhostuser.engine.queue import DeviceQueue
from vhostuser.memory import GuestMemory, mmap_region
from vhostuser.virtq.guest_ram import GuestRam
from vhostuser.virtq.split import SplitQueue
from vhostuser.virtq.split_driver import DriverRing


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--bs", type=int, default=4096)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    path = "/dev/shm/blk_ring_micro.img"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    ram = GuestRam(64 << 20)
    mem = GuestMemory()
    mem.add(ram.region(), mmap_region(ram.region(), ram.fd))
    drv = DriverRing(ram, 128)
    q = DeviceQueue(SplitQueue(mem, drv.layout(), 0, event_idx=True), 0, NoNotifier())
    dev = BlkDevice(BlkOptions(path))
    service = dev.serve({0: q}, None)  # type: ignore[arg-type]  # blk watches nothing
    slots = []
    for i in range(args.batch):
        hdr, data, status = ram.alloc(16), ram.alloc(args.bs, 4096), ram.alloc(1)
        ram.at(hdr, 16)[:] = struct.pack("<IIQ", 0, 0, i * 8)
        slots.append([(hdr, 16, False), (data, args.bs, True), (status, 1, True)])

    def run(seconds: float) -> tuple[int, float]:
        """Returns (requests, seconds spent on the device side)."""
        done, device = 0, 0.0
        clock = time.perf_counter
        end = clock() + seconds
        while clock() < end:
            for s in slots:
                drv.add(s)
            t = clock()
            n = q.available()  # the worker's path: one batch, one publish
            service.kicked(q)
            q.notify()
            device += clock() - t
            drv.take_used()
            done += n
        return done, device

    run(0.3)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run(args.seconds)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    else:
        n, t = run(args.seconds)
        print(f"batch {args.batch}, {args.bs} B reads: device side {t / n * 1e6:.2f} µs per "
              f"request ({n / t / 1e3:.0f}k requests/s of device time)")
    os.unlink(path)


if __name__ == "__main__":
    main()
