"""Per-frame CPU cost of the switch's data path, in-process, no notifications: a driver
ring on port A fills batches of frames; the switch moves them (`Switch.pump`, its loop's
step, until it finds nothing: both ports looked at, a two-port switch's bursts moved in
one compiled call, switch/pair.py) to port B's receive ring, whose driver reposts
buffers. Prints µs per frame for the switch side only. (Until 2026-12-02 14:50 it timed
`take_tx` and `Switch.forward` alone: readings before that are not comparable.)

    python bench/net_ring_micro.py [--size 64] [--batch 256] [--seconds 3] [--sink] [--csum]
                                   [--cold] [--packed]

--csum: both ports negotiate checksum offload (CSUM, GUEST_CSUM) and every frame is a
UDP/IPv4 datagram whose header asks for its checksum (NEEDS_CSUM): taken with its header,
carried, delivered with it, as between two Linux guests.

--packed: packed rings (virtio 1.1) instead of split ones.

--cold: 4 MiB are written between batches, so that each starts with the caches holding
little of it (as in a loop with front-ends on another CPU, where the Python code of a
burst costs several times what it costs hot). The median batch is printed too (a batch
may go in several bursts: switch.core.FORWARD_BURST).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import struct
import time

from vhostuser.devices.net import F_MRG_RXBUF
from vhostuser.devices.net_offload import F_CSUM, F_GUEST_CSUM, NEEDS_CSUM
from vhostuser.engine.notify import NoNotifier
from vhostuser.engine.worker import QueueParams, QueueSpec
from vhostuser.memory import GuestMemory, mmap_region
from vhostuser.protocol import VirtioFeature
from vhostuser.switch.core import Switch
from vhostuser.switch.vhost_port import VhostPort
from vhostuser.virtq.guest_ram import GuestRam
from vhostuser.virtq.packed_driver import FRESH_BASE, PackedDriverRing
from vhostuser.virtq.split_driver import DriverRing

FEATURES = VirtioFeature.VERSION_1 | F_MRG_RXBUF


def port(name: str, mac: int, ram: GuestRam, qsize: int, csum: bool = False,
         packed: bool = False) -> tuple[VhostPort, list[DriverRing | PackedDriverRing]]:
    p = VhostPort(name, f"/nonexistent/{name}", bytes([2, 0, 0, 0, 0, mac]))
    p.device.set_features(FEATURES | (F_CSUM | F_GUEST_CSUM if csum else 0)
                          | (VirtioFeature.RING_PACKED if packed else 0))
    mem = GuestMemory()
    mem.add(ram.region(), mmap_region(ram.region(), ram.fd))
    rings: list[DriverRing | PackedDriverRing] = [
        PackedDriverRing(ram, qsize) if packed else DriverRing(ram, qsize) for _ in range(2)]
    base = FRESH_BASE if packed else 0
    p._run_queues([QueueSpec(QueueParams(i, drv.layout(), base, False, True, packed=packed),
                             None, NoNotifier(), NoNotifier()) for i, drv in enumerate(rings)],
                  mem, p.device, None, ())
    return p, rings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64, help="frame size (default 64)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--sink", action="store_true", help="one port only: frames go nowhere")
    ap.add_argument("--csum", action="store_true", help="frames ask for checksum offload")
    ap.add_argument("--cold", action="store_true", help="caches flushed between bursts")
    ap.add_argument("--packed", action="store_true", help="packed rings")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.csum and args.size < 42:
        ap.error("--csum needs frames of 42 bytes at least (a UDP/IPv4 header)")
    qsize = max(256, args.batch)
    ram_a, ram_b = GuestRam(64 << 20), GuestRam(64 << 20)
    a, (_, a_tx) = port("a", 1, ram_a, qsize, args.csum, args.packed)
    ports = [a]
    if not args.sink:
        b, (b_rx, _) = port("b", 2, ram_b, qsize, args.csum, args.packed)
        ports.append(b)
        rx_bufs = [ram_b.alloc(2048) for _ in range(qsize)]
        for g in rx_bufs:
            b_rx.add([(g, 2048, True)])
    sw = Switch(ports)
    frame = bytes(12) + b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01" + b"\x08\x00"
    frame = frame.ljust(12 + args.size, b"\0")
    if args.csum:  # NEEDS_CSUM: the UDP checksum at 34 + 6 (IPv4 without options)
        frame = struct.pack("<BBHHHH", NEEDS_CSUM, 0, 0, 0, 34, 6) + frame[10:]
    tx_bufs = []
    for _ in range(args.batch):
        g = ram_a.alloc(len(frame))
        ram_a.at(g, len(frame))[:] = frame
        tx_bufs.append(g)

    junk = bytearray(4 << 20)
    ones = b"\1" * (len(junk) // 64)
    bursts: list[float] = []

    def run(seconds: float) -> tuple[int, float]:
        done, t_sw = 0, 0.0
        bursts.clear()
        clock = time.perf_counter
        end = clock() + seconds
        while clock() < end:
            for g in tx_bufs:
                a_tx.add([(g, len(frame), False)])
            if args.cold:
                junk[::64] = ones
            t = clock()
            while sw.pump():  # (a batch may take more than one burst: FORWARD_BURST)
                pass
            t = clock() - t
            t_sw += t
            bursts.append(t)
            taken = len(a_tx.take_used())
            if not args.sink:
                for head, _ in b_rx.take_used():  # repost the same buffer
                    if isinstance(b_rx, DriverRing):
                        b_rx.free.extend(b_rx.chains.pop(head, ()))
                    b_rx.add([(rx_bufs[head % qsize], 2048, True)])
            done += taken
        return done, t_sw

    run(0.3)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run(args.seconds)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(40)
        return
    n, t = run(args.seconds)
    mode = ("sink" if args.sink else "a -> b") + (", checksums offloaded" if args.csum else "")
    mode += ", packed rings" if args.packed else ""
    carried = a.counters.offloads["rx_csum"]
    if args.csum and carried < n:
        raise SystemExit(f"only {carried} of {n} frames were taken as asking for a checksum")
    if args.cold:
        mode += ", caches flushed between bursts"
    median = sorted(bursts)[len(bursts) // 2]
    print(f"{args.size} B frames, {mode}, batch {args.batch}: {t / n * 1e6:.2f} µs per frame "
          f"in the switch ({n / t / 1e6:.2f} Mpps of switch time), median batch "
          f"{median * 1e6:.1f} µs")


if __name__ == "__main__":
    main()
