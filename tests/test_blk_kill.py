"""Nothing is lost when the back-end is killed: a QEMU guest (7.2 with 1 and 4 queues,
11.1 with 1 and 2) writes and verifies patterned blocks from four writers while the host
SIGKILLs vhost-user-blk's main process again and again, and restarts it on the same
socket; some kills land while the fresh back-end is still replaying what the last one left.
The same with --io-threads (completions out of order), each kill timed for when the
in-flight area shows requests held (issue 9): only in-flight tracking saves those.

What this proves (issue 15): the front-end sees the connection close only once no process
of the killed back-end can touch the rings any more, so the used index QEMU reads back as
its resume point is final. If a queue worker outlived its parent by even one batch, the
next back-end would replay completed requests: duplicate completions, I/O errors in the
guest, stale blocks, and a used index pushed past the available one.

Checked: every writer's read-back after every round, the guest's kernel log (no I/O
error), every block in the guest at the end and every block of the image on the host.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import re
import signal
import struct
import time
from pathlib import Path

import pytest
from qemu_helpers import (
    BLK_MODULES,
    QUEUE_FAILURE,
    BlkDaemon,
    MiB,
    group_members,
    require_guest_prerequisites,
    wait_until,
)
from test_vvu_qemu import qemu11  # noqa: F401  (fixture)

from testbed.guest import GuestError, GuestVM
from vhostuser.devices.blk import COMPILED

BLOCK = 64 << 10
PATTERN_BLOCKS = 32  # /P: 2 MiB of random data; round r writes P[r % 16 : r % 16 + 16]
REGION_BLOCKS = 16  # each writer owns 16 blocks (1 MiB) of the disk
FIRST_BLOCK = 64  # writer w's region starts at block 64 + 16 w (4 MiB + w MiB)
WRITERS = 4
ROUNDS = 48  # (24 finished before three kills on a faster host: 2 SIGKILLs in one CI run)
KILLS = 6

WRITER = f"""
w=$1; seek=$(({FIRST_BLOCK} + w * {REGION_BLOCKS})); r=0
while [ $r -lt $2 ]; do
    skip=$((r % 16))
    dd if=/P of=/dev/vda bs=64k skip=$skip seek=$seek count={REGION_BLOCKS} \\
        oflag=direct conv=fsync 2>/dev/null || echo "WRITE_FAILED $w $r"
    dd if=/dev/vda of=/tmp/got$w bs=64k skip=$seek count={REGION_BLOCKS} \\
        iflag=direct 2>/dev/null || echo "READ_FAILED $w $r"
    dd if=/P of=/tmp/want$w bs=64k skip=$skip count={REGION_BLOCKS} 2>/dev/null
    cmp -s /tmp/got$w /tmp/want$w || echo "MISMATCH $w $r"
    echo "ROUND $w $r"
    r=$((r + 1))
done
"""

SCRIPT = f"""
echo "QUEUES $(ls /sys/block/vda/mq | wc -l)"
for w in 0 1 2 3; do
    taskset -c $((w % $(nproc))) sh /writer.sh $w $(cat /rounds) &
done
wait
echo 3 > /proc/sys/vm/drop_caches
w=0
while [ $w -lt {WRITERS} ]; do
    dd if=/dev/vda bs=64k skip=$(({FIRST_BLOCK} + w * {REGION_BLOCKS})) \\
        count={REGION_BLOCKS} iflag=direct 2>/dev/null | sha256sum | sed "s/^/FINAL $w /"
    w=$((w + 1))
