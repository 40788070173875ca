"""What every back-end program shares: socket options, logging, signals, the serve loop.

Conventions of QEMU's vhost-user.rst: --socket-path, --fd, --print-capabilities; no
daemonizing; exit cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from ..appliance.vvu_link import LinkError
from ..engine.device import Device
from ..engine.session import serve_connection
from ..engine.worker import DEFAULT_SPIN_US
from ..memory import MemoryTableError
from ..shutdown import Shutdown, StopSignal
from ..sockets import MESSAGE_TIMEOUT, PeerClosed, listen, set_message_timeout
from ..transport.unix import UnixResources, connections
from ..unix_channel import UnixChannel
from ..vfio_user.client import DeviceError
from ..virtq import kernel_walk

log = logging.getLogger("vhostuser")


def add_transport_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket-path", metavar="PATH",
                        help="UNIX socket to listen on (or to connect to, with --client)")
    parser.add_argument("--fd", type=int, metavar="FD",
                        help="an inherited socket fd (listening or connected)")
    parser.add_argument("--vvu", metavar="DEVICE",
                        help="serve through a virtio-vhost-user device (instead of "
                             "--socket-path/--fd): its vfio-user socket, or pci:ADDRESS for "
                             "the device on this machine's PCI bus (in the appliance VM, "
                             "e.g. pci:0000:00:04.0; needs root and a free huge page)")
    parser.add_argument("--poll", action="store_true",
                        help="with --vvu: poll the rings instead of taking kicks as "
                             "interrupts (the exitless mode; with pci:, interrupts are "
                             "the device's INTx through uio_pci_generic, and polling is "
                             "the fallback without it)")
    parser.add_argument("--client", action="store_true",
                        help="connect to a front-end listening on --socket-path, and "
                             "reconnect after each disconnect")
    parser.add_argument("--print-capabilities", action="store_true",
                        help="print the back-end's capabilities as JSON and exit")
    parser.add_argument("--poll-us", type=int, default=DEFAULT_SPIN_US, metavar="US",
                        help="after a queue runs dry, keep polling it this many µs before "
                             f"waiting for a kick (default {DEFAULT_SPIN_US}; 0: never)")
    add_message_timeout(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug)")


def add_message_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--message-timeout", type=float, default=MESSAGE_TIMEOUT,
                        metavar="S",
                        help="drop a peer that leaves a message half sent, or stops reading "
                             f"ours, for S seconds (default {MESSAGE_TIMEOUT:g})")


def apply_message_timeout(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 < args.message_timeout <= 3600:
        parser.error("--message-timeout must be more than 0 and at most 3600 seconds")
    set_message_timeout(args.message_timeout)


def check_transport_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.print_capabilities:
        return
    if sum(x is not None for x in (args.socket_path, args.fd, args.vvu)) != 1:
        parser.error("exactly one of --socket-path, --fd and --vvu is required")
    if args.poll and args.vvu is None:
        parser.error("--poll goes with --vvu")
    if args.client and args.socket_path is None:
        parser.error("--client needs --socket-path")
    if not 0 <= args.poll_us <= 1_000_000:
        parser.error("--poll-us must be between 0 and 1000000")
    if args.fd is not None and args.fd < 0:
        parser.error("--fd must be a non-negative file descriptor")
    apply_message_timeout(parser, args)


def print_capabilities(kind: str, features: list[str]) -> NoReturn:
    json.dump({"type": kind, "features": features}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.exit(0)


def capabilities_first(argv: list[str] | None, kind: str, features: list[str]) -> None:
    """`--print-capabilities` answers before anything else is looked at: management
    software asks with whatever other options it has (QEMU's vhost-user.rst)."""
    if "--print-capabilities" in (sys.argv[1:] if argv is None else argv):
        print_capabilities(kind, features)


def until_stopped(run: Callable[[StopSignal], None]) -> int:
    """Run an event loop until SIGTERM/SIGINT; 0 then, 1 on an OS error (printed)."""
    stop = StopSignal()
    try:
        run(stop)
    except Shutdown:
        log.info("exiting")
    except (OSError, ValueError, MemoryTableError, LinkError, DeviceError) as e:
        return _failed(e, stop)
    finally:
        stop.close()
    return 0


def _failed(e: Exception, stop: StopSignal) -> int:
    """The exit status for an error that ended the loop: 1, printed; but 0 if a stop
    signal had come first (the peer went too while we were on our way out: the device
    stopped along with us, say, before we looked at the signal)."""
    if stop.signum is not None:
        log.info("%s after %s: exiting", e, signal.Signals(stop.signum).name)
        return 0
    log.debug("the loop ended on an error", exc_info=True)
    print(f"error: {e}", file=sys.stderr)
    return 1


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s")
    # numba's own debug output (bytecode dumps as it compiles the kernels) is not ours to
    # show, and at DEBUG it makes a first compile take minutes
    logging.getLogger("numba").setLevel(max(level, logging.INFO))


def run(args: argparse.Namespace, make_device: Callable[[], Device],
        confine: Callable[[], None] | None = None) -> int:
    """Serve front-ends one connection after another until SIGTERM/SIGINT. `confine`
    (a sandbox) is entered once the device, the listening socket or the virtio-vhost-user
    link are set up; it raises OSError or ValueError if it cannot."""
    try:
        device = make_device()
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if kernel_walk.available():  # VHOSTUSER_JIT=1: loaded once here, not in each worker
        kernel_walk.warm()
        log.info("the compiled chain walk is on (VHOSTUSER_JIT=1)")
    stop = StopSignal()
    if args.vvu is not None:
        return _run_vvu(args, device, stop, confine)
    path, fd = args.socket_path, args.fd
    try:
        if confine is not None:
            if path is not None and not args.client:  # listen before the path is out of reach
                listener = listen(path)
                path, fd = None, listener.detach()
            confine()
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        stop.close()
        return 1
    try:
        for sock in connections(path=path, fd=fd, client=args.client, stop=stop):
            log.info("front-end connected")
            # workers hold the connection too (engine/worker.py): it closes after the last
            serve_connection(UnixChannel(sock, stop), UnixResources(), device,
                             closed=(PeerClosed,), poll_us=args.poll_us)
    except Shutdown as e:
        log.info("%s: exiting", e)
    except OSError as e:
        return _failed(e, stop)
    finally:
        stop.close()
        close = getattr(device, "close", None)
        if close is not None:
            close()
    return 0


def _run_vvu(args: argparse.Namespace, device: Device, stop: StopSignal,
             confine: Callable[[], None] | None) -> int:
    """Serve consumers through a virtio-vhost-user device, one session after another."""
    from ..appliance.vvu_link import VvuLink
    from ..transport.vvu import VvuChannel, VvuResources

    link = None
    try:
        # Workers keep the link's vfio-user socket open (as they keep an AF_UNIX
        # connection): the device ends the consumer's session only after the last of them.
        link = VvuLink(args.vvu, args.poll)
        if confine is not None:
            confine()
        while True:
            link.wait_frontend(stop)
            log.info("consumer connected through the virtio-vhost-user device")
            serve_connection(VvuChannel(link, stop), VvuResources(link, args.poll), device,
                             closed=(PeerClosed,), poll_us=args.poll_us)
    except Shutdown as e:
        log.info("%s: exiting", e)
    except (OSError, ValueError, MemoryTableError, LinkError, DeviceError) as e:
        return _failed(e, stop)
    finally:
        if link is not None:
            link.close()
        stop.close()
        close = getattr(device, "close", None)
        if close is not None:
            close()
    return 0
