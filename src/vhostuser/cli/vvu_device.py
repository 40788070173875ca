"""vhost-user-vvu-device: the virtio-vhost-user device, served over vfio-user.

The consumer VM's QEMU connects its vhost-user device (e.g. vhost-user-blk-pci) to
--socket-path; the appliance's VMM attaches the device from --vfio-user-socket:
  qemu ... -device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"PATH"}}'
or a process drives it directly (vhost-user-blk --vvu PATH ...).
"""

from __future__ import annotations

import argparse
import sys
import uuid

from ..vvu.device import VvuDevice
from ..vvu.server import VvuServer
from .common import add_message_timeout, apply_message_timeout, setup_logging, until_stopped


def size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return int(t[:-1]) * units[t[-1]]
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 512M, 4G)") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vhost-user-vvu-device", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vfio-user-socket", required=True, metavar="PATH",
                    help="where the appliance's VMM (vfio-user client) connects")
    consumer = ap.add_mutually_exclusive_group(required=True)
    consumer.add_argument("--socket-path", metavar="PATH",
                          help="the vhost-user socket for the consumer's VMM")
    consumer.add_argument("--fd", type=int, metavar="FD",
                          help="an inherited listening socket for the consumer's VMM")
    ap.add_argument("--client", action="store_true",
                    help="connect to a consumer listening on --socket-path (reconnecting)")
    ap.add_argument("--max-queues", type=int, default=64, metavar="N",
                    help="max_vhost_queues (default 64)")
    ap.add_argument("--window-size", type=size, default=1 << 30, metavar="SIZE",
                    help="size of the shared-memory BAR; at least the consumer's RAM "
                         "(default 1G)")
    ap.add_argument("--window-file", metavar="PATH",
                    help="a memory file for the consumer's guest RAM (QEMU: -object "
                         "memory-backend-file,mem-path=PATH,share=on,...): BAR 4 maps it "
                         "from the start, so an appliance VM sees the consumer's memory "
                         "without trapping. Created sparse (--window-size bytes) if missing"
                    )
    ap.add_argument("--uuid", type=uuid.UUID, help="the device's uuid (default: random)")
    add_message_timeout(ap)
    ap.add_argument("-v", "--verbose", action="count", default=0)
    args = ap.parse_args(argv)
    if args.vfio_user_socket == args.socket_path:
        ap.error("--vfio-user-socket and --socket-path must differ")
    if args.fd is not None and args.client:
        ap.error("--client connects to --socket-path: not with --fd")
    apply_message_timeout(ap, args)
    setup_logging(args.verbose)
    try:
        dev = VvuDevice(args.max_queues, args.uuid, args.window_size, args.window_file)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    consumer_side = args.socket_path if args.fd is None else args.fd
    return until_stopped(VvuServer(dev, args.vfio_user_socket, consumer_side,
                                   args.client).run)


if __name__ == "__main__":
    raise SystemExit(main())
