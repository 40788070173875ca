"""Drive DPDK's ``dpdk-testpmd`` as a real peer: a vhost-user back-end (``net_vhost``) or a
vhost-user front-end with no VM (``net_virtio_user``). Used by the tests and by bench/.

Why interactive mode (``-i``) driven over stdin, not ``--stats-period``:

- Every command is a synchronisation point: testpmd prints ``testpmd> `` when it has finished,
  so ``show port stats all`` gives counters *as of now*, and ``start`` / ``stop`` happen
  when we say. With ``--stats-period`` forwarding starts at once and stops only on a signal,
  so two processes can't be stopped in a chosen order, which exact accounting needs
  (stop the sender, let the receiver drain the ring, then stop the receiver).
- ``stop`` prints the forward statistics (TX-dropped: packets the engine gave up on), which
  the NIC counters don't show.
- Per-second rates come from ``show port stats all`` every second ("Throughput (since last
  show)", measured by testpmd on CLOCK_MONOTONIC): the same block that ``--stats-period``
  prints, and `median_mpps` reads both. Non-interactive ``--stats-period`` mode is kept
  (``stats_period=N``) for benchmarks that want testpmd's own timer.

stdout is a pipe, so testpmd's printf output would be block-buffered and arrive late or
out of order; it runs under ``stdbuf -oL``. stderr (EAL / VHOST_CONFIG logs) is merged in.
Each instance gets its own ``--file-prefix`` and removes ``/var/run/dpdk/<prefix>`` on
close; a failure at any point kills the process (it runs in its own session).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import stat
import statistics
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

INSTALL_HINT = "apt-get install dpdk dpdk-dev"
PROMPT = "testpmd> "
_counter = itertools.count()


class TestpmdError(RuntimeError):
    """testpmd failed to start, exited early, or did not answer in time."""

    __test__ = False  # not a pytest test class, despite the name


class TestpmdMissing(TestpmdError):
    """No dpdk-testpmd binary."""


def find_testpmd() -> str:
    """Path of dpdk-testpmd; raises TestpmdMissing with the install command."""
    path = shutil.which("dpdk-testpmd")
    if path is None:
        raise TestpmdMissing(f"dpdk-testpmd not found in PATH: {INSTALL_HINT}")
    if shutil.which("stdbuf") is None:
        raise TestpmdMissing("stdbuf (coreutils) not found; needed to line-buffer testpmd")
    return path


def dpdk_version() -> str:
    """The installed DPDK version, from the Debian package (testpmd has no --version)."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "dpdk-dev"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout:
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown"


# ---------------------------------------------------------------- output parsing

_KEY_VALUE = re.compile(r"([A-Za-z]+-[A-Za-z]+):\s*(\d+)")
_NIC_BLOCK = re.compile(r"NIC statistics for port (\d+)\s*#+(.*?)\n\s*#{20,}", re.S)
_FWD_BLOCK = re.compile(r"Forward statistics for port (\d+)\s*-+(.*?)\n\s*-{20,}", re.S)


def _attr(key: str) -> str:
    return key.lower().replace("-", "_")


@dataclass(frozen=True)
class PortStats:
    """One "NIC statistics for port N" block (``show port stats``): counters since the port
    started or since ``clear port stats``, and the rates since the previous show."""

    port: int
    rx_packets: int = 0
    rx_missed: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0
    rx_nombuf: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_bytes: int = 0
    rx_pps: int = 0
    rx_bps: int = 0
    tx_pps: int = 0
    tx_bps: int = 0


@dataclass(frozen=True)
class FwdStats:
    """One "Forward statistics for port N" block (printed by ``stop``): counts since
    ``start``. RX-dropped is the port's RX-missed; TX-dropped is what the forwarding engine
    dropped after tx_burst refused it *plus* the port's TX-errors."""

    port: int
    rx_packets: int = 0
    rx_dropped: int = 0
    rx_total: int = 0
    rx_error: int = 0
    rx_nombufs: int = 0
    tx_packets: int = 0
    tx_dropped: int = 0
    tx_total: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def _fill(cls: type, port: int, body: str) -> object:
    known = set(cls.__dataclass_fields__)
    values: dict[str, int] = {}
    extra: dict[str, int] = {}
    for key, num in _KEY_VALUE.findall(body):
        name = _attr(key)
        (values if name in known else extra)[name] = int(num)
    if "extra" in known:
        return cls(port, **values, extra=extra)
    return cls(port, **values)


