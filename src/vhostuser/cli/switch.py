"""vhost-user-switch: an Ethernet switch between vhost-user net ports (VMs, DPDK) and an
optional TAP uplink, with MAC learning and per-port counters.

    vhost-user-switch --port /tmp/a.sock --port /tmp/b.sock,client --tap tap0 \\
                      --control /tmp/sw.ctl
    vhost-user-switch stats --control /tmp/sw.ctl

A port is PATH[,client][,mac=XX:XX:XX:XX:XX:XX][,queues=N][,mtu=N][,offloads=off]: by
default the switch listens on PATH; with `client` it connects to a front-end listening
there (and reconnects). A port offers checksum and segmentation offloads unless
`offloads=off`; the switch finishes such frames in software for ports (and the TAP) that
did not negotiate them.
A port fd=N[,...] is an inherited socket, as QEMU's --fd: a listening one (accepted on,
again after each disconnect) or one connection.
A port vvu=VFU[,poll][,...] is served through the virtio-vhost-user device whose vfio-user
socket is VFU (with `poll`, its rings are polled rather than kicked); inside the appliance
VM, vvu=pci:ADDRESS is the device on the VM's own PCI bus (its INTx through
uio_pci_generic, or polled with `poll`).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys

from ..devices.net import parse_mac
from ..engine.worker import DEFAULT_SPIN_US
from ..switch.core import Switch
from ..switch.tap import TapPort
from ..switch.vhost_port import VhostPort
from .common import (
    add_message_timeout,
    apply_message_timeout,
    capabilities_first,
    setup_logging,
    until_stopped,
)


def parse_port(spec: str, index: int) -> VhostPort:
    first, *opts = spec.split(",")
    path: str | None = first
    if not first:
        raise ValueError(f"port {spec!r}: no socket path")
    kw: dict[str, object] = {"mac": bytes([0x52, 0x54, 0x00, 0x5C, 0, index + 1])}
    if first.startswith("vvu="):  # served through a virtio-vhost-user device
        kw["vvu"], path = first[4:], None
    elif first.startswith("fd="):  # inherited from whoever started the switch
        if not first[3:].isdigit():
            raise ValueError(f"port {spec!r}: fd= needs a number")
        kw["fd"], path = int(first[3:]), None
    for opt in opts:
        key, _, val = opt.partition("=")
        if key == "client" and not val and path is not None:
            kw["client"] = True
        elif key == "poll" and not val and "vvu" in kw:
            kw["poll"] = True
        elif key == "mac":
            kw["mac"] = parse_mac(val)
        elif key == "offloads" and val in ("on", "off"):
            kw["offloads"] = val == "on"
        elif key in ("queues", "mtu") and val.isdigit():
            kw["queue_pairs" if key == "queues" else "mtu"] = int(val)
        else:
            raise ValueError(f"port {spec!r}: unknown option {opt!r}")
    return VhostPort(f"port{index}", path, **kw)  # type: ignore[arg-type]


def stats(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="vhost-user-switch stats",
                                 description="print a running switch's counters as JSON")
    ap.add_argument("--control", required=True, metavar="PATH")
    args = ap.parse_args(argv)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(args.control)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError as e:
        print(f"error: cannot read {args.control}: {e}", file=sys.stderr)
        return 1
    json.dump(json.loads(data), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def build_parser(prog: str = "vhost-user-switch") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", action="append", default=[], metavar="SPEC",
                    help="a vhost-user port (repeat for each)")
    ap.add_argument("--tap", metavar="NAME", help="attach the TAP interface NAME as uplink")
    ap.add_argument("--control", metavar="PATH", help="serve counters as JSON on this socket")
    ap.add_argument("--print-capabilities", action="store_true",
                    help="print the capabilities of its ports (vhost-user net) as JSON and exit")
    ap.add_argument("--aging", type=float, default=300.0, metavar="S",
                    help="forget a learned MAC after S seconds (default 300)")
    ap.add_argument("--poll-us", type=int, default=DEFAULT_SPIN_US, metavar="US",
                    help="keep polling this long after traffic stops before sleeping")
    add_message_timeout(ap)
    ap.add_argument("-v", "--verbose", action="count", default=0)
    return ap


def serve(switch: Switch) -> int:
    return until_stopped(switch.run)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["stats"]:
        return stats(argv[1:])
    capabilities_first(argv, "net", [])  # each port is a vhost-user net back-end
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.port:
        ap.error("at least one --port is needed")
    if args.aging <= 0:
        ap.error("--aging must be positive")
    if not 0 <= args.poll_us <= 1_000_000:
        ap.error("--poll-us must be between 0 and 1000000")
    apply_message_timeout(ap, args)
    setup_logging(args.verbose)
    try:
        ports = [parse_port(spec, i) for i, spec in enumerate(args.port)]
        if len({p.path or p.vvu or p.fd for p in ports}) != len(ports):
            raise ValueError("two ports share a socket path or an fd")
        tap = TapPort(args.tap) if args.tap else None
        switch = Switch(ports, tap, args.control, args.aging, args.poll_us)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return serve(switch)


if __name__ == "__main__":
    raise SystemExit(main())
