"""Helpers for tests that boot QEMU guests on ports of our ``vhost-user-switch``.

`SwitchDaemon` runs the switch as a subprocess (optionally inside a network namespace),
waits until every listening port and the control socket exist, reads its counters with
``vhost-user-switch stats`` and stops it with SIGTERM. `Netns` is a throw-away network
namespace (``vutest-<pid>``). Everything else builds QEMU arguments and guest shell
snippets.

Addressing: only 192.0.2.0/24 (RFC 5737 TEST-NET-1), inside guests and inside a namespace
the test creates; nothing is ever configured in the host's own network namespace.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from daemon import Program
from qemu_helpers import require_guest_prerequisites, require_tool

NET_MODULES = ["virtio_pci", "virtio_net"]
NET_PREFIX = "192.0.2."  # TEST-NET-1: the only addresses these tests use
# A frame-format problem, never a legitimate race: the switch must never count these.
FORMAT_DROPS = ("bad_header", "runt", "oversize", "bad_source_mac", "rx_buffer_too_small")


def require_net_prerequisites() -> None:
    """Fail (never skip) when QEMU, a kernel, a static busybox, ``ip`` or the switch is
    missing."""
    require_guest_prerequisites()
    require_tool("ip", "iproute2")
    require_tool("vhost-user-switch", "the project: pip install -e .")


def mac(n: int) -> str:
    return f"52:54:00:00:00:{n:02x}"


def net_qemu_args(sock: Path, guest_mac: str, queues: int = 1,
                  packed: bool = False, props: str = "") -> list[str]:
    """A virtio-net-pci NIC on a vhost-user switch port (``queues`` pairs; with more than
    one, the guest gets ``mq=on`` and 2 vCPUs so that it uses them).

    ``vectors=0`` (legacy INTx instead of MSI-X) works around a QEMU 7.2 crash: under TCG,
    with MSI-X, QEMU segfaults (NULL+0x28 in msix_set_vector_notifiers <- vhost_net_start)
    when the guest driver sets DRIVER_OK on any vhost-user-net device - also with DPDK's
    net_vhost as the back-end, so it is not the switch's doing. Per-queue evidence then
    comes from the guest's ``ethtool -S`` counters rather than /proc/interrupts.
    ``packed``: the NIC offers packed virtqueues; ``props``: more virtio-net-pci
    properties (``guest_tso4=off,...``).
    """
    netdev = f"vhost-user,id=n0,chardev=c0,queues={queues}"
    device = f"virtio-net-pci,netdev=n0,mac={guest_mac},vectors=0"
    if packed:
        device += ",packed=on"
    if props:
        device += f",{props}"
    args = ["-chardev", f"socket,id=c0,path={sock}", "-netdev", netdev]
    if queues > 1:
        args += ["-device", f"{device},mq=on", "-smp", "2"]
    else:
        args += ["-device", device]
    return args


def guest_net_setup(*addrs: str) -> str:
    """Shell: IPv6 off (so the guest sends nothing but what the test asks for), eth0 up
    with ``addrs`` (each /24 in TEST-NET-1), then ``UP`` and the MAC on the console."""
    for a in addrs:
        assert a.startswith(NET_PREFIX), f"{a} is outside 192.0.2.0/24"
    adds = "\n".join(f"ip addr add {a}/24 dev eth0" for a in addrs)
    return f"""
for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 /proc/sys/net/ipv6/conf/default/disable_ipv6 \\
         /proc/sys/net/ipv6/conf/eth0/disable_ipv6; do
    [ -e $f ] && echo 1 > $f
done
ip link set lo up
{adds}
ip link set eth0 up
echo "MAC $(cat /sys/class/net/eth0/address)"
echo UP
"""


def wait_reachable(addr: str, tries: int = 90) -> str:
    """Shell: ping ``addr`` once a second until it answers (the peer boots concurrently);
    prints ``REACHABLE <addr> <tries>`` or ``UNREACHABLE <addr>``."""
    return f"""