def parse_port_stats(text: str) -> list[dict[int, PortStats]]:
    """Every ``show port stats all`` / ``--stats-period`` display in `text`, in order, as
    {port: PortStats}. A new display starts when a port number repeats."""
    displays: list[dict[int, PortStats]] = []
    current: dict[int, PortStats] = {}
    for m in _NIC_BLOCK.finditer(text):
        port = int(m.group(1))
        if port in current:
            displays.append(current)
            current = {}
        current[port] = _fill(PortStats, port, m.group(2))  # type: ignore[assignment]
    if current:
        displays.append(current)
    return displays


def parse_fwd_stats(text: str) -> dict[int, FwdStats]:
    """The last forward statistics of each port in `text` (empty if none)."""
    out: dict[int, FwdStats] = {}
    for m in _FWD_BLOCK.finditer(text):
        port = int(m.group(1))
        out[port] = _fill(FwdStats, port, m.group(2))  # type: ignore[assignment]
    return out


def rates(samples: str | Iterable[dict[int, PortStats]], port: int = 0,
          field_name: str = "rx_pps") -> list[int]:
    """The per-display values of one rate (rx_pps, tx_pps, rx_bps, tx_bps) of `port`, from
    testpmd output text (``--stats-period`` or repeated ``show port stats``) or from parsed
    displays."""
    displays = parse_port_stats(samples) if isinstance(samples, str) else samples
    return [getattr(d[port], field_name) for d in displays if port in d]


def median_mpps(samples: str | Iterable[dict[int, PortStats]], port: int = 0,
                field_name: str = "rx_pps", trim_idle: bool = True) -> float:
    """Median of the per-second rate in millions (Mpps for *_pps). With `trim_idle`, zero
    samples before traffic starts and after it ends (and testpmd's first display, which
    is always 0: it has no previous one) are left out; zeros in between count."""
    values = rates(samples, port, field_name)
    if trim_idle:
        while values and values[0] == 0:
            values.pop(0)
        while values and values[-1] == 0:
            values.pop()
    if not values:
        return 0.0
    return statistics.median(values) / 1e6


@dataclass(frozen=True)
class RunResult:
    """Counters at the end of `Testpmd.run_for`: forward stats (since start) and the final
    port stats; `samples` holds the per-interval displays when sampling was asked for."""

    fwd: dict[int, FwdStats]
    ports: dict[int, PortStats]
    samples: list[dict[int, PortStats]] = field(default_factory=list)


# ---------------------------------------------------------------- the process


def runtime_dir(prefix: str) -> Path:
    """Where EAL keeps /var/run/dpdk/<prefix> (or $XDG_RUNTIME_DIR/dpdk/<prefix>)."""
    base = "/var/run" if os.geteuid() == 0 else os.environ.get("XDG_RUNTIME_DIR", "/tmp")
    return Path(base) / "dpdk" / prefix


