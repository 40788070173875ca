"""vhost-user-input: a virtio-input device for a guest: a host evdev device passed through,
or a virtual keyboard, mouse or tablet fed with JSON lines on a datagram socket."""

from __future__ import annotations

import argparse

from ..devices.input import InputDevice
from ..devices.input_sources import KINDS, EvdevSource, VirtualSource
from .common import add_transport_args, capabilities_first, check_transport_args, run, setup_logging


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vhost-user-input", description=__doc__)
    add_transport_args(ap)
    ap.add_argument("--evdev-path", "--evdev", dest="evdev", metavar="DEV",
                    help="pass this evdev device through (/dev/input/eventN): its name, ids "
                         "and capabilities, its events; the guest's LED changes go back to "
                         "it. The guest has it alone (EVIOCGRAB) unless --no-grab")
    ap.add_argument("--no-grab", action="store_true",
                    help="with --evdev-path: leave the device to the host's readers too")
    ap.add_argument("--events", metavar="PATH", help="a virtual device fed by JSON lines "
                    "sent as datagrams to this UNIX socket, e.g. "
                    '{"type": "EV_KEY", "code": "KEY_A", "value": 1}')
    ap.add_argument("--kind", choices=sorted(KINDS), default="keyboard",
                    help="with --events: what the virtual device is (default keyboard)")
    return ap


def main(argv: list[str] | None = None) -> int:
    capabilities_first(argv, "input", ["evdev-path", "no-grab"])
    ap = parser()
    args = ap.parse_args(argv)
    check_transport_args(ap, args)
    if (args.evdev is None) == (args.events is None):
        ap.error("exactly one of --evdev-path and --events is required")
    if args.no_grab and args.evdev is None:
        ap.error("--no-grab goes with --evdev-path")
    setup_logging(args.verbose)

    def make() -> InputDevice:
        if args.evdev is not None:
            src: EvdevSource | VirtualSource = EvdevSource(args.evdev, grab=not args.no_grab)
        else:
            src = VirtualSource(args.events, args.kind)
        return InputDevice(src.caps, src)

    return run(args, make)


if __name__ == "__main__":
    raise SystemExit(main())
