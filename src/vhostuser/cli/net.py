"""vhost-user-net: one virtio-net port, e.g. a VM's NIC bridged to a TAP device on the host.
With --tap, each queue pair runs in a worker process of its own on a queue of the TAP
(multi-queue when --queues > 1); without, the port is the switch with a single vhost-user
port (frames go nowhere, counters on --control)."""

from __future__ import annotations

import argparse
import sys

from ..devices.net import NetPort, parse_mac
from ..engine.worker import DEFAULT_SPIN_US
from ..switch.core import Switch
from ..switch.vhost_port import VhostPort
from .common import (
    add_message_timeout,
    apply_message_timeout,
    capabilities_first,
    run,
    setup_logging,
)
from .switch import serve


def main(argv: list[str] | None = None) -> int:
    capabilities_first(argv, "net", [])
    ap = argparse.ArgumentParser(prog="vhost-user-net", description=__doc__)
    ap.add_argument("--socket-path", metavar="PATH", help="UNIX socket to listen on "
                    "(or to connect to, with --client)")
    ap.add_argument("--fd", type=int, metavar="FD",
                    help="an inherited socket fd (listening or connected)")
    ap.add_argument("--vvu", metavar="DEVICE",
                    help="serve through a virtio-vhost-user device: its vfio-user socket, "
                         "or pci:ADDRESS on this machine's PCI bus (in the appliance VM)")
    ap.add_argument("--poll", action="store_true", help="with --vvu: poll the rings")
    ap.add_argument("--client", action="store_true", help="connect to a listening front-end")
    ap.add_argument("--tap", metavar="NAME", help="TAP interface to bridge the port to")
    ap.add_argument("--mac", default="52:54:00:5c:00:01", help="MAC in the config space")
    ap.add_argument("--queues", type=int, default=1, metavar="N", help="queue pairs")
    ap.add_argument("--mtu", type=int, default=1500)
    ap.add_argument("--offloads", choices=("on", "off"), default="on",
                    help="offer checksum and segmentation offloads (on a TAP: the kernel's, "
                         "through IFF_VNET_HDR)")
    ap.add_argument("--control", metavar="PATH", help="serve counters as JSON on this socket")
    ap.add_argument("--poll-us", type=int, default=DEFAULT_SPIN_US, metavar="US")
    ap.add_argument("--print-capabilities", action="store_true")
    add_message_timeout(ap)
    ap.add_argument("-v", "--verbose", action="count", default=0)
    args = ap.parse_args(argv)
    if sum(x is not None for x in (args.socket_path, args.fd, args.vvu)) != 1:
        ap.error("exactly one of --socket-path, --fd and --vvu is required")
    if args.poll and args.vvu is None:
        ap.error("--poll goes with --vvu")
    if args.client and args.socket_path is None:
        ap.error("--client needs --socket-path")
    if not 0 <= args.poll_us <= 1_000_000:
        ap.error("--poll-us must be between 0 and 1000000")
    apply_message_timeout(ap, args)
    if not 1 <= args.queues <= 128:
        ap.error("--queues must be between 1 and 128")
    try:
        mac = parse_mac(args.mac)
    except ValueError as e:
        ap.error(str(e))
    if args.tap is not None:
        if args.control is not None:
            ap.error("--control goes without --tap (counters are the switch's: use "
                     "vhost-user-switch --port ... --tap ... --control ...)")
        setup_logging(args.verbose)
        return run(args, lambda: NetPort(mac, args.queues, args.mtu, tap=args.tap,
                                         offloads=args.offloads == "on"))
    setup_logging(args.verbose)
    try:
        port = VhostPort("port0", args.socket_path, mac, client=args.client,
                         fd=args.fd, vvu=args.vvu, poll=args.poll, queue_pairs=args.queues,
                         mtu=args.mtu, offloads=args.offloads == "on")
        switch = Switch([port], None, args.control, poll_us=args.poll_us)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return serve(switch)


if __name__ == "__main__":
    raise SystemExit(main())