class Testpmd:
    """One dpdk-testpmd process. Use as a context manager (or call `close`).

    `vdevs` are EAL ``--vdev`` strings; `forward_mode` is testpmd's (io, rxonly, txonly,
    macswap, flowgen, ...); the main and forwarding lcores are both pinned to `cpu` unless
    `main_cpu` is given (``--lcores '0@main,1@cpu'``). `stats_period=None` (default) runs
    interactive; an int runs ``--stats-period N`` non-interactive, where forwarding starts
    by itself and only `run_for`, `output`, `close` apply. The constructor returns once
    testpmd is ready (see `wait_ready`) and raises TestpmdError, with testpmd's output, if
    it is not.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, vdevs: Sequence[str], *, forward_mode: str = "io", cpu: int = 0,
                 main_cpu: int | None = None, mem_mb: int = 512, total_num_mbufs: int = 16384,
                 eal_args: Sequence[str] = (), testpmd_args: Sequence[str] = (),
                 name: str = "tp", stats_period: int | None = None,
                 log_path: str | os.PathLike[str] | None = None,
                 start_timeout: float = 30.0, wait: bool = True) -> None:
        binary = find_testpmd()
        self.name = name
        self.prefix = f"vu{os.getpid()}-{next(_counter)}-{name}"
        self.interactive = stats_period is None
        main = cpu if main_cpu is None else main_cpu
        eal = ["--lcores", f"0@{main},1@{cpu}", "--no-huge", "-m", str(mem_mb), "--no-pci",
               f"--file-prefix={self.prefix}"]
        for v in vdevs:
            eal += ["--vdev", v]
        app = [f"--forward-mode={forward_mode}", f"--total-num-mbufs={total_num_mbufs}"]
        app += ["-i"] if self.interactive else ["--stats-period", str(stats_period)]
        self.argv = ["stdbuf", "-oL", "-eL", binary, *eal, *eal_args, "--", *app,
                     *testpmd_args]
        self._buf: list[str] = []
        self._len = 0
        self._cond = threading.Condition()
        self._eof = False
        self._log = open(log_path, "w") if log_path is not None else None  # noqa: SIM115
        self.returncode: int | None = None
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE if self.interactive else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name=f"testpmd-{name}", daemon=True)
        self._reader.start()
        if wait:
            self.wait_ready(start_timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until initialisation is over (interactive: the first prompt; otherwise:
        forwarding started) and check that every vdev probed. Called by the constructor
        unless ``wait=False`` (virtio_user ``server=1`` blocks in probe until its peer
        connects, so that peer must be started in between)."""
        try:
            if self.interactive:
                self._wait_for(re.escape(PROMPT), 0, timeout, "the first prompt")
            else:
                self._wait_for(r"packet forwarding - ports=", 0, timeout,
                               "forwarding to start")
            failed = re.search(r"^.*(?:probe failed|No probed ethernet devices|"
                               r"Start ports failed|Fail to (?:configure|start) port).*$",
                               self.output, re.M)
            if failed:  # testpmd carries on with no port or a dead one and shows its prompt
                raise TestpmdError(f"testpmd {self.name}: {failed.group(0).strip()}:\n"
                                   f"{self._tail()}")
        except BaseException:
            self.kill()
            raise

    # ---- construction helpers

    @classmethod
    def vhost(cls, sock: str | os.PathLike[str], *, queues: int = 1, devargs: str = "",
              **kw: object) -> Testpmd:
        """DPDK's vhost-user back-end (``net_vhost``), a server on `sock` unless devargs
        say ``client=1``. A stale socket file is removed first (bind would fail)."""
        if "client=1" not in devargs and os.path.lexists(sock):
            if not stat.S_ISSOCK(os.lstat(sock).st_mode):
                raise FileExistsError(f"{os.fspath(sock)} exists and is not a socket")
            os.unlink(sock)
        extra = f",{devargs}" if devargs else ""
        kw.setdefault("name", "vhost")
        return cls([f"net_vhost0,iface={os.fspath(sock)},queues={queues}{extra}"],
                   **kw)  # type: ignore[arg-type]

    @classmethod
    def virtio_user(cls, sock: str | os.PathLike[str], *, queues: int = 1,
                    devargs: str = "", **kw: object) -> Testpmd:
        """DPDK's vhost-user front-end (``net_virtio_user``), connecting to `sock` (or
        listening there with ``server=1``)."""
        extra = f",{devargs}" if devargs else ""
        kw.setdefault("name", "virtio_user")
        return cls([f"net_virtio_user0,path={os.fspath(sock)},queues={queues}{extra}"],
                   **kw)  # type: ignore[arg-type]

    # ---- output

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            text = chunk.decode(errors="replace")
            with self._cond:
                if not chunk:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._buf.append(text)
                self._len += len(text)
                self._cond.notify_all()
            if self._log is not None:
                self._log.write(text)
                self._log.flush()

    @property
    def output(self) -> str:
        """Everything testpmd printed so far (stdout and stderr)."""
        with self._cond:
            if len(self._buf) > 1:
                self._buf[:] = ["".join(self._buf)]
            return self._buf[0] if self._buf else ""

    def _mark(self) -> int:
        with self._cond:
            return self._len

    def _tail(self, n: int = 3000) -> str:
        return self.output[-n:]

    def _wait_for(self, pattern: str, start: int, timeout: float, what: str) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if len(self._buf) > 1:
                    self._buf[:] = ["".join(self._buf)]
                text = self._buf[0] if self._buf else ""
                m = regex.search(text, start)
                if m:
                    return m
                if self._eof:
                    self.proc.wait()
                    raise TestpmdError(f"testpmd {self.name} exited "
                                       f"(status {self.proc.returncode}) waiting for {what}:\n"
                                       f"{text[-3000:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TestpmdError(f"testpmd {self.name}: no {what} within {timeout} s:\n"
                                       f"{text[-3000:]}")
                self._cond.wait(left)

    # ---- commands (interactive mode)

    def command(self, cmd: str, timeout: float = 10.0) -> str:
        """Run one testpmd command; returns what it printed (echo and prompt excluded)."""
        if not self.interactive:
            raise TestpmdError("commands need interactive mode (stats_period=None)")
        if self.proc.poll() is not None or self.proc.stdin is None:
            raise TestpmdError(f"testpmd {self.name} is not running:\n{self._tail()}")
        start = self._mark()
        try:
            self.proc.stdin.write(cmd.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError as e:
            raise TestpmdError(f"testpmd {self.name} closed its stdin:\n{self._tail()}") from e
        m = self._wait_for(re.escape(PROMPT), start, timeout, f"prompt after {cmd!r}")
        out = self.output[start : m.start()]
        first, _, rest = out.partition("\n")
        return rest if first.strip() == cmd.strip() else out

    def start(self) -> None:
        """Start forwarding."""
        out = self.command("start")
        if "packet forwarding - ports=" not in out:
            raise TestpmdError(f"testpmd {self.name}: start failed:\n{out}")

    def stop(self) -> dict[int, FwdStats]:
        """Stop forwarding; returns the forward statistics since `start`, per port."""
        out = self.command("stop")
        stats = parse_fwd_stats(out)
        if not stats:
            raise TestpmdError(f"testpmd {self.name}: no forward statistics on stop:\n{out}")
        return stats

    def port_stats(self) -> dict[int, PortStats]:
        """``show port stats all`` now: {port: PortStats}."""
        out = self.command("show port stats all")
        displays = parse_port_stats(out)
        if not displays:
            raise TestpmdError(f"testpmd {self.name}: cannot parse port stats:\n{out}")
        return displays[-1]

    def xstats(self, port: int = 0) -> dict[str, int]:
        """``show port xstats N``: the PMD's extended counters by name (net_vhost has
        tx_missed_pkts, size histograms, ...)."""
        out = self.command(f"show port xstats {port}")
        return {k: int(v) for k, v in re.findall(r"^\s*([A-Za-z0-9_\[\]-]+):\s+(\d+)\s*$",
                                                 out, re.M)}

    def clear_stats(self) -> None:
        self.command("clear port stats all")

    def set_forward_mode(self, mode: str) -> None:
        out = self.command(f"set fwd {mode}")
        if "Set" not in out or mode not in out:
            raise TestpmdError(f"testpmd {self.name}: set fwd {mode} failed:\n{out}")

    def link_up(self, port: int = 0) -> bool:
        out = self.command(f"show port info {port}")
        m = re.search(r"Link status:\s*(\w+)", out)
        if m is None:
            raise TestpmdError(f"testpmd {self.name}: no link status in:\n{out}")
        return m.group(1) == "up"

    def wait_link_up(self, port: int = 0, timeout: float = 10.0) -> None:
        """For net_vhost: the front-end connected and set DRIVER_OK."""
        deadline = time.monotonic() + timeout
        while not self.link_up(port):
            if time.monotonic() > deadline:
                raise TestpmdError(f"testpmd {self.name}: port {port} link not up within "
                                   f"{timeout} s:\n{self._tail()}")
            time.sleep(0.05)

    def wait_settled(self, port: int = 0, quiet: float = 0.2, timeout: float = 5.0,
                     ) -> dict[int, PortStats]:
        """Poll port stats until RX and TX packet counts of `port` stop moving for `quiet`
        seconds (a ring has been drained); returns the last stats."""
        deadline = time.monotonic() + timeout
        last = self.port_stats()
        while True:
            time.sleep(quiet)
            now = self.port_stats()
            a, b = last[port], now[port]
            if (a.rx_packets, a.tx_packets) == (b.rx_packets, b.tx_packets):
                return now
            if time.monotonic() > deadline:
                raise TestpmdError(f"testpmd {self.name}: counters still moving after "
                                   f"{timeout} s: {b}")
            last = now

    def sample(self, seconds: float, interval: float = 1.0) -> list[dict[int, PortStats]]:
        """``show port stats all`` every `interval` for `seconds` (one display first, to
        reset testpmd's "since last show" baseline, which is not returned)."""
        self.port_stats()
        out: list[dict[int, PortStats]] = []
        t0 = time.monotonic()
        for i in range(1, max(1, round(seconds / interval)) + 1):
            time.sleep(max(0.0, t0 + i * interval - time.monotonic()))
            out.append(self.port_stats())
        return out

    def run_for(self, seconds: float, sample_interval: float | None = None) -> RunResult:
        """Forward for `seconds` then stop; the final counters. Interactive: start, wait
        (sampling port stats every `sample_interval` if given), stop, show port stats.
        Non-interactive (``--stats-period``): wait, then SIGINT; `samples` are the periodic
        displays and `ports` the last of them."""
        if not self.interactive:
            time.sleep(seconds)
            self.close()
            samples = parse_port_stats(self.output)
            return RunResult(parse_fwd_stats(self.output), samples[-1] if samples else {},
                             samples)
        self.start()
        samples = self.sample(seconds, sample_interval) if sample_interval else []
        if not sample_interval:
            time.sleep(seconds)
        fwd = self.stop()
        return RunResult(fwd, self.port_stats(), samples)

    # ---- vhost-user details seen by a net_vhost back-end (from its VHOST_CONFIG log)

    def negotiated(self) -> tuple[int | None, int | None]:
        """(virtio features, protocol features) the front-end set, as net_vhost logs them;
        None where not seen (yet)."""
        text = self.output
        feats = re.findall(r"negotiated Virtio features: (0x[0-9a-f]+)", text)
        proto = re.findall(r"negotiated Vhost-user protocol features: (0x[0-9a-f]+)", text)
        return (int(feats[-1], 16) if feats else None, int(proto[-1], 16) if proto else None)

    # ---- lifetime

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the process group at once and clean up."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._finish()

    def close(self, timeout: float = 10.0) -> int:
        """Quit (``quit`` in interactive mode, SIGINT otherwise, which prints the final
        forward stats), escalate to SIGTERM/SIGKILL if it hangs; remove the runtime dir.
        Returns the exit status. Safe to call twice."""
        if self.proc.poll() is None:
            try:
                if self.interactive and self.proc.stdin is not None:
                    self.proc.stdin.write(b"quit\n")
                    self.proc.stdin.flush()
                else:
                    self.proc.send_signal(signal.SIGINT)
            except (BrokenPipeError, ValueError, ProcessLookupError):
                pass
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    self.proc.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(self.proc.pid, sig)
                    except ProcessLookupError:
                        pass
        self._finish()
        return self.proc.returncode  # type: ignore[return-value]

    def _finish(self) -> None:
        self.proc.wait()
        self.returncode = self.proc.returncode
        self._reader.join(5)
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not None and not self._log.closed:
            self._log.close()
        shutil.rmtree(runtime_dir(self.prefix), ignore_errors=True)

    def __enter__(self) -> Testpmd:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.kill()

    def __repr__(self) -> str:
        return f"Testpmd({self.name}, pid={self.proc.pid}, prefix={self.prefix})"
