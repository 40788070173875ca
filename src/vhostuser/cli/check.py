"""vhost-user-check: check a vhost-user-blk back-end listening on SOCKET against the
vhost-user and virtio specs, and against a hostile front-end: negotiation, I/O, stop and
restart, reconnects; malformed messages; malicious descriptor chains, with guard zones
around the memory it is given to catch writes outside it. Every check runs on connections
of its own; a back-end that crashes fails that check and, unless restarted, the rest.

Exit status: 0 if no check failed, 1 if one did, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..check.checks import CHECKS, run
from .common import setup_logging


def main(argv: list[str] | None = None) -> int:
    names = [name for name, _, _ in CHECKS]
    ap = argparse.ArgumentParser(prog="vhost-user-check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("socket", metavar="SOCKET", help="the back-end's vhost-user socket")
    ap.add_argument("--type", choices=["blk"], default="blk",
                    help="the device type (blk: the checks are virtio-blk requests)")
    ap.add_argument("--check", action="append", choices=names, metavar="NAME",
                    help="run only this check (repeat for more); --list shows them")
    ap.add_argument("--list", action="store_true", help="list the checks and exit")
    ap.add_argument("--json", action="store_true", help="one JSON object per check")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    args = ap.parse_args(argv)
    if args.list:
        for name, what, _ in CHECKS:
            print(f"{name:20} {what}")
        return 0
    setup_logging(args.verbose)
    failed = 0
    for r in run(args.socket, args.check):
        failed += r.status == "FAIL"
        if args.json:
            print(json.dumps({"check": r.name, "status": r.status, "detail": r.detail}))
        else:
            print(f"{r.status:4}  {r.name:20} {r.detail}")
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
