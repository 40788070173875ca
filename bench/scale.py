#!/usr/bin/env python3
"""Scale: many queues and ports in one daemon, and the memory each costs.

* blk: our vhost-user-blk with --num-queues 32 and qemu-storage-daemon with num-queues=32
  (the C peer), each driven by our Python front-end: every queue started and a 4 KiB read
  served through each one (checked against the image), then the daemon's memory.
* switch: our vhost-user-switch with 64 ports, a front-end on each (one queue pair), a
  frame sent from each port to the next (checked: it arrives), then the switch's memory.

Memory is read from /proc/PID/smaps_rollup of the daemon and all its descendants: PSS
(proportional: pages shared between the forked workers counted once overall — the honest
total) and RSS (summed per process, shared pages counted in each). Per queue/port: the
total PSS with everything started, less the PSS with one queue/port started, over the
number added. Each measurement is repeated --rounds times, the median reported.

    python bench/scale.py [--rounds 3] [--queues 32] [--ports 64] [--write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vhostuser.devices.net import F_MRG_RXBUF
from vhostuser.frontend.blk import BlkClient
from vhostuser.frontend.client import Frontend
from vhostuser.frontend.net import NetClient
from vhostuser.protocol.constants import VirtioFeature

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
MiB = 1 << 20


def program(name: str) -> str:
    """One of ours, from this interpreter's environment (the checkout's .venv)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name) or name


def tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo += [int(k) for k in kids]
    return out


def memory(pid: int) -> tuple[float, float, int]:
    """(PSS MiB, RSS MiB summed, processes) of `pid`'s tree."""
    pss = rss = 0
    procs = tree(pid)
    for p in procs:
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key == "Pss":
                pss += int(rest.split()[0])
            elif key == "Rss":
                rss += int(rest.split()[0])
    return pss / 1024, rss / 1024, len(procs)


def settle(pid: int, count: int, timeout: float = 20.0) -> None:
    """Wait until `pid`'s tree has `count` processes (workers forked)."""
    deadline = time.monotonic() + timeout
    while len(tree(pid)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"expected {count} processes, have {len(tree(pid))}")
        time.sleep(0.05)


