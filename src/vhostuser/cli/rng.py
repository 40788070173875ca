"""vhost-user-rng: serve a virtio-rng device (the guest's /dev/hwrng) from an entropy
source, optionally rate-limited."""

from __future__ import annotations

import argparse

from ..devices.rng import DEFAULT_SOURCE, RngDevice, RngOptions
from .common import add_transport_args, capabilities_first, check_transport_args, run, setup_logging


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vhost-user-rng", description=__doc__)
    add_transport_args(ap)
    ap.add_argument("--source", metavar="FILE", default=DEFAULT_SOURCE,
                    help=f"where the bytes come from (default {DEFAULT_SOURCE}); a file or "
                         "FIFO that ends stops the supply, with an error in the log")
    ap.add_argument("--max-bytes", type=int, metavar="N",
                    help="rate limit: at most N bytes per period (as QEMU's virtio-rng)")
    ap.add_argument("--period", type=int, default=1000, metavar="MS",
                    help="the rate limit's period in milliseconds (default 1000)")
    return ap


def main(argv: list[str] | None = None) -> int:
    capabilities_first(argv, "rng", [])
    ap = parser()
    args = ap.parse_args(argv)
    check_transport_args(ap, args)
    if args.max_bytes is not None and args.max_bytes < 1:
        ap.error("--max-bytes must be at least 1")
    if not 1 <= args.period <= 3_600_000:
        ap.error("--period must be between 1 and 3600000 ms")
    setup_logging(args.verbose)
    opts = RngOptions(args.source, args.max_bytes, args.period / 1000)
    return run(args, lambda: RngDevice(opts))


if __name__ == "__main__":
    raise SystemExit(main())