done
echo "IOERRORS $(dmesg | grep -c -i -e 'I/O error' -e 'critical' -e 'blk_update_request')"
dmesg | grep -i -e 'I/O error' -e 'blk_update_request' | head -5
"""


def _expected_region(pattern: bytes, round_: int) -> bytes:
    skip = round_ % 16
    return pattern[skip * BLOCK : (skip + REGION_BLOCKS) * BLOCK]


def _served_again(daemons: list[BlkDaemon]) -> bool:
    return any(SERVED_AGAIN.search(d.log) for d in daemons)


def _guest_nearly_done(console: str, rounds: int) -> bool:
    """Whether some writer is in its last rounds (no more time for kills)."""
    return any(f"ROUND {w} {rounds - 3}\n" in console for w in range(WRITERS))


class InflightWatch:
    """The in-flight area QEMU keeps for the back-end (INFLIGHT_SHMFD), opened through the
    first back-end's memfd (QEMU hands the same file to every later one) and read with the
    spec's layout (QueueRegionSplit or QueueRegionPacked): how many requests the back-end
    holds right now."""

    def __init__(self, pid: int, packed: bool = False) -> None:
        self.area: mmap.mmap | None = None
        # header and entry bytes: the split layout's 16 and 16, the packed one's 32 and 32
        self.unit = 32 if packed else 16
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if "vhost-user-inflight" not in os.readlink(f"/proc/{pid}/fd/{fd}"):
                    continue
                mine = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY)
            except OSError:
                continue
            try:
                self.area = mmap.mmap(mine, os.fstat(mine).st_size, prot=mmap.PROT_READ)
            finally:
                os.close(mine)
            return

    def in_flight(self) -> int:
        area, at, n, u = self.area, 0, 0, self.unit
        while area is not None and at + u <= len(area):
            version, num = struct.unpack_from("<HH", area, at + 8)
            if version != 1:
                return n
            n += sum(area[at + u : at + u + u * num : u])
            at += -(-(u + u * num) // 64) * 64
        return n

    def wait_for_some(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.in_flight():
                return True
            os.sched_yield()  # a spin, but QEMU's threads go first
        return False

    def close(self) -> None:
        if self.area is not None:
            self.area.close()


def _kill_storm(tmp_path: Path, img: Path, qemu: str, num_queues: int, seed: int,
                options: tuple[str, ...] = (), rounds: int = ROUNDS,
                in_flight: bool = False, packed: bool = False) -> list[BlkDaemon]:
    """`in_flight`: each kill waits (a while) until the back-end holds requests;
    `packed`: the device has packed virtqueues."""
    rng = random.Random(seed)
    pattern = os.urandom(PATTERN_BLOCKS * BLOCK)
    extra = ["--num-queues", str(num_queues), *options]
    daemons: list[BlkDaemon] = []

    def start() -> BlkDaemon:
        d = BlkDaemon(tmp_path, img, extra, name=f"blk{len(daemons)}", sock=sock)
        daemons.append(d)
        return d.start()

    sock = tmp_path / "blk.sock"
    chardev = ("socket,id=c0,path={},reconnect=1" if qemu == "qemu-system-x86_64"
               else "socket,id=c0,path={},reconnect-ms=1000")
    vm = GuestVM(SCRIPT, modules=BLK_MODULES, timeout=240, qemu_binary=qemu,
                 files={"/P": pattern, "/writer.sh": WRITER.encode(),
                        "/rounds": f"{rounds}\n".encode()},
                 qemu_args=["-chardev", chardev.format(sock),
                            "-device", f"vhost-user-blk-pci,chardev=c0,num-queues={num_queues}"
                                       + (",packed=on" if packed else ""),
                            *(["-smp", str(num_queues)] if num_queues > 1 else [])])
    kills: list[str] = []
    watch: InflightWatch | None = None

    def context() -> str:
        logs = "\n".join(f"--- {d.log_path.name} ---\n{d.log[-2500:]}" for d in daemons)
        return f"seed {seed}, kills {kills}\n--- guest ---\n{vm.console[-4000:]}\n{logs}"

    try:
        daemon = start()
        vm.start()
        vm.wait_for("ROUND 0 1\n", 120)
        k = 0
        # in_flight: go on past KILLS (a while) until a back-end found requests left
        while k < KILLS or (in_flight and not _served_again(daemons) and k < 4 * KILLS
                            and not _guest_nearly_done(vm.console, rounds)):
            # A pause, then SIGKILL to the main process alone (its workers must not outlive
            # it); every other kill hits a back-end that has only just been restarted. The
            # pause starts once the front-end has started the rings again (the back-end has
            # queue workers): a kill inside QEMU 7.2's reconnect handshake (vhost_dev_init)
            # can leave its device dead for good ("vhost_backend_init failed", seen once in
            # CI), and there is nothing in flight to lose then anyway.
            if not wait_until(lambda d=daemon: bool(d.workers()) or "IOERRORS" in vm.console, 60):
                pytest.fail(f"the front-end did not restart the rings\n{context()}")
            pause = rng.uniform(0.0, 1.5) if k % 2 else rng.uniform(0.5, 2.0)
            if in_flight:  # the area says when
                pause /= 4
            time.sleep(pause)
            if "IOERRORS" in vm.console:
                break
            if in_flight:
                if watch is None:
                    watch = InflightWatch(daemon.pid, packed)
                    assert watch.area is not None, f"QEMU took no in-flight area\n{context()}"
                held = watch.wait_for_some(10.0)
            os.kill(daemon.pid, signal.SIGKILL)
            daemon.proc.wait()  # type: ignore[union-attr]
            kills.append(f"{pause:.2f}{' in flight' if in_flight and held else ''}")
            daemon = start()
            k += 1
        result = vm.wait()
    except GuestError as e:
        pytest.fail(f"{e}\n{context()}")
    finally:
        vm.close()
        if watch is not None:
            watch.close()
    try:
        assert result.status == 0, context()
        out = result.lines
        assert f"QUEUES {num_queues}" in out, context()
        bad = [ln for ln in out if ln.split(" ")[0] in
               ("WRITE_FAILED", "READ_FAILED", "MISMATCH")]
        assert not bad, f"{bad}\n{context()}"
        for w in range(WRITERS):
            assert f"ROUND {w} {rounds - 1}" in out, context()
        assert "IOERRORS 0" in out, context()
        assert len(kills) >= KILLS // 2, f"the guest finished too early to be killed under\n" \
                                         f"{context()}"
        want = _expected_region(pattern, rounds - 1)
        for w in range(WRITERS):
            finals = [ln for ln in out if ln.startswith(f"FINAL {w} ")]
            assert finals == [f"FINAL {w} {hashlib.sha256(want).hexdigest()}  -"], context()
        daemon.assert_alive()
        assert daemon.stop() == 0, context()
        with img.open("rb") as f:
            disk = f.read()
        for w in range(WRITERS):
            at = (FIRST_BLOCK + w * REGION_BLOCKS) * BLOCK
            assert disk[at : at + REGION_BLOCKS * BLOCK] == want, f"writer {w}\n{context()}"
        assert disk[: FIRST_BLOCK * BLOCK] == bytes(FIRST_BLOCK * BLOCK)
        end = (FIRST_BLOCK + WRITERS * REGION_BLOCKS) * BLOCK
        assert disk[end:] == bytes(len(disk) - end)
        for d in daemons:
            assert not QUEUE_FAILURE.search(d.log), context()
            assert "Traceback" not in d.log, context()
            # nothing of a killed back-end is left behind either
            assert wait_until(lambda d=d: not group_members(d.pid), 5.0), context()
    finally:
        for d in daemons:
            d.kill()
    return daemons


@pytest.fixture(scope="module", autouse=True)
def _prerequisites() -> None:
    require_guest_prerequisites()


@pytest.mark.parametrize("num_queues", [1, 4])
def test_killed_backend_loses_nothing_qemu72(tmp_path: Path, num_queues: int) -> None:
    img = tmp_path / "kill.img"
    with img.open("wb") as f:
        f.truncate(32 * MiB)
    _kill_storm(tmp_path, img, "qemu-system-x86_64", num_queues,
                seed=int.from_bytes(os.urandom(4), "little"))


@pytest.mark.parametrize(("num_queues", "ring"), [(1, "split"), (2, "packed")])
def test_killed_out_of_order_backend_loses_nothing(tmp_path: Path, num_queues: int,
                                                   ring: str) -> None:
    """With --io-threads requests complete out of order: QEMU's resume point (used->idx)
    no longer says which are done, and only the in-flight area (INFLIGHT_SHMFD) saves the
    requests a killed back-end held. Each kill waits until the area shows requests in
    flight; the writers' fsyncs (a FLUSH, slower than the reads and writes beside it) make
    completions come out of order. With packed rings QEMU's resume point is stale
    altogether (it cannot read one back from a packed ring): the area says where the ring
    stood and keeps copies of the chains in flight, whose slots the used descriptors of
    later completions overwrite."""
    img = tmp_path / "kill.img"
    with img.open("wb") as f:
        f.truncate(32 * MiB)
    daemons = _kill_storm(tmp_path, img, "qemu-system-x86_64", num_queues,
                          seed=int.from_bytes(os.urandom(4), "little"),
                          options=("--io-threads", "4", "--direct"), in_flight=True,
                          packed=ring == "packed")
    again = [int(m.group(1)) for d in daemons for m in SERVED_AGAIN.finditer(d.log)]
    assert again, "no kill found requests in flight: the test proved nothing"


SERVED_AGAIN = re.compile(r"queue \d+: (\d+) request\(s\) left in flight by the last back-end")


# with 1 queue, the compiled data path (VHOSTUSER_JIT=1): the kernel serves reads and
# writes while QEMU's in-flight area is kept (1 queue without it: the QEMU 7.2 storm)
@pytest.mark.parametrize(("num_queues", "jit"), [(1, True), (2, False)])
def test_killed_backend_loses_nothing_qemu11(qemu11: str, tmp_path: Path,  # noqa: F811
                                              num_queues: int, jit: bool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    img = tmp_path / "kill.img"
    with img.open("wb") as f:
        f.truncate(32 * MiB)
    monkeypatch.setenv("VHOSTUSER_JIT", "1" if jit else "0")
    daemons = _kill_storm(tmp_path, img, qemu11, num_queues,
                          seed=int.from_bytes(os.urandom(4), "little"))
    compiled = [any(line.endswith(COMPILED) for line in d.log.splitlines()) for d in daemons]
    assert compiled == [jit] * len(daemons)
