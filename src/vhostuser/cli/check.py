"""vhost-user-check: check a vhost-user-blk or vhost-user-net back-end listening on SOCKET
against the vhost-user and virtio specs, and against a hostile front-end: negotiation,
I/O, stop and restart, reconnects; malformed messages; malicious descriptor chains and
requests (blk) or frames (net), with guard zones around the memory it is given to catch
writes outside it. Every check runs on connections of its own; a back-end that crashes
fails that check and, unless restarted, the rest.

Exit status: 0 if no check failed, 1 if one did, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..check.checks import checks_for, run
from ..check.rig import KINDS
from .common import setup_logging


def main(argv: list[str] | None = None) -> int:
    names = sorted({name for kind in KINDS for name, _, _ in checks_for(kind)})
    ap = argparse.ArgumentParser(prog="vhost-user-check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("socket", metavar="SOCKET", help="the back-end's vhost-user socket")
    ap.add_argument("--type", choices=KINDS, default="blk",
                    help="the device type: blk (virtio-blk requests on queue 0) or net "
                         "(frames on the transmit queue of pair 0)")
    ap.add_argument("--check", action="append", choices=names, metavar="NAME",
                    help="run only this check (repeat for more); --list shows them")
    ap.add_argument("--list", action="store_true", help="list the checks and exit")
    ap.add_argument("--json", action="store_true", help="one JSON object per check")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    args = ap.parse_args(argv)
    mine = [name for name, _, _ in checks_for(args.type)]
    if args.list:
        for name, what, _ in checks_for(args.type):
            print(f"{name:26} {what}")
        return 0
    other = [n for n in args.check or () if n not in mine]
    if other:
        ap.error(f"not a check for {args.type}: {', '.join(other)}")
    setup_logging(args.verbose)
    failed = 0
    for r in run(args.socket, args.check, args.type):
        failed += r.status == "FAIL"
        if args.json:
            print(json.dumps({"check": r.name, "status": r.status, "detail": r.detail}))
        else:
            print(f"{r.status:4}  {r.name:26} {r.detail}")
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