n=0
until ping -c 1 -W 1 {addr} >/dev/null 2>&1; do
    n=$((n + 1))
    if [ $n -ge {tries} ]; then echo "UNREACHABLE {addr}"; break; fi
    sleep 0.2
done
[ $n -lt {tries} ] && echo "REACHABLE {addr} $n"
"""


def retry(command: str, tries: int) -> str:
    """Shell: run ``command`` every 0.2 s until it succeeds, at most ``tries`` times (the
    peer may not listen yet); ``$i`` is left with the number of retries."""
    return f"""
i=0
until {command}; do
    i=$((i + 1))
    [ $i -ge {tries} ] && break
    sleep 0.2
done
"""


def ethtool_files() -> dict[str, bytes | Path]:
    """The host's ethtool and the shared libraries it needs, as GuestVM ``files`` (busybox
    has no ethtool; ``ethtool -S`` gives virtio-net's per-queue packet counters)."""
    binary = require_tool("ethtool", "ethtool")
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=30)
    libs = re.findall(r"(/\S+) \(0x", out.stdout)
    if out.returncode != 0 or not any("ld-linux" in lib for lib in libs):
        pytest.fail(f"cannot list the libraries of {binary}:\n{out.stdout}{out.stderr}")
    files: dict[str, bytes | Path] = {"bin/ethtool": Path(binary)}
    for lib in libs:
        files[lib.lstrip("/")] = Path(lib)
    return files


# --------------------------------------------------------------------------- output parsing


def tagged(lines: list[str], tag: str) -> str:
    """The rest of the single line ``TAG rest`` (the digest only, for sha256sum)."""
    found = [line[len(tag) + 1 :] for line in lines if line.startswith(tag + " ")]
    assert len(found) == 1, (f"expected one {tag!r} line in the guest output, got {found}:\n"
                             + "\n".join(lines))
    return found[0].removesuffix("  -").strip()


_LOSS = re.compile(r"(\d+) packets transmitted, (\d+) packets received,.* (\d+)% packet loss")


def ping_result(line: str) -> tuple[int, int, int]:
    """(transmitted, received, loss %) from busybox ping's summary line."""
    m = _LOSS.search(line)
    assert m, f"not a ping summary: {line!r}"
    sent, got, loss = (int(g) for g in m.groups())
    return sent, got, loss


def ethtool_stats(lines: Sequence[str]) -> dict[str, int]:
    """``name: value`` lines of ``ethtool -S``."""
    stats = {}
    for line in lines:
        name, sep, value = line.strip().partition(": ")
        if sep and value.strip().isdigit():
            stats[name] = int(value)
    return stats


# --------------------------------------------------------------------------- the switch


