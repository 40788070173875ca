"""vhost-user-vvu-bridge: serve a consumer through the virtio-vhost-user device with an
unmodified vhost-user back-end (qemu-storage-daemon, DPDK, virtiofsd, ...).

Runs in the appliance, beside the back-end: it is the back-end's front-end on
--backend-socket and relays every message between it and the device, giving the back-end
fds it can use in place of the consumer's (docs/vvu-design.md, "The bridge"). One
connection to the back-end per consumer session; the back-end sees a front-end that
disconnects when the consumer does. Example, inside an appliance VM:

  vhost-user-vvu-bridge --vvu pci:0000:00:04.0 --backend-socket /run/blk.sock \\
    --backend-cmd 'qemu-storage-daemon --blockdev file,node-name=f,filename=/dev/vdb
      --export vhost-user-blk,id=e,node-name=f,writable=on,addr.type=unix,addr.path=/run/blk.sock'
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

from ..appliance.vvu_link import VvuLink
from ..bridge.session import REPLY_WAIT, BridgeSession, SessionEnded
from ..engine.worker import DEFAULT_SPIN_US
from ..shutdown import StopSignal
from ..sockets import connect
from .common import add_message_timeout, apply_message_timeout, setup_logging, until_stopped

log = logging.getLogger("vhost-user-vvu-bridge")
CONNECT_RETRY = 0.05  # s between attempts to reach a back-end that does not listen yet


class Bridge:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.backend: subprocess.Popen[bytes] | None = None

    def run(self, stop: StopSignal) -> None:
        link = VvuLink(self.args.vvu, self.args.poll)
        try:
            while True:
                link.wait_frontend(stop)
                log.info("consumer connected through the device")
                try:
                    sock = self._connect(stop)
                except ConnectionError as e:
                    log.error("%s: the consumer's session ends", e)
                    link.set_backend_up(False)
                    stop.sleep(1.0)
                    continue
                session = BridgeSession(link, sock, stop, poll=self.args.poll,
                                        spin_us=self.args.poll_us,
                                        kick_fds=not self.args.watch_rings,
                                        reply_wait=self.args.reply_timeout)
                try:
                    session.run()
                except SessionEnded as e:
                    log.info("session ended: %s", e)
                finally:
                    session.close()
        finally:
            link.close()

    def _connect(self, stop: StopSignal) -> socket.socket:
        """A connection to the back-end, started first if it is ours and not running (many
        back-ends, virtiofsd for one, exit when their front-end leaves: the last one may
        still be on its way out), waiting up to --connect-timeout for it to listen."""
        a = self.args
        deadline = time.monotonic() + a.connect_timeout
        started = False
        while True:
            p = self.backend
            if a.backend_cmd is not None and (p is None or p.poll() is not None):
                if started:
                    raise ConnectionError(f"the back-end exited with status {p.returncode}"
                                          if p is not None else "the back-end did not start")
                if p is not None:
                    log.info("the back-end exited with status %d: starting it again",
                             p.returncode)
                self.backend = subprocess.Popen(shlex.split(a.backend_cmd))
                started = True
                log.info("back-end started: pid %d", self.backend.pid)
            try:
                return connect(a.backend_socket, retry_for=0)
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
            stop.sleep(CONNECT_RETRY)

    def close(self) -> None:
        p = self.backend
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vhost-user-vvu-bridge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vvu", required=True, metavar="DEVICE",
                    help="the virtio-vhost-user device: its vfio-user socket, or "
                         "pci:ADDRESS on this machine's PCI bus (in the appliance VM)")
    ap.add_argument("--backend-socket", required=True, metavar="PATH",
                    help="where the vhost-user back-end listens")
    ap.add_argument("--backend-cmd", metavar="CMD",
                    help="start the back-end with this command line, and again for the "
                         "next consumer if it has exited (stopped with us)")
    ap.add_argument("--connect-timeout", type=float, default=30.0, metavar="S",
                    help="wait this long for the back-end to listen (default 30)")
    ap.add_argument("--poll", action="store_true",
                    help="no interrupts: where the device cannot hand over the "
                         "consumer's kick eventfds (pci:, whose interrupts are INTx "
                         "through uio_pci_generic), watch the vrings for the back-end "
                         "instead of taking kicks as interrupts")
    ap.add_argument("--watch-rings", action="store_true",
                    help="poll mode, and watch the vrings for the back-end even where the "
                         "device could hand over the consumer's kick eventfds (over "
                         "vfio-user it does, and nothing then polls): the appliance VM's "
                         "data path, in a process appliance")
    ap.add_argument("--poll-us", type=int, default=DEFAULT_SPIN_US, metavar="US",
                    help="in poll mode, keep looking this many µs after the last "
                         f"activity before pausing (default {DEFAULT_SPIN_US})")
    ap.add_argument("--reply-timeout", type=float, default=REPLY_WAIT, metavar="S",
                    help="end the session when the back-end takes longer than this to "
                         f"answer a request (default {REPLY_WAIT:g})")
    add_message_timeout(ap)
    ap.add_argument("-v", "--verbose", action="count", default=0,
                    help="more logging (-v info, -vv debug)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    apply_message_timeout(ap, args)
    if not 0 < args.reply_timeout <= 3600:
        ap.error("--reply-timeout must be more than 0 and at most 3600 seconds")
    if not 0 < args.connect_timeout <= 3600:
        ap.error("--connect-timeout must be more than 0 and at most 3600 seconds")
    args.poll = args.poll or args.watch_rings
    if not 0 <= args.poll_us <= 1_000_000:
        ap.error("--poll-us must be between 0 and 1000000")
    if len(os.fsencode(args.backend_socket)) > 107:
        ap.error("--backend-socket: a UNIX socket path is at most 107 bytes")
    if args.backend_cmd is not None:
        try:
            argv = shlex.split(args.backend_cmd)
        except ValueError as e:
            ap.error(f"--backend-cmd: {e}")
        if not argv:
            ap.error("--backend-cmd is empty")
        if shutil.which(argv[0]) is None:
            ap.error(f"--backend-cmd: {argv[0]}: no such program")
    if args.backend_cmd is None and not os.path.exists(args.backend_socket):
        print(f"note: nothing listens on {args.backend_socket} yet; waiting for it when a "
              "consumer comes", file=sys.stderr)
    setup_logging(args.verbose)
    bridge = Bridge(args)
    try:
        return until_stopped(bridge.run)
    finally:
        bridge.close()


if __name__ == "__main__":
    raise SystemExit(main())
