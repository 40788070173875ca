"""End-to-end tests of our vhost-user-blk back-end with QEMU guests.

Each test starts ``vhost-user-blk`` as a subprocess (log in tmp_path), boots a TCG guest
(testbed.guest) with a vhost-user-blk-pci device on its socket, and checks what the guest
saw and what landed in the image file on the host. The back-end is always stopped with
SIGTERM at the end: it must exit 0 and leave no worker process behind.

Needs qemu-system-x86, linux-image-amd64, busybox-static and e2fsprogs; the tests fail
(never skip) if those are missing.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from qemu_helpers import (
    BLK_MODULES,
    QUEUE_FAILURE,
    BlkDaemon,
    MiB,
    blk_qemu_args,
    require_guest_prerequisites,
    require_tool,
    watchdog,
)

from testbed.guest import GuestResult, GuestVM, find_busybox

KiB = 1 << 10
GUEST_TIMEOUT = 60  # boots take 6-9 s under TCG; the longest script runs ~15 s


@pytest.fixture(scope="module", autouse=True)
def kver() -> str:
    return require_guest_prerequisites()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tagged(lines: list[str], tag: str) -> str:
    """The rest of the single line ``TAG rest`` (for ``TAG $(... | sha256sum)`` lines,
    the digest only)."""
    found = [line[len(tag) + 1 :] for line in lines if line.startswith(tag + " ")]
    listing = "\n".join(lines)
    assert len(found) == 1, f"expected one {tag!r} line in guest output, got {found}:\n{listing}"
    return found[0].removesuffix("  -").strip()


def guest(script: str, daemon: BlkDaemon, *, num_queues: int = 1, smp: int = 1,
          modules: list[str] = BLK_MODULES, packed: bool = False, **kw: Any) -> GuestVM:
    """A guest with one vhost-user-blk-pci device on ``daemon``'s socket."""
    return GuestVM(script, modules=modules, timeout=GUEST_TIMEOUT,
                   qemu_args=blk_qemu_args(daemon.sock, num_queues, smp, packed), **kw)


def run_guest(vm: GuestVM, daemon: BlkDaemon) -> GuestResult:
    """Boot, run to completion, and require exit status 0."""
    with watchdog(daemon, vm):
        result = vm.run()
    check_guest(result, daemon)
    return result


def check_guest(result: GuestResult, daemon: BlkDaemon) -> None:
    assert result.status == 0, f"guest script failed:\n{result.console}\n{daemon.describe()}"


def check_log(daemon: BlkDaemon) -> None:
    log = daemon.log
    assert "Traceback" not in log, daemon.describe()
    assert not QUEUE_FAILURE.search(log), daemon.describe()


def image_slice(img: Path, off: int, n: int) -> bytes:
    with img.open("rb") as f:
        f.seek(off)
        return f.read(n)


# --------------------------------------------------------------------------- read/write/fs


