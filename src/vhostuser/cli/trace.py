"""vhost-user-trace: put it between any vhost-user front-end and back-end (QEMU and
qemu-storage-daemon, DPDK, ours) and see every message both ways decoded — requests and
replies by name, feature bits by name, ring addresses, memory regions and what each
passed fd is — while the connection behaves as without it. Point the front-end at
--listen; the tracer connects to --connect for each front-end connection."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from ..shutdown import StopSignal
from ..sockets import connect
from ..trace.describe import text
from ..trace.device_bits import DEVICE_BITS
from ..trace.proxy import TraceSession, Writer
from ..transport.unix import connections
from .common import setup_logging, until_stopped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vhost-user-trace", description=__doc__)
    ap.add_argument("--listen", required=True, metavar="FRONT.sock",
                    help="the socket the front-end connects to (we listen)")
    ap.add_argument("--connect", required=True, metavar="BACK.sock",
                    help="the back-end's socket (it listens)")
    ap.add_argument("--json", action="store_true", help="JSON lines instead of text")
    ap.add_argument("--frames", action="store_true",
                    help="with --json: each message's bytes as they crossed (hex, header "
                         "and payload) and its number of fds, for replaying or tests")
    ap.add_argument("--output", metavar="FILE", help="write the trace here (default stdout)")
    ap.add_argument("--once", action="store_true",
                    help="exit after the first front-end connection ends")
    ap.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                    help="how long to retry connecting to the back-end (default 10 s)")
    ap.add_argument("--type", choices=sorted(DEVICE_BITS), metavar="TYPE",
                    help="the device type, to name its feature bits (vhost-user does not "
                         f"say it): {', '.join(sorted(DEVICE_BITS))}")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    args = ap.parse_args(argv)
    if args.frames and not args.json:
        ap.error("--frames needs --json")
    if not 0 < args.connect_timeout <= 3600:
        ap.error("--connect-timeout must be more than 0 and at most 3600 seconds")
    setup_logging(args.verbose)
    try:
        out: TextIO = (open(args.output, "a", buffering=1)  # noqa: SIM115 - closed below
                       if args.output else sys.stdout)
    except OSError as e:
        print(f"error: --output {args.output}: {e.strerror}", file=sys.stderr)
        return 2

    def write(ev: dict[str, Any]) -> None:
        out.write((json.dumps(ev) if args.json else text(ev)) + "\n")
        out.flush()

    writer = Writer(write)
    failed = []

    def serve(stop: StopSignal) -> None:
        for front in connections(path=args.listen, once=args.once, stop=stop):
            try:
                back = connect(args.connect, retry_for=args.connect_timeout, stop=stop)
            except (OSError, TimeoutError) as e:
                writer.emit({"dir": "front", "t": 0.0,
                             "end": f"cannot reach the back-end: {e}"})
                failed.append(e)
                front.close()
                continue
            try:
                TraceSession(front, back, writer.emit, frames=args.frames,
                             device=DEVICE_BITS.get(args.type or "")).run(stop)
            finally:
                for s in (front, back):
                    try:
                        s.close()
                    except OSError:
                        pass

    try:
        status = until_stopped(serve)
    finally:
        writer.close()
        if out is not sys.stdout:
            out.close()
    return 1 if status == 0 and args.once and failed else status


if __name__ == "__main__":
    raise SystemExit(main())