@contextmanager
def daemon(argv: list[str], sock: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not start")
            time.sleep(0.02)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def blk_round(kind: str, queues: int, work: Path) -> dict[str, float]:
    img = work / "scale.img"
    sock = work / f"{kind}.sock"
    data = os.urandom(4096)
    with open(img, "wb") as f:
        f.write(data)
        f.truncate(64 * MiB)
    if kind == "ours":
        argv = [program("vhost-user-blk"), "--socket-path",
                str(sock), "--blk-file", str(img), "--num-queues", str(queues)]
        per_queue_procs = 1  # a worker process per queue
    else:
        argv = ["qemu-storage-daemon", "--blockdev",
                f"driver=file,node-name=f0,filename={img}",
                "--blockdev", "driver=raw,node-name=d0,file=f0", "--export",
                f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={sock},"
                f"writable=on,num-queues={queues}"]
        per_queue_procs = 0
    out: dict[str, float] = {}
    with daemon(argv, sock) as proc:
        base = len(tree(proc.pid))
        fe = Frontend(str(sock), ram_size=queues * 2 * MiB + 16 * MiB)
        try:
            fe.negotiate(VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX)
            fe.set_mem_table()
            for started in range(1, queues + 1):
                q = started - 1
                fe.setup_queue(q, 128)
                status, got = BlkClient(fe, q, arena=1 * MiB).read(0, 4096)
                if (status, got) != (0, data):
                    raise RuntimeError(f"{kind} queue {q}: read returned status {status}")
                if started == 1:
                    settle(proc.pid, base + per_queue_procs)
                    out["pss_1"], out["rss_1"], _ = memory(proc.pid)
            settle(proc.pid, base + per_queue_procs * queues)
            out["pss"], out["rss"], out["procs"] = memory(proc.pid)
        finally:
            fe.close()
    out["per_queue"] = (out["pss"] - out["pss_1"]) / (queues - 1)
    return out


def switch_round(ports: int, work: Path) -> dict[str, float]:
    paths = [work / f"p{i}.sock" for i in range(ports)]
    argv = [program("vhost-user-switch")]
    for p in paths:
        argv += ["--port", str(p)]
    out: dict[str, float] = {}
    clients: list[NetClient] = []
    with daemon(argv, paths[-1]) as proc:
        try:
            for i, path in enumerate(paths):
                fe = Frontend(str(path), ram_size=2 * MiB)
                fe.negotiate(VirtioFeature.VERSION_1 | F_MRG_RXBUF)
                fe.set_mem_table()
                for q in (0, 1):
                    fe.setup_queue(q, 256)
                clients.append(NetClient(fe, rx_buffers=16))
                if i == 0:
                    out["pss_1"], out["rss_1"], _ = memory(proc.pid)
            macs = [bytes([2, 0, 0, 0, i >> 8, i & 255]) for i in range(ports)]
            for i, c in enumerate(clients):  # every port speaks once: all are learned
                c.send([b"\xff" * 6 + macs[i] + b"\x08\x00" + bytes(46)])
            for i, c in enumerate(clients):  # each port to the next: that one alone gets it
                dst = macs[(i + 1) % ports]
                c.send([dst + macs[i] + b"\x08\x00" + bytes(46)])
                unicast: list[bytes] = []
                while not unicast:  # broadcasts flooded earlier may come first
                    got = clients[(i + 1) % ports].recv(1, timeout=10)
                    unicast = [f for _, f in got if f[:6] != b"\xff" * 6]
                if [f[:12] for f in unicast] != [dst + macs[i]]:
                    raise RuntimeError(f"port {i}: another frame arrived")
            out["pss"], out["rss"], out["procs"] = memory(proc.pid)
        finally:
            for c in clients:
                c.fe.close()
    out["per_port"] = (out["pss"] - out["pss_1"]) / (ports - 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queues", type=int, default=32)
    ap.add_argument("--ports", type=int, default=64)
    ap.add_argument("--write", action="store_true", help=f"append the report to {RESULTS_MD}")
    args = ap.parse_args()
    if args.rounds < 1 or args.queues < 2 or args.ports < 2:
        ap.error("--rounds >= 1, --queues and --ports >= 2")
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "qsd": [], "switch": []}
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        work = Path(tmp)
        for r in range(args.rounds):
            for kind in ("qsd", "ours"):  # interleaved
                runs[kind].append(blk_round(kind, args.queues, work))
                print(f"[scale] round {r + 1} blk {kind}: {runs[kind][-1]}", file=sys.stderr)
            runs["switch"].append(switch_round(args.ports, work))
            print(f"[scale] round {r + 1} switch: {runs['switch'][-1]}", file=sys.stderr)

    def med(kind: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[kind])

    now = dt.datetime.now(dt.UTC)
    qsd = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True,
                         text=True).stdout.splitlines()[0]
    lines = [
        f"## scale {now:%Y-%m-%d %H:%M} UTC", "",
        f"Command: `python bench/scale.py --rounds {args.rounds} --queues {args.queues} "
        f"--ports {args.ports}`", "",
        f"- machine: {platform.platform()}; {os.cpu_count()} CPUs",
        f"- qsd: {qsd}",
        f"- {args.rounds} rounds, qsd and ours alternately; medians; memory from "
        "/proc/PID/smaps_rollup of the daemon and its descendants", "",
        "| daemon | what | processes | PSS MiB | RSS MiB (summed) | PSS MiB per queue/port |",
        "|---|---|---|---|---|---|",
    ]
    for kind, what, unit in (("qsd", f"blk, {args.queues} queues", "per_queue"),
                             ("ours", f"blk, {args.queues} queues", "per_queue"),
                             ("switch", f"switch, {args.ports} ports", "per_port")):
        name = {"qsd": "qemu-storage-daemon", "ours": "vhost-user-blk",
                "switch": "vhost-user-switch"}[kind]
        lines.append(f"| {name} | {what} | {med(kind, 'procs'):.0f} | {med(kind, 'pss'):.1f} "
                     f"| {med(kind, 'rss'):.1f} | {med(kind, unit):.2f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.write:
        with RESULTS_MD.open("a") as f:
            f.write("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