RW_SCRIPT = """
dev=/sys/block/vda
echo "SIZE $(blockdev --getsize64 /dev/vda) $(cat $dev/size)"
echo "SERIAL $(cat $dev/serial)"
echo "RO $(cat $dev/ro)"
echo "DISCARD_MAX $(cat $dev/queue/discard_max_bytes)"
echo "QUEUES $(ls $dev/mq | tr '\\n' ' ')"
echo "FEATURES $(cat $dev/device/features)"
echo READY
echo "PAT $(sha256sum < /pat)"
# Fragment guest RAM: two tmpfs files grown 4 KiB at a time in turn, then one removed,
# leave only isolated free pages. dd's 1 MiB O_DIRECT buffer then gets 256 physically
# discontiguous pages, so the guest sends requests of seg_max (126) segments: indirect
# tables of header + 126 + status = 128 (queue size) descriptors.
chunk=$(head -c 4096 /dev/zero | tr '\\0' x)
i=0
while [ $i -lt 1024 ]; do
    echo -n "$chunk" >> /tmp/fa; echo -n "$chunk" >> /tmp/fb; i=$((i + 1))
done
rm /tmp/fa
echo "FRAGMENTED ${#chunk} $(wc -c < /tmp/fb)"
# 40 MiB: O_DIRECT; 42 MiB: through the page cache + sync; 48 MiB: partly discarded below.
dd if=/pat of=/dev/vda bs=1M seek=40 oflag=direct 2>/dev/null
dd if=/pat of=/dev/vda bs=64k seek=672 2>/dev/null
sync
dd if=/pat of=/dev/vda bs=64k seek=768 oflag=direct 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
echo "DIRECT $(dd if=/dev/vda bs=1M skip=40 count=1 iflag=direct 2>/dev/null | sha256sum)"
echo "CACHED $(dd if=/dev/vda bs=64k skip=672 count=16 2>/dev/null | sha256sum)"
echo "PREDISCARD $(dd if=/dev/vda bs=64k skip=768 count=16 iflag=direct 2>/dev/null | sha256sum)"
blkdiscard -o $((48 * 1048576 + 262144)) -l 262144 /dev/vda
rm /tmp/fb
# A 32 MiB file system (busybox mke2fs counts 1 KiB units) below the patterns.
mke2fs -b 4096 /dev/vda 32768 >/dev/null
mkdir -p /mnt/fs
mount -t ext4 /dev/vda /mnt/fs
cp /bin/busybox /mnt/fs/busybox
cp /pat /mnt/fs/pat.bin
seq 1 50000 > /mnt/fs/seq.txt
dd if=/dev/urandom of=/mnt/fs/junk bs=64k count=64 2>/dev/null
sync
rm /mnt/fs/junk
sync
echo "FSTRIM $(fstrim -v /mnt/fs)"
echo "FILES $(cat /mnt/fs/busybox /mnt/fs/pat.bin /mnt/fs/seq.txt | sha256sum)"
umount /mnt/fs
"""


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_read_write_filesystem_discard(tmp_path: Path, ring: str) -> None:
    debugfs = require_tool("debugfs", "e2fsprogs")
    e2fsck = require_tool("e2fsck", "e2fsprogs")
    dumpe2fs = require_tool("dumpe2fs", "e2fsprogs")
    img = tmp_path / "disk.img"
    with img.open("wb") as f:
        f.truncate(64 * MiB)
    pat = os.urandom(MiB)
    serial = "vu-serial-0042"
    busybox = find_busybox().read_bytes()
    seq = "".join(f"{i}\n" for i in range(1, 50001)).encode()

    with BlkDaemon(tmp_path, img, ["--serial", serial]) as daemon:
        with (guest(RW_SCRIPT, daemon, modules=[*BLK_MODULES, "ext4"], errexit=True,
                    files={"pat": pat}, packed=ring == "packed") as vm,
              watchdog(daemon, vm)):
            vm.start()
            vm.wait_for("READY\n")
            workers = daemon.workers()
            result = vm.wait()
        check_guest(result, daemon)
        assert len(workers) == 1, f"expected 1 queue worker, saw {workers}"
        daemon.assert_idle()
        assert daemon.stop() == 0, daemon.describe()
    check_log(daemon)
    out = result.lines

    # What the guest saw of the device.
    assert tagged(out, "SIZE") == f"{64 * MiB} {64 * MiB // 512}"
    assert tagged(out, "SERIAL") == serial
    assert tagged(out, "RO") == "0"
    assert int(tagged(out, "DISCARD_MAX")) > 0
    assert tagged(out, "QUEUES") == "0"
    features = tagged(out, "FEATURES")  # the driver's: one character per bit, bit 0 first
    assert features[34] == ("1" if ring == "packed" else "0"), features  # RING_PACKED
    # Reads in the guest return what it wrote, by both paths.
    assert tagged(out, "FRAGMENTED") == f"4096 {4 * MiB}"
    assert tagged(out, "PAT") == sha(pat)
    assert tagged(out, "DIRECT") == sha(pat)
    assert tagged(out, "CACHED") == sha(pat)
    assert tagged(out, "PREDISCARD") == sha(pat)
    assert tagged(out, "FILES") == sha(busybox + pat + seq)
    m = re.fullmatch(r"/mnt/fs: (\d+) bytes trimmed", tagged(out, "FSTRIM"))
    assert m and int(m.group(1)) >= 4 * MiB, tagged(out, "FSTRIM")

    # The image on the host: the patterns, and zeros exactly where discarded.
    assert image_slice(img, 40 * MiB, MiB) == pat, "O_DIRECT write not in the image"
    assert image_slice(img, 42 * MiB, MiB) == pat, "page-cache write + sync not in the image"
    d = image_slice(img, 48 * MiB, MiB)
    assert d[: 256 * KiB] == pat[: 256 * KiB], "data before the discarded range damaged"
    assert d[256 * KiB : 512 * KiB] == bytes(256 * KiB), "discarded range is not zero"
    assert d[512 * KiB :] == pat[512 * KiB :], "data after the discarded range damaged"
    assert image_slice(img, 49 * MiB, 15 * MiB) == bytes(15 * MiB)
    assert os.path.getsize(img) == 64 * MiB

    # The file system is clean and holds the guest's files.
    fsck = subprocess.run([e2fsck, "-fn", str(img)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for name, want in [("busybox", busybox), ("pat.bin", pat), ("seq.txt", seq)]:
        cat = subprocess.run([debugfs, "-R", f"cat /{name}", str(img)], capture_output=True)
        assert cat.returncode == 0, cat.stderr
        assert cat.stdout == want, f"/{name} differs in the image"
    info = subprocess.run([dumpe2fs, str(img)], capture_output=True, text=True, check=True)
    assert re.search(r"^Block count:\s+8192$", info.stdout, re.M), info.stdout[:2000]
    # fstrim discarded the deleted 4 MiB of random data: every free block reads as zero.
    free = 0
    for ranges in re.findall(r"^\s+Free blocks: (.*)$", info.stdout, re.M):
        for r in filter(None, (x.strip() for x in ranges.split(","))):
            first, _, last = r.partition("-")
            first_b, last_b = int(first), int(last or first)
            data = image_slice(img, first_b * 4096, (last_b - first_b + 1) * 4096)
            assert data == bytes(len(data)), f"free blocks {r} not zero after fstrim"
            free += last_b - first_b + 1
    assert free * 4096 >= 4 * MiB, info.stdout[:2000]


# --------------------------------------------------------------------------- read-only


RO_SCRIPT = """
echo "RO $(cat /sys/block/vda/ro)"
echo "DISCARD_MAX $(cat /sys/block/vda/queue/discard_max_bytes)"
echo "READ $(dd if=/dev/vda bs=64k iflag=direct 2>/dev/null | sha256sum)"
dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct 2>/dev/null
echo "WRITE_DIRECT $?"
dd if=/dev/zero of=/dev/vda bs=4k seek=100 count=1 conv=fsync 2>/dev/null
echo "WRITE_CACHED $?"
blkdiscard -o 1048576 -l 1048576 /dev/vda 2>/dev/null
echo "DISCARD $?"
sync
echo 3 > /proc/sys/vm/drop_caches
echo "REREAD $(dd if=/dev/vda bs=64k 2>/dev/null | sha256sum)"
"""


def _open_flags(pid: int, path: Path) -> int:
    """The open flags of ``pid``'s fd on ``path`` (from /proc/PID/fdinfo)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                return int(re.search(r"^flags:\s+(\d+)$", info, re.M).group(1), 8)
        except FileNotFoundError:
            continue
    raise AssertionError(f"process {pid} has no fd open on {path}")


def test_read_only(tmp_path: Path) -> None:
    img = tmp_path / "ro.img"
    content = os.urandom(16 * MiB)
    img.write_bytes(content)
    before = os.stat(img)

    with BlkDaemon(tmp_path, img, ["--read-only"]) as daemon:
        assert _open_flags(daemon.pid, img) & os.O_ACCMODE == os.O_RDONLY
        with guest(RO_SCRIPT, daemon) as vm:
            result = run_guest(vm, daemon)
        daemon.assert_idle()
        assert daemon.stop() == 0, daemon.describe()
    check_log(daemon)
    out = result.lines

    assert tagged(out, "RO") == "1"
    assert tagged(out, "DISCARD_MAX") == "0"
    assert tagged(out, "READ") == sha(content)
    assert tagged(out, "WRITE_DIRECT") != "0", "O_DIRECT write to a read-only disk succeeded"
    assert tagged(out, "WRITE_CACHED") != "0", "write + fsync to a read-only disk succeeded"
    assert tagged(out, "DISCARD") != "0", "discard on a read-only disk succeeded"
    assert tagged(out, "REREAD") == sha(content)
    assert sha(img.read_bytes()) == sha(content), "read-only image modified"
    after = os.stat(img)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


# --------------------------------------------------------------------------- resize


RESIZE_SCRIPT = """
before=$(cat /sys/block/vda/size)
echo "BEFORE $before"
echo RESIZE-NOW
i=0
while [ "$(cat /sys/block/vda/size)" = "$before" ] && [ $i -lt 200 ]; do
    sleep 0.1; i=$((i + 1))
done
echo "AFTER $(cat /sys/block/vda/size)"
dd if=/dev/vda bs=512 skip=$(( $(cat /sys/block/vda/size) - 8 )) count=8 iflag=direct \
    2>/dev/null | sha256sum | sed 's/^/TAIL /'
"""


def resize_while_the_guest_runs(vm: GuestVM, img: Path, new_size: int) -> GuestResult:
    """Boot, wait until the guest has read its size, grow the image, let it finish."""
    vm.start()
    vm.wait_for("RESIZE-NOW", 60)
    with open(img, "r+b") as f:
        f.truncate(new_size)
        f.seek(new_size - 4096)
        f.write(b"T" * 4096)  # the new end of the disk, for the guest to read
    return vm.wait()


def test_resize_reaches_the_guest(tmp_path: Path) -> None:
    """The image grows on the host: the back-end sees it, sends CONFIG_CHANGE_MSG on the
    back-end channel QEMU gave it (SET_BACKEND_REQ_FD), QEMU re-reads the config and the
    guest kernel picks up the new capacity, and can read the new end of the disk."""
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    with BlkDaemon(tmp_path, img) as daemon, guest(RESIZE_SCRIPT, daemon) as vm:
        with watchdog(daemon, vm):
            result = resize_while_the_guest_runs(vm, img, 24 * MiB)
        check_guest(result, daemon)
        assert daemon.stop() == 0, daemon.describe()
    check_log(daemon)
    assert tagged(result.lines, "BEFORE") == str(16 * MiB // 512)
    assert tagged(result.lines, "AFTER") == str(24 * MiB // 512)
    assert tagged(result.lines, "TAIL") == sha(b"T" * 4096)
    assert "CONFIG_CHANGE_MSG to the front-end" in daemon.log


# --------------------------------------------------------------------------- multiqueue


MQ_SCRIPT = """
echo "QUEUES $(ls /sys/block/vda/mq | tr '\\n' ' ')"
echo "CPUS $(nproc)"
echo READY
sleep 1
echo IRQ_BEFORE; grep -E 'virtio[0-9]+-req' /proc/interrupts; echo IRQ_END
# 2 MiB each, 4 KiB O_DIRECT requests, one writer pinned on each CPU (and its queue).
taskset -c 0 dd if=/pa of=/dev/vda bs=4k seek=1024 oflag=direct 2>/dev/null &
p0=$!
taskset -c 1 dd if=/pb of=/dev/vda bs=4k seek=2048 oflag=direct 2>/dev/null &
p1=$!
wait $p0; echo "W0 $?"
wait $p1; echo "W1 $?"
echo IRQ_AFTER; grep -E 'virtio[0-9]+-req' /proc/interrupts; echo IRQ_END
# Read each back from the other CPU, in parallel too.
taskset -c 1 sh -c 'dd if=/dev/vda bs=4k skip=1024 count=512 iflag=direct 2>/dev/null \
    | sha256sum > /tmp/ra' &
taskset -c 0 sh -c 'dd if=/dev/vda bs=4k skip=2048 count=512 iflag=direct 2>/dev/null \
    | sha256sum > /tmp/rb' &
wait
echo "RA $(cat /tmp/ra)"
echo "RB $(cat /tmp/rb)"
"""


def _irq_counts(lines: list[str], ncpu: int) -> dict[str, int]:
    """queue name (virtioN-req.Q) -> interrupts summed over CPUs."""
    counts = {}
    for line in lines:
        words = line.split()
        counts[words[-1]] = sum(int(w) for w in words[1 : 1 + ncpu])
    return counts


def test_multiqueue(tmp_path: Path) -> None:
    img = tmp_path / "mq.img"
    with img.open("wb") as f:
        f.truncate(32 * MiB)
    pa, pb = os.urandom(2 * MiB), os.urandom(2 * MiB)

    with BlkDaemon(tmp_path, img, ["--num-queues", "2"]) as daemon:
        with (guest(MQ_SCRIPT, daemon, num_queues=2, smp=2, files={"pa": pa, "pb": pb}) as vm,
              watchdog(daemon, vm)):
            vm.start()
            vm.wait_for("READY\n")
            workers = daemon.workers()
            result = vm.wait()
        check_guest(result, daemon)
        assert len(workers) == 2, f"expected 2 queue workers, saw {workers}"
        daemon.assert_idle()
        assert daemon.stop() == 0, daemon.describe()
    check_log(daemon)
    out = result.lines

    assert tagged(out, "QUEUES") == "0 1"
    assert tagged(out, "CPUS") == "2"
    assert tagged(out, "W0") == "0" and tagged(out, "W1") == "0"
    before = _irq_counts(result.between("IRQ_BEFORE", "IRQ_END"), 2)
    after = _irq_counts(result.between("IRQ_AFTER", "IRQ_END"), 2)
    assert sorted(after) == ["virtio0-req.0", "virtio0-req.1"], after
    for q in after:  # both queues completed requests during the parallel writes
        assert after[q] > before.get(q, 0), (before, after)
    assert tagged(out, "RA") == sha(pa)
    assert tagged(out, "RB") == sha(pb)
    assert image_slice(img, 4 * MiB, 2 * MiB) == pa
    assert image_slice(img, 8 * MiB, 2 * MiB) == pb
    assert image_slice(img, 0, 4 * MiB) == bytes(4 * MiB)
    assert image_slice(img, 6 * MiB, 2 * MiB) == bytes(2 * MiB)
    assert image_slice(img, 10 * MiB, 22 * MiB) == bytes(22 * MiB)


# --------------------------------------------------------------------------- reconnect


WRITE_SCRIPT = """
dd if=/pa of=/dev/vda bs=64k seek=64 oflag=direct 2>/dev/null
dd if=/pb of=/dev/vda bs=64k seek=96 2>/dev/null
sync
echo WROTE
"""

READ_AB = """
echo "A $(dd if=/dev/vda bs=64k skip=64 count=16 iflag=direct 2>/dev/null | sha256sum)"
echo "B $(dd if=/dev/vda bs=64k skip=96 count=16 2>/dev/null | sha256sum)"
"""

LOOP_SCRIPT = READ_AB + """
i=0
while true; do
    dd if=/pc of=/dev/vda bs=64k seek=128 oflag=direct 2>/dev/null || echo "WRITE FAILED"
    dd if=/dev/vda of=/dev/null bs=64k skip=64 count=16 iflag=direct 2>/dev/null
    i=$((i + 1))
    echo "ITER $i"
done
"""

VERIFY_SCRIPT = READ_AB + """
echo "C $(dd if=/dev/vda bs=64k skip=128 count=16 iflag=direct 2>/dev/null | sha256sum)"
dd if=/pd of=/dev/vda bs=64k seek=160 oflag=direct 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
echo "D $(dd if=/dev/vda bs=64k skip=160 count=16 2>/dev/null | sha256sum)"
"""


def test_reconnect_and_killed_frontend(tmp_path: Path) -> None:
    img = tmp_path / "re.img"
    with img.open("wb") as f:
        f.truncate(32 * MiB)
    pa, pb, pc, pd = (os.urandom(MiB) for _ in range(4))
    files = {"pa": pa, "pb": pb, "pc": pc, "pd": pd}

    with BlkDaemon(tmp_path, img) as daemon:
        pid = daemon.pid
        # 1. A guest writes and powers off: QEMU exits, the connection drops.
        with guest(WRITE_SCRIPT, daemon, files=files, errexit=True) as vm:
            result = run_guest(vm, daemon)
        assert result.lines == ["WROTE"]
        daemon.assert_idle()
        assert image_slice(img, 4 * MiB, MiB) == pa
        assert image_slice(img, 6 * MiB, MiB) == pb

        # 2. A second QEMU on the same back-end reads it back, then loops on I/O and is
        # killed with SIGKILL in the middle of it.
        with guest(LOOP_SCRIPT, daemon, files=files) as vm:
            with watchdog(daemon, vm):
                vm.start()
                vm.wait_for("ITER 3\n")
            workers = daemon.workers()
            vm.kill()
            console = vm.console
        assert len(workers) == 1, f"expected 1 queue worker, saw {workers}"
        lines = console.splitlines()
        assert tagged(lines, "A") == sha(pa), console
        assert tagged(lines, "B") == sha(pb), console
        assert "WRITE FAILED" not in console, console
        daemon.assert_idle()
        assert daemon.pid == pid

        # 3. The back-end still serves a new guest after the front-end was killed.
        with guest(VERIFY_SCRIPT, daemon, files=files, errexit=True) as vm:
            result = run_guest(vm, daemon)
        daemon.assert_idle()
        assert daemon.stop() == 0, daemon.describe()
    check_log(daemon)
    log = daemon.log
    assert log.count("front-end connected") == 3, daemon.describe()
    assert log.count("front-end disconnected") == 3, daemon.describe()

    out = result.lines
    assert tagged(out, "A") == sha(pa)
    assert tagged(out, "B") == sha(pb)
    assert tagged(out, "C") == sha(pc)  # rewritten identically by every loop iteration
    assert tagged(out, "D") == sha(pd)
    assert image_slice(img, 4 * MiB, MiB) == pa
    assert image_slice(img, 6 * MiB, MiB) == pb
    assert image_slice(img, 8 * MiB, MiB) == pc
    assert image_slice(img, 10 * MiB, MiB) == pd
    assert image_slice(img, 11 * MiB, 21 * MiB) == bytes(21 * MiB)
