"""Live migration with our vhost-user-blk on both sides (issue 9): a QEMU 7.2 guest writes
and verifies patterned blocks in a loop while QEMU migrates it (QMP `migrate`, bandwidth
capped so that memory is copied in several passes) to a second QEMU on the same host
(`-incoming`), whose device is served by a second back-end on the same image. The source's
back-end logs its writes into guest memory (LOG_SHMFD, VHOST_F_LOG_ALL,
VHOST_VRING_F_LOG), so the destination gets every page it wrote: the guest goes on after
the switch (the host tells it through the disk), and at the end checks every block it
wrote before, during and after; the host checks the image.

A reader beside the writer makes a missing log entry visible: without the buffers of
completed reads logged, its data comes out stale on the destination ("STALE", seen in
three runs out of three with that logging taken out)."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import signal
from pathlib import Path

import pytest
from daemon import Program
from qemu_helpers import (
    BLK_MODULES,
    QUEUE_FAILURE,
    BlkDaemon,
    MiB,
    migrate,
    require_guest_prerequisites,
)
from test_qemu_vvu import start, start_device, wait_for
from test_vvu_bridge import qsd_cmd
from test_vvu_qemu import qemu11  # noqa: F401  (fixture)

from testbed.guest import GuestError, GuestVM

BLOCK = 64 << 10
REGION_BLOCKS = 16  # 1 MiB regions
REGIONS = 4
FIRST_BLOCK = 64

CACHED_BLOCK = 256  # the reader's 16 MiB: /Q, written once
CACHED_BYTES = 16 << 20
FLAG_SECTOR = 8000  # the host writes MIGRATED here once the destination runs
AFTER = 8  # rounds the writer does once it has seen the flag

# Until the flag, then AFTER more rounds: the writer's last round number is unknown
# beforehand, so it says which it was.
WRITER = f"""
r=0; left={AFTER}
while [ $left -gt 0 ]; do
    skip=$((r % 16)); seek=$(({FIRST_BLOCK} + (r % {REGIONS}) * {REGION_BLOCKS}))
    dd if=/P of=/dev/vda bs=64k skip=$skip seek=$seek count={REGION_BLOCKS} \\
        oflag=direct 2>/dev/null || echo "WRITE_FAILED $r"
    dd if=/dev/vda of=/tmp/got bs=64k skip=$seek count={REGION_BLOCKS} iflag=direct \\
        2>/dev/null || echo "READ_FAILED $r"
    dd if=/P of=/tmp/want bs=64k skip=$skip count={REGION_BLOCKS} 2>/dev/null
    cmp -s /tmp/got /tmp/want || echo "MISMATCH $r"
    echo "ROUND $r"
    if [ -e /tmp/migrated ]; then left=$((left - 1)); fi
    r=$((r + 1))