class SwitchDaemon:
    """``vhost-user-switch --port SPEC... [--tap NAME] --control CTL -vv`` as a subprocess,
    optionally inside network namespace ``netns`` (``ip netns exec`` execs the switch, so
    the process we hold is the switch itself)."""

    def __init__(self, tmp_path: Path, ports: Sequence[str], *, tap: str | None = None,
                 netns: str | None = None, name: str = "switch") -> None:
        self.binary = require_tool("vhost-user-switch", "the project: pip install -e .")
        self.control = tmp_path / f"{name}.ctl"
        self.log_path = tmp_path / f"{name}.log"
        self.ports = list(ports)
        cmd = [self.binary]
        for spec in ports:
            cmd += ["--port", spec]
        if tap is not None:
            cmd += ["--tap", tap]
        cmd += ["--control", str(self.control), "-vv"]
        self.cmd = (["ip", "netns", "exec", netns] if netns else []) + cmd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self, tail: int = 80) -> str:
        lines = self.log.splitlines()
        return (f"switch: {' '.join(self.cmd)}\n--- switch log (last {tail} lines) ---\n"
                + "\n".join(lines[-tail:]))

    def start(self, timeout: float = 20.0) -> SwitchDaemon:
        # Each listening port's path (and the control socket) appears once it listens.
        paths = [Path(spec.split(",")[0]) for spec in self.ports
                 if ",client" not in spec and not spec.startswith("vvu=")]
        paths.append(self.control)
        self.proc = Program(self.cmd, self.log_path, ready=paths, timeout=timeout)
        return self

    def stats(self) -> dict[str, Any]:
        """The switch's counters (``vhost-user-switch stats --control CTL``)."""
        self.assert_alive()
        out = subprocess.run([self.binary, "stats", "--control", str(self.control)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, (f"stats failed ({out.returncode}): {out.stderr}\n"
                                     f"{self.describe()}")
        return json.loads(out.stdout)

    def assert_alive(self) -> None:
        assert self.proc is not None
        assert self.proc.poll() is None, (f"the switch died with status {self.proc.returncode}"
                                          f"\n{self.describe()}")

    def wait_queues(self, want: dict[str, list[int]], timeout: float = 10.0) -> dict[str, Any]:
        """Poll the counters until every port in ``want`` is connected and runs exactly
        those queues; fail (with the switch log) if that does not happen in ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            got = {p["name"]: (p.get("connected"), p.get("queues")) for p in st["ports"]}
            if all(got.get(n) == (True, q) for n, q in want.items()):
                return st
            if time.monotonic() > deadline:
                pytest.fail(f"ports did not run the expected queues {want} within {timeout}s"
                            f" of the guests bringing eth0 up; (connected, queues) = {got}\n"
                            f"{json.dumps(st, indent=1)}\n{self.describe()}")
            time.sleep(0.25)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the switch ignored SIGTERM for {timeout}s\n{self.describe()}")

    def kill(self) -> None:
        """Forced cleanup: SIGKILL the switch's process group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def __enter__(self) -> SwitchDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def port_stats(stats: dict[str, Any], name: str) -> dict[str, Any]:
    for p in stats["ports"]:
        if p["name"] == name:
            return p
    raise AssertionError(f"no port {name!r} in {json.dumps(stats, indent=1)}")


def learned(stats: dict[str, Any]) -> dict[str, str]:
    """Learned MAC -> port name."""
    return {m["mac"]: m["port"] for m in stats["macs"]}


def format_drops(port: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in port["drops"].items() if k in FORMAT_DROPS}


# --------------------------------------------------------------------------- netns


class Netns:
    """A network namespace ``vutest-<pid>`` for the test's lifetime (deleted on exit, with
    every interface in it)."""

    def __init__(self, suffix: str = "") -> None:
        self.ip = require_tool("ip", "iproute2")
        self.name = f"vutest-{os.getpid()}{suffix}"
        self.created = False

    def run(self, *cmd: str, timeout: float = 30.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """``cmd`` inside the namespace."""
        out = subprocess.run([self.ip, "netns", "exec", self.name, *cmd], capture_output=True,
                             text=True, timeout=timeout)
        if check and out.returncode != 0:
            pytest.fail(f"in netns {self.name}: {' '.join(cmd)} exited {out.returncode}:\n"
                        f"{out.stdout}{out.stderr}")
        return out

    def __enter__(self) -> Netns:
        if self.name in self.list():
            subprocess.run([self.ip, "netns", "del", self.name], capture_output=True)
        out = subprocess.run([self.ip, "netns", "add", self.name], capture_output=True,
                             text=True)
        if out.returncode != 0:
            pytest.fail(f"ip netns add {self.name} failed: {out.stderr}")
        self.created = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def delete(self) -> None:
        if self.created:
            subprocess.run([self.ip, "netns", "del", self.name], capture_output=True)
            self.created = False

    def list(self) -> list[str]:
        out = subprocess.run([self.ip, "netns", "list"], capture_output=True, text=True)
        return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
