"""Network benchmark: our vhost-user-net / vhost-user-switch against DPDK, same run, same
front-end (DPDK virtio_user in testpmd).

1. sink: virtio_user txonly -> back-end. Ours: `vhost-user-net` (one port, no uplink: frames
   are validated, counted and dropped). DPDK: testpmd net_vhost in rxonly mode.
2. forwarding: virtio_user txonly -> back-end -> virtio_user rxonly. Ours: a two-port
   `vhost-user-switch`. DPDK: testpmd io-forwarding between two net_vhost ports.

Back-ends on CPU 0, front-ends on CPU 1; Mpps is the median of per-second rates read from
the back-end's own counters: frames received (sink), frames put into the receiving
front-end's ring (forwarding; the two testpmd front-ends share CPU 1, so their own
counters are sampled too unevenly to rely on).

    python bench/net_dpdk.py [--seconds 8] [--sizes 64,1500] [--rounds N]
                             [--devargs packed_vq=1] [--write]

`--devargs` goes to every virtio_user front-end (packed_vq=1: packed rings, for ours and
for DPDK's vhost alike); `--rounds` measures ours and DPDK alternately N times and reports
the medians.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from dpdk import Testpmd, dpdk_version, median_mpps  # noqa: E402


def ctl_count(ctl: str, port: int, field: str) -> int:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(ctl)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(json.loads(data)["ports"][port][field])


@contextmanager
def ours(argv: list[str], sock: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", *argv],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv} did not start")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(15)


def rates_from_ctl(ctl: str, port: int, seconds: float, field: str = "rx_packets") -> float:
    samples, last, t_last = [], ctl_count(ctl, port, field), time.monotonic()
    end = t_last + seconds
    while time.monotonic() < end:
        time.sleep(1.0)
        now_n, now_t = ctl_count(ctl, port, field), time.monotonic()
        samples.append((now_n - last) / (now_t - t_last) / 1e6)
        last, t_last = now_n, now_t
    return statistics.median(samples)


def sink_ours(d: str, size: int, seconds: float, devargs: str = "") -> float:
    sock, ctl = f"{d}/sink.sock", f"{d}/sink.ctl"
    with ours(["vhostuser.cli.net", "--socket-path", sock, "--control", ctl, "--mtu", "9000"],
              sock), Testpmd.virtio_user(sock, forward_mode="txonly", cpu=1, devargs=devargs,
                                         testpmd_args=[f"--txpkts={size}"]) as fe:
        fe.start()
        time.sleep(1)
        return rates_from_ctl(ctl, 0, seconds)


def sink_dpdk(d: str, size: int, seconds: float, devargs: str = "") -> float:
    sock = f"{d}/dpdk-sink.sock"
    with Testpmd.vhost(sock, forward_mode="rxonly", cpu=0) as be:
        be.start()
        with Testpmd.virtio_user(sock, forward_mode="txonly", cpu=1, devargs=devargs,
                                 testpmd_args=[f"--txpkts={size}"]) as fe:
            fe.start()
            time.sleep(1)
            return median_mpps(be.sample(seconds))


def fwd_ours(d: str, size: int, seconds: float, devargs: str = "") -> float:
    a, b, ctl = f"{d}/fa.sock", f"{d}/fb.sock", f"{d}/f.ctl"
    with ours(["vhostuser.cli.switch", "--port", a, "--port", f"{b}", "--control", ctl],
              b), Testpmd.virtio_user(b, forward_mode="rxonly", cpu=1, name="rx",
                                      devargs=devargs) as rx:
        rx.start()
        with Testpmd.virtio_user(a, forward_mode="txonly", cpu=1, name="tx", devargs=devargs,
                                 testpmd_args=[f"--txpkts={size}"]) as tx:
            tx.start()
            time.sleep(1)
            return rates_from_ctl(ctl, 1, seconds, "tx_packets")  # into the receiver's ring


def fwd_dpdk(d: str, size: int, seconds: float, devargs: str = "") -> float:
    a, b = f"{d}/da.sock", f"{d}/db.sock"
    for s in (a, b):
        if os.path.exists(s):
            os.unlink(s)
    with Testpmd([f"net_vhost0,iface={a},queues=1", f"net_vhost1,iface={b},queues=1"],
                 forward_mode="io", cpu=0, name="io") as be:
        be.start()
        with Testpmd.virtio_user(b, forward_mode="rxonly", cpu=1, name="rx",
                                 devargs=devargs) as rx:
            rx.start()
            with Testpmd.virtio_user(a, forward_mode="txonly", cpu=1, name="tx",
                                     devargs=devargs, testpmd_args=[f"--txpkts={size}"]) as tx:
                tx.start()
                time.sleep(1)
                return median_mpps(be.sample(seconds), port=1, field_name="tx_pps")


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    return f"{platform.platform()}; {cpu}; {os.cpu_count()} CPUs"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--sizes", default="64,1500")
    ap.add_argument("--devargs", default="",
                    help="virtio_user devargs for every front-end, e.g. packed_vq=1")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure ours and DPDK alternately this many times; the medians")
    ap.add_argument("--write", action="store_true", help="append to bench/RESULTS.md")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="net-bench-") as d:
        for size in sizes:
            for name, o, c in (("sink", sink_ours, sink_dpdk), ("forward", fwd_ours, fwd_dpdk)):
                pairs = [(o(d, size, args.seconds, args.devargs),
                          c(d, size, args.seconds, args.devargs)) for _ in range(args.rounds)]
                mo = statistics.median(x for x, _ in pairs)
                mc = statistics.median(y for _, y in pairs)
                rows.append((name, size, mo, mc))
                print(f"{name} {size} B: ours {mo:.3f} Mpps, DPDK {mc:.3f} Mpps, "
                      f"ratio {mo / mc if mc else float('nan'):.4f}", flush=True)
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [f"## net_dpdk {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC", "",
             f"Command: `{cmd}`", "", f"- machine: {machine()}",
             f"- DPDK {dpdk_version()} testpmd; back-ends on CPU 0, front-ends on CPU 1, "
             f"{args.seconds:g} s per measurement, median of per-second rates"
             + (f"; {args.rounds} rounds, ours and DPDK alternately, the medians"
                if args.rounds > 1 else "")
             + (f"; virtio_user devargs `{args.devargs}`" if args.devargs else ""), "",
             "| test | frame | ours Mpps | DPDK Mpps | ours/DPDK |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {s} B | {mo:.3f} | {mc:.3f} | {mo / mc if mc else float('nan'):.4f} |"
              for n, s, mo, mc in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
