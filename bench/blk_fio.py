#!/usr/bin/env python3
"""Block benchmark: our vhost-user-blk back-end against qemu-storage-daemon, measured with fio.

fio drives each back-end through libblkio's virtio-blk-vhost-user driver (fio is built with that
engine by bench/tools/build-fio.sh). For every back-end in the run:

* one 1 GiB raw image in /dev/shm, filled with random data (not sparse), shared by all back-ends
  (the write job writes over it, in place); removed at the end unless --keep-image;
* the back-end runs pinned to CPU 0 (``taskset -c 0``), fio pinned to CPU 1;
* six fio jobs (--job picks some): 4 KiB randread QD32 (IOPS), 128 KiB sequential read QD32
  (MiB/s), 4 KiB randwrite QD32 (IOPS), 4 KiB randwrite QD1 with a flush after each write
  (write IOPS; on /dev/shm a flush costs little, so this is the per-request path), 4 KiB
  randread QD1 (mean completion latency, µs), and the same with fio polling for completions
  (libblkio_wait_mode=loop) instead of sleeping on the call eventfd: the round trip without
  the client's wake-up, which no back-end can shorten;
* each job is repeated --repeat times and the median is reported.

Back-end lifecycle: a *fresh back-end process* is started for every single fio run and stopped
with SIGTERM right after it (a back-end that has not exited 10 s after SIGTERM is killed and the
run is flagged). Runs are interleaved (repeat -> job -> back-end), so a slow phase of the machine
(throughput here sometimes drops to ~40 % for 10-20 s) hits both back-ends alike rather than one
of them; the medians then drop such outliers.

Output: a markdown section (command line, date, machine, versions, table with medians, ours/qsd
ratios and every sample) on stdout; --write also appends it to bench/RESULTS.md.
Stdlib only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_FIO = BENCH_DIR / ".cache" / "fio"
BUILD_FIO = BENCH_DIR / "tools" / "build-fio.sh"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
BLKIO_PC = BENCH_DIR / ".cache/blkio-root/usr/lib/x86_64-linux-gnu/pkgconfig/blkio.pc"

IMAGE_SIZE = 1 << 30
DEFAULT_OURS_CMD = "vhost-user-blk --socket-path {sock} --blk-file {img}"
VVU_WRAPPER = Path(__file__).resolve().parent / "tools" / "vvu-blk.sh"
DEFAULT_VVU_CMD = f"bash {VVU_WRAPPER} {{sock}} {{img}}"
QSD_CMD = (
    "qemu-storage-daemon"
    " --blockdev driver=file,node-name=file0,filename={img},cache.direct=off,aio={aio}"
    " --blockdev driver=raw,node-name=disk0,file=file0"
    " --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},"
    "writable=on,num-queues=1"
)
BRIDGE_WRAPPER = Path(__file__).resolve().parent / "tools" / "vvu-bridge.sh"
BACKENDS = ("qsd", "ours", "vvu", "bridge", "bridge-watch")
SOCKET_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Job:
    name: str
    title: str
    fio_args: tuple[str, ...]
    metric: str  # "iops" | "mib_s" | "lat_us"
    unit: str
    higher_is_better: bool


JOBS: tuple[Job, ...] = (
    Job(
        "randread-4k-qd32",
        "4 KiB randread QD32",
        ("--rw=randread", "--bs=4k", "--iodepth=32"),
        "iops",
        "kIOPS",
        True,
    ),
    Job(
        "seqread-128k-qd32",
        "128 KiB seq read QD32",
        ("--rw=read", "--bs=128k", "--iodepth=32"),
        "mib_s",
        "MiB/s",
        True,
    ),
    Job(
        "randwrite-4k-qd32",
        "4 KiB randwrite QD32",
        ("--rw=randwrite", "--bs=4k", "--iodepth=32"),
        "iops",
        "kIOPS",
        True,
    ),
    Job(
        "randwrite-4k-qd1-fsync",
        "4 KiB randwrite QD1, a flush after each",
        ("--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"),
        "iops",
        "kIOPS",
        True,
    ),
    Job(
        "randread-4k-qd1",
        "4 KiB randread QD1",
        ("--rw=randread", "--bs=4k", "--iodepth=1"),
        "lat_us",
        "mean lat µs",
        False,
    ),
    Job(
        "randread-4k-qd1-polled",
        "4 KiB randread QD1, fio polling",
        ("--rw=randread", "--bs=4k", "--iodepth=1", "--libblkio_wait_mode=loop"),
        "lat_us",
        "mean lat µs",
        False,
    ),
)


@dataclass
class Sample:
    value: float  # in the job's unit
    backend_cpu: float  # back-end CPU time / wall time of the fio run, in percent
    clean_stop: bool


@dataclass
class Results:
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, backend: str, job: str, sample: Sample) -> None:
        self.samples.setdefault((backend, job), []).append(sample)

    def get(self, backend: str, job: str) -> list[Sample]:
        return self.samples.get((backend, job), [])


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[blk_fio] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def git_state() -> str:
    """Commit of the work tree this script lives in (read-only git commands)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(BENCH_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(BENCH_DIR), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"commit {head}" + (" with uncommitted changes" if dirty else "")


def libblkio_version() -> str:
    try:
        for line in BLKIO_PC.read_text().splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip() + f" ({BLKIO_PC.parents[3]})"
    except OSError:
        pass
    return "unknown (fio not built by build-fio.sh)"


def check_cpus(cpus: list[int]) -> None:
    allowed = os.sched_getaffinity(0)
    for cpu in cpus:
        if cpu not in allowed:
            raise BenchError(f"CPU {cpu} is not available (allowed: {sorted(allowed)})")


# ----------------------------------------------------------------------------- image


def make_image(path: Path, size: int) -> None:
    """Write `size` bytes of random data (no holes) to `path`."""
    free = shutil.disk_usage(path.parent).free
    if free < size + (64 << 20):
        raise BenchError(f"not enough space in {path.parent}: {free} bytes free, need {size}")
    log(f"writing {size >> 20} MiB of random data to {path}")
    chunk = 4 << 20
    t0 = time.monotonic()
    with path.open("wb") as f:
        written = 0
        while written < size:
            n = min(chunk, size - written)
            f.write(os.urandom(n))
            written += n
    log(f"image ready in {time.monotonic() - t0:.1f} s")


# ----------------------------------------------------------------------------- back-ends


def render(template: str, **values: str) -> list[str]:
    """Split a command template into argv, then fill {placeholders} in every token."""
    return [tok.format(**values) for tok in shlex.split(template)]


def proc_cpu_seconds(pid: int) -> float:
    """utime+stime of a process and its waited-for children, in seconds (0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields[0] is field 3 (state); utime=14, stime=15, cutime=16, cstime=17.
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` plus its live direct children (taskset execs, so usually 1 proc)."""
    total = proc_cpu_seconds(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        total += proc_cpu_seconds(int(child))
    return total


class Backend:
    def __init__(self, name: str, argv: list[str], sock: Path, cpu: int, log_path: Path):
        self.name = name
        self.argv = ["taskset", "-c", str(cpu), *argv]
        self.sock = sock
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.sock.exists():
            self.sock.unlink()
        with self.log_path.open("ab") as logf:
            logf.write(f"\n$ {shlex.join(self.argv)}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + SOCKET_TIMEOUT_S
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                raise BenchError(
                    f"{self.name} exited with status {rc} before creating {self.sock}; "
                    f"last output:\n{self.tail_log()}"
                )
            try:
                if stat.S_ISSOCK(self.sock.stat().st_mode):
                    # bind() creates the file just before listen(): give it a moment.
                    time.sleep(0.2)
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        self.stop()
        raise BenchError(f"{self.name}: socket {self.sock} did not appear in {SOCKET_TIMEOUT_S} s")

    def cpu_seconds(self) -> float:
        return proc_tree_cpu_seconds(self.proc.pid) if self.proc else 0.0

    def stop(self) -> bool:
        """SIGTERM, wait; SIGKILL after STOP_TIMEOUT_S. True if it exited by itself."""
        if self.proc is None:
            return True
        proc, self.proc = self.proc, None
        if proc.poll() is not None:
            log(f"{self.name} had already exited with status {proc.returncode}")
            return False
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log(f"{self.name} ignored SIGTERM for {STOP_TIMEOUT_S} s; killing it")
            proc.kill()
            proc.wait()
            return False
        if rc not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
            log(f"{self.name} exited with status {rc} after SIGTERM")
            return False
        return True

    def tail_log(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# ----------------------------------------------------------------------------- fio


def fio_argv(fio: Path, job: Job, sock: Path, runtime: int, cpu: int, out: Path) -> list[str]:
    return [
        "taskset",
        "-c",
        str(cpu),
        str(fio),
        f"--name={job.name}",
        "--ioengine=libblkio",
        "--libblkio_driver=virtio-blk-vhost-user",
        f"--libblkio_path={sock}",
        "--direct=1",
        "--thread",
        "--size=1g",
        "--time_based",
        f"--runtime={runtime}",
        *job.fio_args,
        "--output-format=json",
        f"--output={out}",
    ]


def parse_fio(path: Path, job: Job) -> float:
    text = path.read_text()
    start = text.find("{")  # fio may put warnings before the JSON document
    if start < 0:
        raise BenchError(f"no JSON in fio output {path}")
    data = json.loads(text[start:])
    fjob = data["jobs"][0]
    if fjob.get("error"):
        raise BenchError(f"fio job error {fjob['error']}")
    way = "write" if "--rw=randwrite" in job.fio_args else "read"
    read = fjob[way]
    if read["io_bytes"] == 0:
        raise BenchError(f"fio: no data moved ({way})")
    if job.metric == "iops":
        return float(read["iops"]) / 1000.0
    if job.metric == "mib_s":
        return float(read["bw_bytes"]) / float(1 << 20)
    if job.metric == "lat_us":
        return float(read["lat_ns"]["mean"]) / 1000.0
    raise AssertionError(job.metric)


def run_one(
    backend: Backend, fio: Path, job: Job, runtime: int, fio_cpu: int, workdir: Path
) -> Sample:
    out = workdir / f"{backend.name}-{job.name}.json"
    argv = fio_argv(fio, job, backend.sock, runtime, fio_cpu, out)
    backend.start()
    try:
        cpu0 = backend.cpu_seconds()
        t0 = time.monotonic()
        res = subprocess.run(
            argv, capture_output=True, text=True, timeout=runtime + 120, check=False
        )
        wall = time.monotonic() - t0
        cpu = backend.cpu_seconds() - cpu0
    finally:
        clean = backend.stop()
    if res.returncode != 0:
        raise BenchError(
            f"fio failed (status {res.returncode}): {shlex.join(argv)}\n{res.stderr.strip()}\n"
            f"{backend.name} log tail:\n{backend.tail_log()}"
        )
    value = parse_fio(out, job)
    return Sample(value=value, backend_cpu=100.0 * cpu / wall, clean_stop=clean)


# ----------------------------------------------------------------------------- report


def fmt(value: float, metric: str) -> str:
    if metric == "iops":
        return f"{value:.1f}"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def median(samples: list[Sample]) -> float | None:
    return statistics.median(s.value for s in samples) if samples else None


def report(
    res: Results,
    backends: list[str],
    argv: list[str],
    started: dt.datetime,
    env_lines: list[str],
    runtime: int,
    repeat: int,
) -> str:
    out: list[str] = []
    out.append(f"## blk_fio {started.strftime('%Y-%m-%d %H:%M:%S %Z').strip()}")
    out.append("")
    out.append(f"Command: `{shlex.join(argv)}`")
    out.append("")
    out.extend(f"- {line}" for line in env_lines)
    out.append(
        f"- runtime {runtime} s per fio run, {repeat} run(s) per job and back-end, "
        "median shown; fresh back-end process per run"
    )
    out.append("")
    both = "qsd" in backends and "ours" in backends
    vvu = "vvu" in backends and "ours" in backends
    bridged = [b for b in backends if b.startswith("bridge")] if "qsd" in backends else []
    head = ["job", "metric", *backends]
    if both:
        head.append("ours/qsd")
    if vvu:
        head.append("vvu/ours")
    head += [f"{b}/qsd" for b in bridged]
    head += [f"{b} CPU %" for b in backends]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join("---" for _ in head) + "|")
    for job in JOBS:
        better = "higher" if job.higher_is_better else "lower"
        row = [job.title, f"{job.unit} ({better} is better)"]
        meds: dict[str, float | None] = {}
        for b in backends:
            meds[b] = median(res.get(b, job.name))
            m = meds[b]
            row.append(fmt(m, job.metric) if m is not None else "n/a")
        if both:
            q, o = meds["qsd"], meds["ours"]
            row.append(f"{o / q:.2f}" if q and o is not None else "n/a")
        if vvu:
            o, v = meds["ours"], meds["vvu"]
            row.append(f"{v / o:.2f}" if o and v is not None else "n/a")
        for b in bridged:
            q, v = meds["qsd"], meds[b]
            row.append(f"{v / q:.2f}" if q and v is not None else "n/a")
        for b in backends:
            ss = res.get(b, job.name)
            row.append(f"{statistics.median(s.backend_cpu for s in ss):.0f}" if ss else "n/a")
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    out.append("Samples (in run order):")
    out.append("")
    for job in JOBS:
        for b in backends:
            ss = res.get(b, job.name)
            vals = ", ".join(fmt(s.value, job.metric) for s in ss)
            unclean = sum(not s.clean_stop for s in ss)
            extra = f" ({unclean} unclean stop(s))" if unclean else ""
            text = f"{vals} {job.unit}{extra}" if ss else "no successful run"
            out.append(f"- {job.title}, {b}: {text}")
    if res.notes:
        out.append("")
        out.extend(f"Note: {n}" for n in res.notes)
    if res.errors:
        out.append("")
        out.append("Errors:")
        out.extend(f"- {e.splitlines()[0]}" for e in res.errors)
    out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="fio (libblkio virtio-blk-vhost-user) benchmark: ours vs qemu-storage-daemon",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--runtime", type=int, default=30, help="seconds per fio run")
    p.add_argument("--repeat", type=int, default=3, help="fio runs per job and back-end")
    p.add_argument("--fio", type=Path, default=DEFAULT_FIO, help="fio built with libblkio")
    p.add_argument(
        "--ours-cmd",
        default=DEFAULT_OURS_CMD,
        help="command template of our back-end; {sock} and {img} are substituted",
    )
    p.add_argument(
        "--vvu-cmd",
        default=DEFAULT_VVU_CMD,
        help="command template of our back-end served through the virtio-vhost-user device",
    )
    p.add_argument("--with-vvu", action="store_true",
                   help="also measure ours through the virtio-vhost-user device (vvu/ours)")
    p.add_argument("--with-bridge", action="store_true",
                   help="measure qemu-storage-daemon behind vhost-user-vvu-bridge and the "
                        "virtio-vhost-user device against qsd alone (bridge/qsd): with the "
                        "consumer's kick and call eventfds handed over (bridge), and with "
                        "the bridge watching the vrings (bridge-watch, the appliance VM's "
                        "poll-mode data path); leaves our own back-end out")
    p.add_argument("--only", choices=BACKENDS, help="benchmark only this back-end")
    p.add_argument("--job", action="append", choices=[j.name for j in JOBS],
                   help="run only this job (repeatable; default: all)")
    p.add_argument(
        "--qsd-aio",
        choices=("io_uring", "threads"),
        default="io_uring",
        help="qemu-storage-daemon aio= mode (io_uring falls back to threads if it fails)",
    )
    p.add_argument("--backend-cpu", type=int, default=0, help="CPU for the back-end")
    p.add_argument("--fio-cpu", type=int, default=1, help="CPU for fio")
    p.add_argument("--image-dir", type=Path, default=Path("/dev/shm"), help="where the image goes")
    p.add_argument("--keep-image", action="store_true", help="do not delete the image at the end")
    p.add_argument("--write", action="store_true", help=f"append the report to {RESULTS_MD}")
    args = p.parse_args(argv)
    if args.runtime < 1 or args.repeat < 1:
        p.error("--runtime and --repeat must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    raw_argv = sys.argv[1:] if argv is None else argv
    args = parse_args(raw_argv)
    if args.job:
        global JOBS
        JOBS = tuple(j for j in JOBS if j.name in args.job)
    started = dt.datetime.now().astimezone()
    if args.only:
        backends = [args.only]
    elif args.with_bridge:
        backends = ["qsd", "bridge", "bridge-watch"]
    else:
        backends = ["qsd", "ours"] + (["vvu"] if args.with_vvu else [])
    res = Results()

    try:
        check_cpus([args.backend_cpu, args.fio_cpu])
        fio: Path = args.fio
        if not os.access(fio, os.X_OK):
            raise BenchError(f"fio not found at {fio}; run: bash {BUILD_FIO}")
        if shutil.which("taskset") is None:
            raise BenchError("taskset not found (util-linux)")
        if "qsd" in backends and shutil.which("qemu-storage-daemon") is None:
            raise BenchError("qemu-storage-daemon not found: apt-get install qemu-system-common")
        if "ours" in backends:
            ours0 = shlex.split(args.ours_cmd)[0] if args.ours_cmd.strip() else ""
            if not ours0 or shutil.which(ours0) is None:
                raise BenchError(
                    f"our back-end command {ours0!r} not found "
                    "(install the project, pass --ours-cmd, or use --only qsd)"
                )
    except BenchError as exc:
        log(f"error: {exc}")
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="blk_fio-"))
    img = args.image_dir / f"blk_fio-{os.getpid()}.img"
    sock = workdir / "vhost-user-blk.sock"
    qsd_aio: str = args.qsd_aio
    try:
        make_image(img, IMAGE_SIZE)

        def make_backend(name: str) -> Backend:
            if name == "qsd":
                cmd = render(QSD_CMD, img=str(img), sock=str(sock), aio=qsd_aio)
            elif name == "vvu":
                cmd = render(args.vvu_cmd, img=str(img), sock=str(sock))
            elif name.startswith("bridge"):
                qsd = shlex.join(render(QSD_CMD, img=str(img), sock="{backend}", aio=qsd_aio))
                cmd = ["bash", str(BRIDGE_WRAPPER), str(sock), qsd]
                cmd += ["--watch-rings"] if name == "bridge-watch" else []
            else:
                cmd = render(args.ours_cmd, img=str(img), sock=str(sock))
            return Backend(name, cmd, sock, args.backend_cpu, workdir / f"{name}.log")

        # Probe qsd once so an io_uring failure becomes a fallback, not an error in every run.
        if "qsd" in backends:
            probe = make_backend("qsd")
            try:
                probe.start()
                probe.stop()
            except BenchError as exc:
                if qsd_aio != "io_uring":
                    raise
                log(f"qemu-storage-daemon with aio=io_uring failed ({exc}); using aio=threads")
                res.notes.append("qemu-storage-daemon aio=io_uring failed here; used aio=threads")
                qsd_aio = "threads"
                probe = make_backend("qsd")
                probe.start()
                probe.stop()

        env_lines = [
            f"date: {started.isoformat(timespec='seconds')}",
            f"machine: `{' '.join(os.uname())}`",
            f"CPU: {cpu_model()}, nproc {os.cpu_count()}; back-end on CPU {args.backend_cpu}, "
            f"fio on CPU {args.fio_cpu}",
            f"fio: {first_line([str(args.fio), '--version'])} ({args.fio}), "
            f"libblkio {libblkio_version()}",
            f"image: {IMAGE_SIZE >> 20} MiB raw file of random data in {args.image_dir}",
        ]
        if "qsd" in backends:
            env_lines.append(
                f"qsd: {first_line(['qemu-storage-daemon', '--version'])}, aio={qsd_aio}: "
                f"`{shlex.join(render(QSD_CMD, img='IMG', sock='SOCK', aio=qsd_aio))}`"
            )
        if "ours" in backends:
            ours0 = shlex.split(args.ours_cmd)[0]
            env_lines.append(f"ours: `{args.ours_cmd}` ({ours0} = {shutil.which(ours0)})")
        if "bridge" in backends:
            env_lines.append(f"bridge: `bash {BRIDGE_WRAPPER.relative_to(BENCH_DIR.parent)} "
                             "SOCK QSD-CMD [--watch-rings]` (device + vhost-user-vvu-bridge + the "
                             "qsd above, all on the back-end CPU)")
        if "vvu" in backends:
            env_lines.append(f"vvu: `{args.vvu_cmd}` (device + vhost-user-blk --vvu, both on "
                             "the back-end CPU)")
        env_lines.append(f"source tree: {git_state()}")

        total = args.repeat * len(JOBS) * len(backends)
        n = 0
        for rep in range(args.repeat):
            for job in JOBS:
                for name in backends:
                    n += 1
                    log(f"[{n}/{total}] repeat {rep + 1}: {name} {job.title} ({args.runtime} s)")
                    try:
                        sample = run_one(
                            make_backend(name), args.fio, job, args.runtime, args.fio_cpu, workdir
                        )
                    except (BenchError, subprocess.TimeoutExpired, OSError, KeyError) as exc:
                        msg = f"{name} {job.title} repeat {rep + 1}: {exc}"
                        log(f"error: {msg}")
                        res.errors.append(msg)
                        continue
                    res.add(name, job.name, sample)
                    log(
                        f"    {fmt(sample.value, job.metric)} {job.unit}, "
                        f"back-end CPU {sample.backend_cpu:.0f} %"
                    )
    except BenchError as exc:
        log(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if not args.keep_image:
            img.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)

    cmdline = ["python3", sys.argv[0], *raw_argv]
    text = report(res, backends, cmdline, started, env_lines, args.runtime, args.repeat)
    print(text)
    if args.write:
        with RESULTS_MD.open("a") as f:
            if RESULTS_MD.stat().st_size == 0:
                f.write("# Block benchmark results (bench/blk_fio.py)\n\n")
            f.write(text + "\n")
        log(f"appended to {RESULTS_MD}")
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())
