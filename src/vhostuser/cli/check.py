"""vhost-user-check: check a vhost-user-blk, -net, -fs or -scsi back-end listening on
SOCKET against the vhost-user and virtio specs, and against a hostile front-end:
negotiation, I/O, stop and restart, reconnects; malformed messages; malicious descriptor
chains and requests (blk), frames (net), FUSE requests (fs) or SCSI commands (scsi),
with guard zones around the memory
it is given to catch writes outside it. Every check runs on connections of its own; a
back-end that crashes fails that check and, unless restarted, the rest.

Exit status: 0 if no check failed, 1 if one did, 2 for bad arguments or no socket at
SOCKET.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
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
                    help="the device type: blk (virtio-blk requests on queue 0), net "
                         "(frames on the transmit queue of pair 0), fs (FUSE requests on "
                         "the first request queue) or scsi (commands on the first request "
                         "queue)")
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
    try:  # nothing there: one clear error, not every check failing slowly (not a
        # connection: a back-end may serve one session only, as virtiofsd does)
        if not stat.S_ISSOCK(os.stat(args.socket).st_mode):
            raise OSError(f"{args.socket} is not a socket")
    except OSError as e:
        print(f"vhost-user-check: error: {e}", file=sys.stderr)
        return 2
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
