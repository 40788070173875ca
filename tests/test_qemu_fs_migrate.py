"""A guest with a virtio-fs share served by our vhost-user-fs live-migrates (QEMU 11.1,
whose vhost-user-fs moves the back-end's state with DEVICE_STATE) to a second QEMU 11.1
whose device is served by a second back-end on the same directory. The guest writes
numbered lines through a file it opened before, in a loop that runs across the switch,
holds a directory as its working directory and a file open that it has not read yet; on
the destination it goes on with all three through the node ids and handles the source
gave (had the session not followed, the writes would fail with EBADF and the names in
the directory with ESTALE). The host checks every line arrived once, in order."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from daemon import Program
from qemu_helpers import (
    QUEUE_FAILURE,
    BackendDaemon,
    migrate,
    require_guest_prerequisites,
)
from test_codec import check_frames
from test_qemu_fs import MODULES, fs_args
from test_vvu_qemu import qemu11  # noqa: F401  (fixture)

from testbed.guest import GuestError, GuestVM

FRAMES = Path(__file__).with_name("golden") / "frames_qemu11_ours_fs.jsonl"  # test_codec

SCRIPT = r"""
mount -t virtiofs t /mnt || echo "MOUNT-FAILED"
cd /mnt/sub
exec 3>> log.txt
exec 4< ../data.bin
n=0
while [ ! -e /mnt/migrated ]; do
    echo "line $n" >&3 || echo "WRITE-FAILED $n"
    n=$((n + 1))
    [ $n = 200 ] && echo "WRITING"
done
k=0
while [ $k -lt 50 ]; do
    echo "line $n" >&3 || echo "WRITE-FAILED $n"
    n=$((n + 1)); k=$((k + 1))
done
exec 3>&-
echo "LAST $((n - 1))"
echo "DATA $(cat <&4 | sha256sum | cut -c1-16)"
exec 4<&-
echo "SUB $(cat b.txt)"
echo "LS $(ls | sort | tr '\n' ' ')"
cd / && umount /mnt && echo "UMOUNT $?"
"""


@pytest.fixture(scope="module", autouse=True)
def _prerequisites() -> None:
    require_guest_prerequisites()


def test_a_guest_with_open_files_on_our_virtio_fs_migrates(tmp_path: Path,
                                                           qemu11: str) -> None:  # noqa: F811
    share = tmp_path / "share"
    (share / "sub").mkdir(parents=True)
    (share / "sub" / "b.txt").write_text("bee")
    data = os.urandom(4 << 20)
    (share / "data.bin").write_bytes(data)
    src_qmp, dst_qmp, mig = tmp_path / "src.qmp", tmp_path / "dst.qmp", tmp_path / "mig.sock"
    args = ["--shared-dir", str(share), "--tag", "t"]
    traced, trace = tmp_path / "traced.sock", tmp_path / "trace.jsonl"
    with (BackendDaemon(tmp_path, "vhost-user-fs", args, name="src") as a,
          BackendDaemon(tmp_path, "vhost-user-fs", args, name="dst") as b):
        # the source's messages through vhost-user-trace, recorded for test_codec.py
        tracer = Program.python(["vhostuser.cli.trace", "--listen", str(traced), "--connect",
                                 str(a.sock), "--json", "--frames", "--output", str(trace),
                                 "--once"], tmp_path / "tracer.log", ready=[traced])

        def device(sock: Path, qmp: Path) -> list[str]:
            return [*fs_args(sock, "t", 0), "-qmp", f"unix:{qmp},server=on,wait=off"]

        src = GuestVM(SCRIPT, modules=MODULES, timeout=240, qemu_binary=qemu11,
                      qemu_args=device(traced, src_qmp))
        dst = GuestVM(SCRIPT, modules=MODULES, timeout=240, qemu_binary=qemu11,
                      qemu_args=[*device(b.sock, dst_qmp), "-incoming", f"unix:{mig}"])

        def context() -> str:
            return (f"--- source ---\n{src.console[-3000:]}\n--- destination ---\n"
                    f"{dst.console[-3000:]}\n--- src back-end ---\n{a.log[-3000:]}\n"
                    f"--- dst back-end ---\n{b.log[-3000:]}")

        try:
            src.start()
            src.wait_for("WRITING\n", 180)
            dst.start()
            migrate(src_qmp, mig, context)
            (share / "migrated").touch()
            result = dst.wait()
        except GuestError as e:
            pytest.fail(f"{e}\n{context()}")
        finally:
            src.close()
            dst.close()
            tracer.stop(10)
        assert a.stop() == 0 and b.stop() == 0, context()
    out = dict(ln.split(" ", 1) for ln in result.lines if " " in ln)
    assert "MOUNT-FAILED" not in result.console and "WRITE-FAILED" not in result.console, \
        context()
    last = int(out["LAST"])
    lines = (share / "sub" / "log.txt").read_text().splitlines()
    assert lines == [f"line {i}" for i in range(last + 1)], context()
    assert out["DATA"] == hashlib.sha256(data).hexdigest()[:16], context()
    assert out["SUB"] == "bee" and out["LS"].split() == ["b.txt", "log.txt"], context()
    assert out["UMOUNT"] == "0", context()
    assert "device state saved" in a.log and "device state loaded" in b.log, context()
    for d in (a, b):
        assert not QUEUE_FAILURE.search(d.log) and "Traceback" not in d.log, context()
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    frames = [e for e in events if "frame" in e]
    assert check_frames(frames) == len(frames)
    # the state crossed as the spec says: our memfd in SET's reply, CHECK answered 0
    (state_fd,) = [e for e in frames if e.get("request") == "SET_DEVICE_STATE_FD"]
    (reply,) = [e for e in frames if e.get("reply") == "SET_DEVICE_STATE_FD"]
    (check,) = [e for e in frames if e.get("reply") == "CHECK_DEVICE_STATE"]
    assert (state_fd["nfds"], reply["nfds"], reply["payload"]["value"]) == (1, 1, 0)
    assert [f["kind"] for f in reply["fds"]] == ["memfd"] and check["payload"]["value"] == 0
    if os.environ.get("VHOSTUSER_UPDATE_GOLDEN"):
        FRAMES.write_text("".join(json.dumps(e) + "\n" for e in frames))
