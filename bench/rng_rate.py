"""Does vhost-user-rng's rate limit hold? The Python front-end keeps 8 requests of 64 bytes
in the ring at all times for --seconds against a daemon started with --max-bytes N
--period MS, and reports the bytes per second it got against the limit (N per period),
for a few limits, each measured --repeat times (median). Without a limit it reports the
unlimited rate for scale.

    python bench/rng_rate.py [--seconds 5] [--repeat 3] [--write]
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from daemon import Daemon

from vhostuser.frontend.client import Frontend
from vhostuser.frontend.rng import RngClient
from vhostuser.protocol import VirtioFeature

LIMITS = [(4096, 100), (65536, 1000), (1024, 50), None]  # (max bytes, period ms)


def rate(limit: tuple[int, int] | None, seconds: float, tmp: Path) -> float:
    sock = tmp / "rng.sock"
    extra = ["--max-bytes", str(limit[0]), "--period", str(limit[1])] if limit else []
    d = Daemon(["vhostuser.cli.rng", "--socket-path", str(sock), *extra], sock, tmp / "log")
    try:
        with Frontend(d.sock) as fe:
            fe.negotiate(VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX)
            fe.set_mem_table()
            fe.setup_queue(0, 16)
            rng = RngClient(fe)
            for _ in range(8):
                rng.submit(64)
            got = 0
            start = time.monotonic()
            end = start + seconds
            while time.monotonic() < end:
                for _head, data in rng.complete(1, timeout=30):
                    got += len(data)
                    rng.submit(64)
            return got / (time.monotonic() - start)
    finally:
        d.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="append to bench/RESULTS.md")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for i, limit in enumerate(LIMITS):
            runs = []
            for r in range(args.repeat):
                sub = Path(d) / f"{i}-{r}"
                sub.mkdir()
                runs.append(rate(limit, args.seconds, sub))
            med = statistics.median(runs)
            want = limit[0] * 1000 / limit[1] if limit else None
            rows.append((limit, want, med, runs))
            print(f"limit {limit}: {med:.0f} B/s" + (f" (limit {want:.0f} B/s, "
                  f"{med / want:.3f}x)" if want else " (no limit)"), flush=True)
    if args.write:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        now = datetime.datetime.now(datetime.UTC)
        lines = [f"\n## rng_rate {now:%Y-%m-%d %H:%M} UTC\n",
                 f"Command: `python bench/rng_rate.py --seconds {args.seconds} --repeat "
                 f"{args.repeat} --write`\n",
                 f"- machine: {platform.platform()}; {os.cpu_count()} CPUs; commit {commit}",
                 "- the Python front-end keeps 8 requests of 64 B in the ring; median of "
                 f"{args.repeat} runs of {args.seconds} s\n",
                 "| --max-bytes / --period | limit B/s | measured B/s (median) | ratio | runs |",
                 "|---|---|---|---|---|"]
        for limit, want, med, runs in rows:
            name = f"{limit[0]} / {limit[1]} ms" if limit else "none"
            lines.append(f"| {name} | {want:.0f} | {med:.0f} | {med / want:.3f} | "
                         if want else f"| {name} | - | {med:.0f} | - | ")
            lines[-1] += ", ".join(f"{r:.0f}" for r in runs) + " |"
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