done
echo "LAST $((r - 1))"
"""

# dd reads 16 MiB of distinct data in 2 MiB pieces into one buffer of its own, which no
# CPU writes after the kernel zeroed it, and hands each piece to cmp through a pipe (most
# of its time goes there). A page of that buffer the back-end filled after the migration
# last copied it, were the write not logged, would reach the destination with an earlier
# piece's data, and cmp would see it.
READER = f"""
while [ ! -e /tmp/writer-done ]; do
    dd if=/dev/vda bs=2M skip={CACHED_BLOCK // 32} count=8 iflag=direct 2>/dev/null \\
        | cmp -s - /Q || echo "STALE"
done
"""

WATCHER = f"""
until dd if=/dev/vda bs=512 skip={FLAG_SECTOR} count=1 iflag=direct 2>/dev/null \\
        | grep -q MIGRATED; do
    sleep 0.2
done
touch /tmp/migrated
"""

SCRIPT = f"""
dd if=/Q of=/dev/vda bs=64k seek={CACHED_BLOCK} oflag=direct 2>/dev/null
sh /reader.sh &
sh /watcher.sh &
sh /writer.sh
touch /tmp/writer-done
wait
k=0
while [ $k -lt {REGIONS} ]; do
    dd if=/dev/vda bs=64k skip=$(({FIRST_BLOCK} + k * {REGION_BLOCKS})) \\
        count={REGION_BLOCKS} iflag=direct 2>/dev/null | sha256sum | sed "s/^/FINAL $k /"
    k=$((k + 1))
done
echo "IOERRORS $(dmesg | grep -c -i -e 'I/O error' -e 'blk_update_request')"
"""


def _expected(pattern: bytes, last: int) -> list[bytes]:
    """Each region holds what the last round that wrote it wrote."""
    out = []
    for k in range(REGIONS):
        final = max(r for r in range(last + 1) if r % REGIONS == k)
        skip = final % 16
        out.append(pattern[skip * BLOCK : (skip + REGION_BLOCKS) * BLOCK])
    return out


@pytest.fixture(scope="module", autouse=True)
def _prerequisites() -> None:
    require_guest_prerequisites()


class VvuSource:
    """The source's disk served through the virtio-vhost-user device: the device process
    (the consumer's socket) and, in a process appliance, vhost-user-blk (`--vvu`) or an
    unmodified qemu-storage-daemon 7.2 behind vhost-user-vvu-bridge."""

    def __init__(self, tmp_path: Path, img: Path, qsd: bool = False) -> None:
        self.tmp = tmp_path
        self.device = start_device(tmp_path)
        vfu = str(tmp_path / "vfu.sock")
        if qsd:
            sock = tmp_path / "qsd.sock"
            self.blk = start(["vhostuser.cli.vvu_bridge", "--vvu", vfu, "--backend-socket",
                              str(sock), "--backend-cmd", qsd_cmd(img, sock), "-vv"],
                             tmp_path / "src.log")
        else:
            self.blk = start(["vhostuser.cli.blk", "--vvu", vfu, "--blk-file", str(img),
                              "-v"], tmp_path / "src.log")
        wait_for(tmp_path / "device.log", "vfio-user client connected", self.device)
        self.sock = tmp_path / "vhost.sock"

    @property
    def log(self) -> str:
        return ((self.tmp / "src.log").read_text(errors="replace") + "--- device ---\n"
                + (self.tmp / "device.log").read_text(errors="replace"))

    def stop(self) -> int:
        for proc in (self.blk, self.device):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(15) for proc in (self.blk, self.device)]
        return max(codes, key=abs)


class QsdDestination:
    """qemu-storage-daemon 7.2 on AF_UNIX: the destination when the source is one too
    (QEMU checks that the destination's device offers what the guest took)."""

    def __init__(self, tmp_path: Path, img: Path, sock: Path) -> None:
        self.path = tmp_path / "dst.log"
        self.proc = Program(shlex.split(qsd_cmd(img, sock)), self.path, ready=[sock])

    @property
    def log(self) -> str:
        return self.path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        rc = self.proc.wait(15)
        return 0 if rc == -signal.SIGTERM else rc  # QSD 7.2 dies of the signal itself


@pytest.mark.parametrize("qemu", ["7.2", "11.1 inflight-migration", "7.2 source through vvu",
                                  "7.2 source through vvu, qemu-storage-daemon"])
def test_a_guest_writing_through_our_back_end_migrates_and_loses_nothing(
        tmp_path: Path, qemu: str, request: pytest.FixtureRequest) -> None:
    """With QEMU 11.1 and `inflight-migration=on`, QEMU moves the in-flight area with the
    device, and our back-ends negotiate GET_VRING_BASE_INFLIGHT: the source's (one I/O
    thread: the reader's 2 MiB reads queue up behind it) may stop without serving what it
    has not started, and the destination's then serves it from the migrated area. (In
    runs here the pool had always caught up by the time QEMU stopped the ring: fast local
    storage; test_inflight_daemon.py makes the stop find requests queued.)

    Through vvu: the source's disk is served through the virtio-vhost-user device by
    vhost-user-blk in a process appliance, or by qemu-storage-daemon 7.2 (unmodified)
    behind the bridge (then the destination is qemu-storage-daemon too: QEMU wants the
    same device features there); the consumer QEMU's dirty log crosses the device in the
    window and the appliance logs into it; the destination's back-end is on AF_UNIX."""
    img = tmp_path / "mig.img"
    with img.open("wb") as f:
        f.truncate(48 * MiB)
    pattern = os.urandom(32 * BLOCK)
    cached = os.urandom(CACHED_BYTES)
    files = {"/P": pattern, "/Q": cached, "/writer.sh": WRITER.encode(),
             "/reader.sh": READER.encode(), "/watcher.sh": WATCHER.encode()}
    src_sock, dst_sock = tmp_path / "src.sock", tmp_path / "dst.sock"
    src_qmp, dst_qmp, mig = tmp_path / "src.qmp", tmp_path / "dst.qmp", tmp_path / "mig.sock"
    new = qemu.startswith("11.1")
    binary = request.getfixturevalue("qemu11") if new else "qemu-system-x86_64"
    extra = ["--io-threads", "1"] if new else []
    a: BlkDaemon | VvuSource
    if "vvu" in qemu:
        a = VvuSource(tmp_path, img, qsd=qemu.endswith("qemu-storage-daemon"))
        src_sock = a.sock
    else:
        a = BlkDaemon(tmp_path, img, extra, name="src", sock=src_sock).start()
    b: BlkDaemon | QsdDestination
    if qemu.endswith("qemu-storage-daemon"):
        b = QsdDestination(tmp_path, img, dst_sock)
    else:
        b = BlkDaemon(tmp_path, img, extra, name="dst", sock=dst_sock).start()

    def device(sock: Path, qmp: Path) -> list[str]:
        return ["-chardev", f"socket,id=c0,path={sock}",
                "-device", "vhost-user-blk-pci,chardev=c0"
                + (",inflight-migration=on" if new else ""),
                "-qmp", f"unix:{qmp},server=on,wait=off"]

    src = GuestVM(SCRIPT, modules=BLK_MODULES, timeout=300, files=files,
                  qemu_binary=binary, qemu_args=device(src_sock, src_qmp))
    dst = GuestVM(SCRIPT, modules=BLK_MODULES, timeout=300, files=files,
                  qemu_binary=binary,
                  qemu_args=[*device(dst_sock, dst_qmp), "-incoming", f"unix:{mig}"])

    def context() -> str:
        return (f"--- source ---\n{src.console[-3000:]}\n--- destination ---\n"
                f"{dst.console[-3000:]}\n--- src back-end ---\n{a.log[-3000:]}\n"
                f"--- dst back-end ---\n{b.log[-3000:]}")

    try:
        src.start()
        src.wait_for("ROUND 3\n", 180)
        dst.start()
        # slow enough for several passes over memory while the back-end writes it
        migrate(src_qmp, mig, context, max_bandwidth=16 << 20)
        migrated_at = src.console.count("ROUND ")
        with img.open("r+b") as f:  # tell the guest, through the disk
            f.seek(FLAG_SECTOR * 512)
            f.write(b"MIGRATED".ljust(512, b"\0"))
        result = dst.wait()
    except GuestError as e:
        pytest.fail(f"{e}\n{context()}")
    finally:
        src.close()
        dst.close()
        a_rc, b_rc = a.stop(), b.stop()
    out = src.console + result.console
    assert not [ln for ln in out.splitlines() if ln.split(" ")[0] in
                ("WRITE_FAILED", "READ_FAILED", "MISMATCH", "STALE")], context()
    last = [int(ln.split()[1]) for ln in result.console.splitlines() if ln.startswith("LAST ")]
    assert len(last) == 1 and last[0] >= migrated_at + AFTER - 1, context()
    assert migrated_at >= 3, f"migrated after round {migrated_at}: not mid-way"
    assert "IOERRORS 0" in result.console, context()
    want = _expected(pattern, last[0])
    for k in range(REGIONS):
        assert f"FINAL {k} {hashlib.sha256(want[k]).hexdigest()}  -" in result.console, context()
    disk = img.read_bytes()
    assert disk[CACHED_BLOCK * BLOCK : CACHED_BLOCK * BLOCK + CACHED_BYTES] == cached
    for k in range(REGIONS):
        at = (FIRST_BLOCK + k * REGION_BLOCKS) * BLOCK
        assert disk[at : at + REGION_BLOCKS * BLOCK] == want[k]
    if qemu.endswith("qemu-storage-daemon"):  # the log's file reached QSD from the window
        assert "consumer -> back-end: SET_LOG_BASE" in a.log, context()
    else:
        assert "dirty logging on" in a.log, context()  # the source's back-end logged
    if new:  # QEMU 11.1 took GET_VRING_BASE_INFLIGHT (bit 20) and the area on both sides
        for d in (a, b):
            m = re.search(r"protocol features (0x[0-9a-f]+)", d.log)
            assert m and int(m.group(1), 16) & (1 << 20 | 1 << 12) == 1 << 20 | 1 << 12, \
                context()
    for d in (a, b):
        assert not QUEUE_FAILURE.search(d.log), context()
        assert "Traceback" not in d.log, context()
    assert (a_rc, b_rc) == (0, 0), context()
