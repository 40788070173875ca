"""vhost-user-blk: serve a raw disk image to a VM."""

from __future__ import annotations

import argparse

from ..devices.blk import BlkDevice, BlkOptions
from .common import add_transport_args, capabilities_first, check_transport_args, run, setup_logging


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vhost-user-blk", description=__doc__)
    add_transport_args(ap)
    ap.add_argument("--blk-file", metavar="FILE", help="raw disk image to serve")
    ap.add_argument("--read-only", action="store_true", help="refuse writes (VIRTIO_BLK_F_RO)")
    ap.add_argument("--num-queues", type=int, default=1, metavar="N",
                    help="number of request queues (default 1)")
    ap.add_argument("--io-threads", type=int, default=0, metavar="N",
                    help="serve each queue's requests on N threads, several in flight, "
                         "completed out of order (default 0: one at a time, in order)")
    ap.add_argument("--direct", action="store_true",
                    help="open the image with O_DIRECT: bypass the host's page cache "
                         "(transfers it cannot take go through the cache)")
    ap.add_argument("--serial", help="serial number reported by GET_ID (max 20 bytes; "
                                     "default: the image's file name)")
    return ap


def main(argv: list[str] | None = None) -> int:
    capabilities_first(argv, "block", ["read-only", "blk-file"])
    ap = parser()
    args = ap.parse_args(argv)
    check_transport_args(ap, args)
    if args.blk_file is None:
        ap.error("--blk-file is required")
    if not 1 <= args.num_queues <= 256:
        ap.error("--num-queues must be between 1 and 256")
    if not 0 <= args.io_threads <= 256:
        ap.error("--io-threads must be between 0 and 256")
    if args.serial is not None and len(args.serial.encode()) > 20:
        ap.error("--serial is at most 20 bytes")
    setup_logging(args.verbose)
    opts = BlkOptions(args.blk_file, read_only=args.read_only, num_queues=args.num_queues,
                      serial=args.serial, io_threads=args.io_threads,
                      direct=args.direct)
    return run(args, lambda: BlkDevice(opts))


if __name__ == "__main__":
    raise SystemExit(main())
