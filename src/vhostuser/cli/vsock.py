"""vhost-user-vsock: virtio-vsock streams between a guest and host programs, in the hybrid
convention of Firecracker and vhost-device-vsock: host programs connect to the UNIX socket
--uds-path and write "CONNECT <port>\\n"; a guest connection to CID 2 port P reaches the
UNIX socket <uds-path>_P."""

from __future__ import annotations

import argparse

from ..devices.vsock import VsockDevice
from .common import add_transport_args, capabilities_first, check_transport_args, run, setup_logging


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vhost-user-vsock", description=__doc__)
    add_transport_args(ap)
    ap.add_argument("--guest-cid", type=int, metavar="CID",
                    help="the guest's context id (3 or more)")
    ap.add_argument("--uds-path", metavar="PATH",
                    help="UNIX socket host programs connect to (and the prefix of those "
                         "guest connections reach)")
    return ap


def main(argv: list[str] | None = None) -> int:
    capabilities_first(argv, "vsock", [])
    ap = parser()
    args = ap.parse_args(argv)
    check_transport_args(ap, args)
    if args.guest_cid is None or args.uds_path is None:
        ap.error("--guest-cid and --uds-path are required")
    if not 3 <= args.guest_cid < 0xFFFFFFFF:
        ap.error("--guest-cid must be between 3 and 4294967294")
    setup_logging(args.verbose)
    return run(args, lambda: VsockDevice(args.guest_cid, args.uds_path))


if __name__ == "__main__":
    raise SystemExit(main())
