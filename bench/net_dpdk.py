"""Network benchmark: our vhost-user-net / vhost-user-switch against DPDK, same run, same
front-end (DPDK virtio_user in testpmd).

1. sink: virtio_user txonly -> back-end. Ours: `vhost-user-net` (one port, no uplink: frames
   are validated, counted and dropped). DPDK: testpmd net_vhost in rxonly mode.
2. pvp (physical-virtual-physical loop): one testpmd with two virtio_user ports forwarding
   each port's frames out of the other (io), `start tx_first 4` filling the loop; the
   back-end between the two ports carries them back. Ours: a two-port
   `vhost-user-switch` (learning, as always). DPDK: testpmd io-forwarding between two
   net_vhost ports.

Back-ends on CPU 0, front-ends on CPU 1; Mpps is the median of per-second rates read from
the back-end's own counters: frames received (sink), frames put into either port's
receive ring (pvp).

    python bench/net_dpdk.py [--seconds 8] [--sizes 64,1500] [--rounds N]
                             [--modes python,compiled] [--tests sink,pvp]
                             [--devargs packed_vq=1] [--write]

`--devargs` goes to every virtio_user front-end (packed_vq=1: packed rings, for ours and
for DPDK's vhost alike); `--rounds` measures ours and DPDK alternately N times and reports
the medians. `--modes`: ours as pure Python (VHOSTUSER_JIT=0) and with the compiled
kernels (VHOSTUSER_JIT=1), each measured in every round.
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
from dpdk import Testpmd, dpdk_version, median_mpps, rates  # noqa: E402


def ctl_count(ctl: str, port: int, field: str) -> int:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(ctl)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(json.loads(data)["ports"][port][field])


COMPILED = {"env": {**os.environ, "VHOSTUSER_JIT": "1"}}  # ours with the compiled kernels
PYTHON = {"env": {**os.environ, "VHOSTUSER_JIT": "0"}}
MODE = PYTHON  # which of the two `ours` runs (main sets it)


@contextmanager
def ours(argv: list[str], sock: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", *argv],
                            stderr=subprocess.DEVNULL, **MODE)  # type: ignore[call-overload]
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


def pvp_frontend(a: str, b: str, size: int, devargs: str) -> Testpmd:
    """The PVP loop's guest: one testpmd with two virtio_user ports forwarding to each
    other (io), on CPU 1; `start tx_first 4` puts 4 bursts per port into the loop."""
    extra = f",{devargs}" if devargs else ""
    return Testpmd([f"net_virtio_user0,path={a},queues=1{extra}",
                    f"net_virtio_user1,path={b},queues=1{extra}"], forward_mode="io", cpu=1,
                   name="pvp", testpmd_args=[f"--txpkts={size}"])


def pvp_ours(d: str, size: int, seconds: float, devargs: str = "") -> float:
    a, b, ctl = f"{d}/pa.sock", f"{d}/pb.sock", f"{d}/p.ctl"
    with ours(["vhostuser.cli.switch", "--port", a, "--port", b, "--control", ctl],
              b), pvp_frontend(a, b, size, devargs) as fe:
        fe.command("start tx_first 4")
        time.sleep(1)
        # frames the switch put into either port's receive ring, per second
        samples, last, t_last = [], _delivered(ctl), time.monotonic()
        end = t_last + seconds
        while time.monotonic() < end:
            time.sleep(1.0)
            now_n, now_t = _delivered(ctl), time.monotonic()
            samples.append((now_n - last) / (now_t - t_last) / 1e6)
            last, t_last = now_n, now_t
        return statistics.median(samples)


def _delivered(ctl: str) -> int:
    return ctl_count(ctl, 0, "tx_packets") + ctl_count(ctl, 1, "tx_packets")


def pvp_dpdk(d: str, size: int, seconds: float, devargs: str = "") -> float:
    a, b = f"{d}/da.sock", f"{d}/db.sock"
    for s in (a, b):
        if os.path.exists(s):
            os.unlink(s)
    with Testpmd([f"net_vhost0,iface={a},queues=1", f"net_vhost1,iface={b},queues=1"],
                 forward_mode="io", cpu=0, name="io") as be:
        be.start()
        with pvp_frontend(a, b, size, devargs) as fe:
            fe.command("start tx_first 4")
            time.sleep(1)
            samples = be.sample(seconds)  # what it sent into either port, per second
            both = [x + y for x, y in zip(rates(samples, 0, "tx_pps"),
                                          rates(samples, 1, "tx_pps"), strict=True)]
            return statistics.median(both) / 1e6


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
    ap.add_argument("--modes", default="python,compiled",
                    help="ours in these modes: python (VHOSTUSER_JIT=0), compiled (=1)")
    ap.add_argument("--tests", default="sink,pvp")
    ap.add_argument("--write", action="store_true", help="append to bench/RESULTS.md")
    args = ap.parse_args()
    global MODE
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    if not set(modes) <= {"python", "compiled"}:
        ap.error("--modes: python and/or compiled")
    tests = [t for t in (("sink", sink_ours, sink_dpdk), ("pvp", pvp_ours, pvp_dpdk))
             if t[0] in args.tests.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="net-bench-") as d:
        for size in sizes:
            for name, o, c in tests:
                runs: dict[str, list[float]] = {m: [] for m in [*modes, "dpdk"]}
                for _ in range(args.rounds):  # interleaved: each mode, then DPDK
                    for m in modes:
                        MODE = COMPILED if m == "compiled" else PYTHON
                        runs[m].append(o(d, size, args.seconds, args.devargs))
                    runs["dpdk"].append(c(d, size, args.seconds, args.devargs))
                med = {m: statistics.median(v) for m, v in runs.items()}
                rows.append((name, size, med))
                print(f"{name} {size} B: " + ", ".join(f"{m} {v:.3f} Mpps"
                                                        for m, v in med.items()), flush=True)
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [f"## net_dpdk {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC", "",
             f"Command: `{cmd}`", "", f"- machine: {machine()}",
             f"- DPDK {dpdk_version()} testpmd; back-ends on CPU 0, front-ends on CPU 1, "
             f"{args.seconds:g} s per measurement, median of per-second rates"
             + (f"; {args.rounds} rounds, ours and DPDK alternately, the medians"
                if args.rounds > 1 else "")
             + (f"; virtio_user devargs `{args.devargs}`" if args.devargs else ""), "",
             "| test | frame | " + " | ".join(f"ours ({m}) Mpps" for m in modes)
             + " | DPDK Mpps | " + " | ".join(f"{m}/DPDK" for m in modes) + " |",
             "|---|---|" + "---|" * (2 * len(modes) + 1)]
    for n, size, med in rows:
        dpdk = med["dpdk"]
        lines.append(f"| {n} | {size} B | " + " | ".join(f"{med[m]:.3f}" for m in modes)
                     + f" | {dpdk:.3f} | "
                     + " | ".join(f"{med[m] / dpdk if dpdk else float('nan'):.4f}"
                                  for m in modes) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
