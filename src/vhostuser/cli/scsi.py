"""vhost-user-scsi: a virtio-scsi target whose LUNs are raw images (--disk, repeatable:
LUN 0, 1, ... of target 0)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..devices.scsi import MAX_LUNS, ScsiDevice
from ..devices.scsi_control import request
from ..devices.scsi_disk import LunOptions
from .common import add_transport_args, capabilities_first, check_transport_args, run, setup_logging


def parse_disk(spec: str) -> LunOptions:
    """FILE[,read-only][,serial=S][,wwn=HEX]"""
    try:
        return LunOptions.parse(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vhost-user-scsi", description=__doc__)
    add_transport_args(ap)
    ap.add_argument("--disk", action="append", type=parse_disk, default=[],
                    metavar="FILE[,read-only][,serial=S][,wwn=HEX]",
                    help="a LUN backed by a raw image (repeat for LUN 1, 2, ...)")
    ap.add_argument("--num-queues", type=int, default=1, metavar="N",
                    help="request queues (default 1)")
    ap.add_argument("--control", metavar="PATH",
                    help="take LUN commands on this socket while a front-end is connected "
                         "(`vhost-user-scsi lun --control PATH list|add DISK|remove N`)")
    return ap


def lun_command(argv: list[str]) -> int:
    """`vhost-user-scsi lun --control PATH list | add DISK | remove N`"""
    ap = argparse.ArgumentParser(prog="vhost-user-scsi lun",
                                 description="add or remove a running target's LUNs")
    ap.add_argument("--control", required=True, metavar="PATH")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    add = sub.add_parser("add")
    add.add_argument("disk", metavar="FILE[,read-only][,serial=S][,wwn=HEX]")
    rm = sub.add_parser("remove")
    rm.add_argument("lun", type=int)
    args = ap.parse_args(argv)
    req: dict[str, object] = {"cmd": args.cmd}
    if args.cmd == "add":
        try:
            LunOptions.parse(args.disk)
        except ValueError as e:
            ap.error(str(e))
        path, sep, opts = args.disk.partition(",")
        req["disk"] = os.path.abspath(path) + sep + opts  # the daemon's cwd is not ours
    elif args.cmd == "remove":
        req["lun"] = args.lun
    try:
        reply = request(args.control, req)
    except (OSError, ValueError) as e:
        print(f"error: {args.control}: {e}", file=sys.stderr)
        return 1
    if "error" in reply:
        print(f"error: {reply['error']}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lun"]:
        return lun_command(argv[1:])
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

    def make() -> ScsiDevice:
        dev = ScsiDevice(args.disk, args.num_queues)
        if args.control is not None:
            try:
                dev.serve_control(args.control)
            except OSError:
                dev.close()
                raise
        return dev

    return run(args, make)


if __name__ == "__main__":
    raise SystemExit(main())
