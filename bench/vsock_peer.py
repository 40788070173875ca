"""vhost-user-vsock against rust-vmm's vhost-device-vsock (Debian sid's, run from the
scripts/sid-qemu chroot), in the same run, interleaved: our Python front-end plays the
guest, opens a stream to a host program (a thread that drains a UNIX socket) and sends
--mib MiB as 4 KiB RW packets, 8 per kick, within the credit the back-end grants. Reports
MiB/s per back-end (median of --repeat runs).

    python bench/vsock_peer.py [--mib 64] [--repeat 3] [--write]

The guest side is Python for both back-ends and bounds the rate: the comparison is of the
back-ends under the same driver, not of what a Linux guest would reach.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from vhostuser.devices.vsock import HDR
from vhostuser.frontend.client import Frontend
from vhostuser.frontend.vsock import VsockClient
from vhostuser.protocol import ProtocolFeature, VirtioFeature

ROOT = Path(__file__).resolve().parents[1]
PKT, BURST = 4096, 8
REQUEST, RESPONSE, RW, CREDIT_UPDATE = 1, 2, 5, 6


def start(kind: str, tmp: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    sock, uds = str(tmp / "vsock.sock"), str(tmp / "vm.vsock")
    if kind == "ours":
        cmd = [sys.executable, "-m", "vhostuser.cli.vsock", "--socket-path", sock,
               "--guest-cid", "3", "--uds-path", uds]
    else:
        cmd = [str(ROOT / "scripts" / "sid-qemu"), "exec", "--", "vhost-device-vsock",
               "--guest-cid", "3", "--socket", sock, "--uds-path", uds]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{kind} did not start: {cmd}")
        time.sleep(0.05)
    return proc, sock, uds


def run(kind: str, mib: int, tmp: Path) -> float:
    proc, sock, uds = start(kind, tmp)
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(f"{uds}_1234")
    lst.listen()
    got = [0]

    def drain() -> None:
        conn, _ = lst.accept()
        while chunk := conn.recv(1 << 20):
            got[0] += len(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        fe = Frontend(sock, connect_timeout=30)
        fe.negotiate(VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX,
                     ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG)
        fe.set_mem_table()
        for q in range(3):
            fe.setup_queue(q, 256)
        g = VsockClient(fe, 3, rx_buffers=64, buf_alloc=1 << 20)
        g.send(5000, 1234, REQUEST)
        resp = g.recv()[0]
        assert resp.op == RESPONSE, resp
        window, fwd = resp.buf_alloc, resp.fwd_cnt
        ring, ram = fe.queues[1].ring, fe.ram
        bufs = [ram.alloc(HDR.size + PKT) for _ in range(BURST)]
        for b in bufs:
            ram.at(b, HDR.size)[:] = HDR.pack(3, 2, 5000, 1234, PKT, 1, RW, 0, 1 << 20, 0)
        total, sent = mib << 20, 0
        t0 = time.perf_counter()
        while sent < total:
            while window - (sent - fwd) < BURST * PKT:  # wait for credit
                for p in g.recv(timeout=30):
                    if p.op == CREDIT_UPDATE or p.op == RW:
                        window, fwd = p.buf_alloc, max(fwd, p.fwd_cnt)
            for b in bufs:
                ring.add([(b, HDR.size + PKT, False)])
            fe.kick(1)
            fe.wait_used(1, BURST, timeout=30)
            sent += BURST * PKT
            while fe.queues[0].ring.used_idx() != fe.queues[0].ring.last_used:
                for p in g.recv():
                    window, fwd = p.buf_alloc, max(fwd, p.fwd_cnt)
        while got[0] < total:
            time.sleep(0.001)  # the host program has everything
        return total / (time.perf_counter() - t0) / (1 << 20)
    finally:
        proc.terminate()
        proc.wait(10)
        lst.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="append to bench/RESULTS.md")
    args = ap.parse_args()
    results: dict[str, list[float]] = {"ours": [], "vhost-device-vsock": []}
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.repeat):
            for kind in results:  # interleaved
                sub = Path(d) / f"{kind}{i}"
                sub.mkdir()
                results[kind].append(run(kind, args.mib, sub))
                print(f"{kind}: {results[kind][-1]:.1f} MiB/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["ours"] / med["vhost-device-vsock"]
    print(f"median: ours {med['ours']:.1f}, vhost-device-vsock {med['vhost-device-vsock']:.1f}"
          f" MiB/s; ours/peer {ratio:.2f}")
    if args.write:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        version = subprocess.run([str(ROOT / "scripts" / "sid-qemu"), "exec", "--", "dpkg-query",
                                  "-W", "vhost-device-vsock"], capture_output=True,
                                 text=True).stdout.strip()
        now = datetime.datetime.now(datetime.UTC)
        lines = [f"\n## vsock_peer {now:%Y-%m-%d %H:%M} UTC\n",
                 f"Command: `python bench/vsock_peer.py --mib {args.mib} --repeat "
                 f"{args.repeat} --write`\n",
                 f"- machine: {platform.platform()}; {os.cpu_count()} CPUs; commit {commit}",
                 f"- peer: {version} (Debian sid, scripts/sid-qemu exec)",
                 f"- the Python front-end as the guest: {args.mib} MiB as 4 KiB RW packets, "
                 f"{BURST} per kick, to a host program draining a UNIX socket; interleaved, "
                 f"median of {args.repeat}\n",
                 "| back-end | MiB/s (median) | runs |", "|---|---|---|"]
        for kind, runs in results.items():
            lines.append(f"| {kind} | {med[kind]:.1f} | {', '.join(f'{r:.1f}' for r in runs)} |")
        lines.append(f"\nours / vhost-device-vsock: {ratio:.2f}")
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
