"""vhost-user-scsi: a virtio-scsi target whose LUNs are raw images (--disk, repeatable:
LUN 0, 1, ... of target 0)."""

from __future__ import annotations

import argparse

from ..devices.scsi import MAX_LUNS, ScsiDevice
from ..devices.scsi_disk import LunOptions
from .common import add_transport_args, capabilities_first, check_transport_args, run, setup_logging


def parse_disk(spec: str) -> LunOptions:
    """FILE[,read-only][,serial=S][,wwn=HEX]"""
    path, *opts = spec.split(",")
    if not path:
        raise argparse.ArgumentTypeError(f"{spec!r}: no image file")
    read_only, serial, wwn = False, None, None
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "read-only" and not value:
            read_only = True
        elif key == "serial" and value:
            if len(value.encode()) > 32 or not value.isascii() or not value.isprintable():
                raise argparse.ArgumentTypeError(f"serial {value!r}: up to 32 printable ASCII "
                                                 "characters")
            serial = value
        elif key == "wwn" and value:
            try:
                wwn = int(value.removeprefix("0x"), 16)
            except ValueError:
                wwn = -1
            if not 0 < wwn < 1 << 64:
                raise argparse.ArgumentTypeError(f"wwn {value!r}: a 64-bit NAA identifier in hex")
        else:
            raise argparse.ArgumentTypeError(f"{opt!r}: not read-only, serial=S or wwn=HEX")
    return LunOptions(path, read_only, serial, wwn)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vhost-user-scsi", description=__doc__)
    add_transport_args(ap)
    ap.add_argument("--disk", action="append", type=parse_disk, default=[],
                    metavar="FILE[,read-only][,serial=S][,wwn=HEX]",
                    help="a LUN backed by a raw image (repeat for LUN 1, 2, ...)")
    ap.add_argument("--num-queues", type=int, default=1, metavar="N",
                    help="request queues (default 1)")
    return ap


def main(argv: list[str] | None = None) -> int:
    capabilities_first(argv, "scsi", [])
    ap = parser()
    args = ap.parse_args(argv)
    check_transport_args(ap, args)
    if not args.disk:
        ap.error("at least one --disk is required")
    if len(args.disk) > MAX_LUNS:
        ap.error(f"at most {MAX_LUNS} disks")
    if not 1 <= args.num_queues <= 64:
        ap.error("--num-queues must be between 1 and 64")
    setup_logging(args.verbose)
    return run(args, lambda: ScsiDevice(args.disk, args.num_queues))


if __name__ == "__main__":
    raise SystemExit(main())
