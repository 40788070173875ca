"""vhost-user-fs against QEMU's virtiofsd (the C one of Debian 12's QEMU 7.2), in the same
run, interleaved: our Python front-end plays the guest's virtiofs driver and sends FUSE
requests over the virtqueues to each. Reports per-operation latency (median µs of
--ops requests, one at a time) and 1 MiB READ/WRITE throughput at 1 and 4 requests in
flight (MiB/s), each the median of --repeat runs, fresh back-end per run.

    python bench/fs_peer.py [--ops 2000] [--mib 256] [--repeat 3] [--write]

The shares are in /dev/shm (tmpfs): what is measured is the server, not a disk. Both
servers run in their default sandbox (a mount namespace). The driver is Python for both
and its own cost is in every figure.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from vhostuser.frontend.client import Frontend
from vhostuser.frontend.fs import FsClient
from vhostuser.fuse import abi
from vhostuser.fuse.abi import Op
from vhostuser.protocol import VirtioFeature

ROOT = Path(__file__).resolve().parents[1]
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
MiB = 1 << 20
QUEUE = 256
PEERS = ("ours", "virtiofsd")


def start(kind: str, tmp: Path, share: Path) -> tuple[subprocess.Popen[bytes], str]:
    sock = str(tmp / f"{kind}.sock")
    if kind == "ours":
        cmd = [sys.executable, "-m", "vhostuser.cli.fs", "--socket-path", sock,
               "--shared-dir", str(share), "--tag", "bench"]
    else:
        cmd = [VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={share}", "-o", "cache=auto"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{kind} did not start: {cmd}")
        time.sleep(0.05)
    return proc, sock


def connect(sock: str) -> tuple[Frontend, FsClient]:
    fe = Frontend(sock, ram_size=256 * MiB, connect_timeout=30)
    fe.negotiate(VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX)
    fe.set_mem_table()
    fe.setup_queue(0, QUEUE)
    fe.setup_queue(1, QUEUE)
    c = FsClient(fe, arena=64 * MiB)
    c.init(flags=abi.ASYNC_READ | abi.BIG_WRITES | abi.MAX_PAGES | abi.DO_READDIRPLUS
           | abi.PARALLEL_DIROPS)
    return fe, c


def latency(fn: Callable[[], object], n: int) -> float:
    """Median µs of `n` calls (after 50 not counted)."""
    for _ in range(50):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def stream(c: FsClient, op: Op, nodeid: int, fh: int, mib: int, depth: int) -> float:
    """MiB/s of `mib` 1 MiB READs or WRITEs with `depth` in flight."""
    data = os.urandom(MiB) if op == Op.WRITE else b""
    slot = 2 * MiB + 4096
    t0 = time.perf_counter()
    issued = done = 0
    inflight: dict[int, int] = {}
    while done < mib:
        while issued < mib and len(inflight) < depth:
            at = (issued % depth) * slot
            body = (abi.WRITE_IN if op == Op.WRITE else abi.READ_IN).pack(
                fh, issued * MiB, MiB, 0, 0, 0, 0)
            head, reply = c.submit(op, nodeid, body, data,
                                   reply=abi.OUT_HEADER.size + (8 if data else MiB), at=at)
            inflight[head] = reply
            issued += 1
        for head, written in c.fe.wait_used(1, 1, timeout=30):
            out = c.reply_of(inflight.pop(head), written)
            if len(out) != (8 if data else MiB):
                raise RuntimeError(f"{op.name}: a reply of {len(out)} bytes")
            done += 1
    return mib / (time.perf_counter() - t0)


def run(kind: str, tmp: Path, ops: int, mib: int) -> dict[str, float]:
    share = tmp / "share"
    share.mkdir()
    (share / "f").write_bytes(b"x" * 4096)
    with open(share / "big", "wb") as f:
        f.truncate(mib * MiB)
    proc, sock = start(kind, tmp, share)
    out: dict[str, float] = {}
    try:
        fe, c = connect(sock)
        with fe:
            f = c.lookup(1, b"f")
            out["GETATTR µs"] = latency(lambda: c.getattr(f.nodeid), ops)
            out["LOOKUP µs"] = latency(lambda: c.lookup(1, b"f"), ops)

            def open_release() -> None:
                c.release(f.nodeid, c.open(f.nodeid, os.O_RDONLY))
            out["OPEN+RELEASE µs"] = latency(open_release, ops)
            fh = c.open(f.nodeid, os.O_RDONLY)
            out["READ 4 KiB µs"] = latency(lambda: c.read(f.nodeid, fh, 0, 4096), ops)
            c.release(f.nodeid, fh)
            names = iter(range(10**9))

            def create_unlink() -> None:
                name = f"n{next(names)}".encode()
                entry, wfh = c.create(1, name)
                c.release(entry.nodeid, wfh)
                c.unlink(1, name)
                c.forget(entry.nodeid)
            out["CREATE+RELEASE+UNLINK µs"] = latency(create_unlink, ops // 4)
            big = c.lookup(1, b"big")
            bfh = c.open(big.nodeid, os.O_RDWR)
            for depth in (1, 4):
                out[f"WRITE 1 MiB QD{depth} MiB/s"] = stream(c, Op.WRITE, big.nodeid, bfh, mib,
                                                             depth)
                out[f"READ 1 MiB QD{depth} MiB/s"] = stream(c, Op.READ, big.nodeid, bfh, mib,
                                                            depth)
            c.release(big.nodeid, bfh)
    finally:
        proc.terminate()
        proc.wait(10)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="append to bench/RESULTS.md")
    args = ap.parse_args()
    results: dict[str, list[dict[str, float]]] = {k: [] for k in PEERS}
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        for i in range(args.repeat):
            for kind in PEERS:  # interleaved
                sub = Path(d) / f"{kind}{i}"
                sub.mkdir()
                results[kind].append(run(kind, sub, args.ops, args.mib))
                print(kind, {k: round(v, 1) for k, v in results[kind][-1].items()}, flush=True)
    metrics = list(results["ours"][0])
    med = {k: {m: statistics.median(r[m] for r in v) for m in metrics}
           for k, v in results.items()}
    rows = []
    for m in metrics:
        a, b = med["ours"][m], med["virtiofsd"][m]
        ratio = b / a if m.endswith("µs") else a / b  # > 1: ours better
        rows.append(f"| {m} | {a:.1f} | {b:.1f} | {ratio:.2f} |")
    table = ["| metric | ours | virtiofsd | ours vs virtiofsd (>1: ours better) |",
             "|---|---|---|---|", *rows]
    print("\n".join(table))
    if args.write:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=ROOT).stdout.strip()
        version = subprocess.run([VIRTIOFSD, "--version"], capture_output=True,
                                 text=True).stdout.splitlines()[0]
        now = datetime.datetime.now(datetime.UTC)
        lines = [f"\n## fs_peer {now:%Y-%m-%d %H:%M} UTC\n",
                 f"Command: `python bench/fs_peer.py --ops {args.ops} --mib {args.mib} "
                 f"--repeat {args.repeat} --write`\n",
                 f"- machine: {platform.platform()}; {os.cpu_count()} CPUs; commit {commit}",
                 f"- peer: {version} ({VIRTIOFSD}), -o cache=auto, default sandbox",
                 "- ours: vhost-user-fs, defaults (namespace sandbox, 8 threads)",
                 "- the Python front-end as the guest's virtiofs driver; shares in /dev/shm; "
                 f"interleaved, median of {args.repeat} runs (latency: median of --ops "
                 "requests in each run)\n", *table]
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
