"""vhost-user-trace between QEMU 7.2 and qemu-storage-daemon 7.2 (two C peers, neither
ours): the guest boots with its disk served through the tracer and does I/O that reads
back right; every message of the session is decoded (nothing the codec cannot read), the
passed fds are what the protocol says (memfd guest RAM, eventfds), replies are matched to
their requests, and the session's sequence of messages is the recorded one (golden file,
tests/golden/trace_qemu72_qsd72_blk.txt)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from daemon import Program
from qemu_helpers import (
    BLK_MODULES,
    blk_qemu_args,
    require_guest_prerequisites,
    require_tool,
)
from test_codec import check_frames
from test_qemu_blk import RESIZE_SCRIPT, resize_while_the_guest_runs, tagged

from testbed.guest import GuestVM

GOLDEN = Path(__file__).with_name("golden") / "trace_qemu72_qsd72_blk.txt"
FRAMES = Path(__file__).with_name("golden") / "frames_qemu72_qsd72_blk.jsonl"  # test_codec
SCRIPT = r"""
dd if=/pattern of=/dev/vda bs=64k seek=16 oflag=direct 2>/dev/null
echo "READBACK $(dd if=/dev/vda bs=64k skip=16 count=16 iflag=direct 2>/dev/null | sha256sum)"
"""
# payload fields that are the same in every run (addresses, sizes of RAM and fds vary)
STABLE = {"SET_VRING_NUM": ("index", "num"), "SET_VRING_BASE": ("index", "num"),
          "GET_VRING_BASE": ("index",), "SET_VRING_ENABLE": ("index", "num"),
          "SET_VRING_KICK": ("index",), "SET_VRING_CALL": ("index",),
          "SET_VRING_ERR": ("index",), "SET_VRING_ADDR": ("index",)}


@pytest.fixture(scope="module", autouse=True)
def kver() -> str:
    return require_guest_prerequisites()


def normalize(events: list[dict[str, Any]]) -> list[str]:
    """The session as a sequence of lines that do not depend on the run."""
    out = []
    for ev in events:
        if "end" in ev:
            continue
        name = ev.get("request") or f"reply {ev['reply']}"
        fields = STABLE.get(ev.get("request", ""), ())
        payload = ev.get("payload", {})
        extra = " ".join(f"{k}={payload[k]}" for k in fields if k in payload)
        if "names" in payload:
            extra = "|".join(payload["names"])
        kinds = ",".join(f["kind"] for f in ev.get("fds", []))
        out.append(" ".join(x for x in (ev["dir"], name, extra, kinds and f"fds={kinds}") if x))
    return out


@contextmanager
def tracing(tmp_path: Path, server: Program, back: Path, front: Path,
            *args: str) -> Iterator[None]:
    """vhost-user-trace between `front` and `server` listening on `back`, for one session
    of a blk device (`args`: its output options); it must end cleanly after the session,
    and both are stopped whatever happens."""
    tracer = None
    try:
        tracer = Program.python(["vhostuser.cli.trace", "--listen", str(front), "--connect",
                                 str(back), "--once", "--type", "blk", *args],
                                tmp_path / "tracer.log", ready=[front])
        yield
        assert tracer.wait(30) == 0, tracer.log()
    finally:
        for proc in (tracer, server):
            if proc is not None:
                proc.stop(10)


def test_qemu_and_qemu_storage_daemon_through_the_tracer(tmp_path: Path) -> None:
    qsd = require_tool("qemu-storage-daemon", "qemu-system-common")
    img, back, front = tmp_path / "disk.img", tmp_path / "back.sock", tmp_path / "front.sock"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    pattern = os.urandom(1 << 20)
    trace = tmp_path / "trace.jsonl"
    server = Program([qsd, "--blockdev", f"driver=file,node-name=file0,filename={img}",
                      "--blockdev", "driver=raw,node-name=disk0,file=file0",
                      "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,"
                      f"addr.type=unix,addr.path={back},writable=on,num-queues=1"],
                     tmp_path / "qsd.log", ready=[back])
    with tracing(tmp_path, server, back, front, "--json", "--frames", "--output", str(trace)):
        vm = GuestVM(SCRIPT, modules=BLK_MODULES, timeout=120, files={"pattern": pattern},
                     qemu_args=blk_qemu_args(front))
        with vm:
            result = vm.run()
    assert result.status == 0, result.console[-3000:]
    out = dict(ln.split(" ", 1) for ln in result.lines if " " in ln)
    assert out["READBACK"].split()[0] == hashlib.sha256(pattern).hexdigest()
    assert img.read_bytes()[1 << 20 : 2 << 20] == pattern

    events = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [e for e in events if "error" in e] == [], "messages the codec could not read"
    requests = [e for e in events if "request" in e]
    replies = [e for e in events if "reply" in e]
    assert all("payload" in e for e in requests + replies)
    assert all("ms" in e for e in replies), "a reply not matched to its request"
    kinds = {e["request"]: [f["kind"] for f in e.get("fds", [])] for e in requests}
    # qemu-storage-daemon offers CONFIGURE_MEM_SLOTS: QEMU adds regions one by one
    assert kinds["ADD_MEM_REG"] == ["memfd"] and "SET_MEM_TABLE" not in kinds
    assert kinds["SET_VRING_KICK"] == ["eventfd"] and kinds["SET_VRING_CALL"] == ["eventfd"]
    assert kinds["SET_BACKEND_REQ_FD"] == ["socket"]  # our end of the interposed channel
    assert check_frames(events) == len(requests + replies)  # the codec reads them all
    got = normalize(events)
    if os.environ.get("VHOSTUSER_UPDATE_GOLDEN"):
        GOLDEN.write_text("\n".join(got) + "\n")
        FRAMES.write_text("".join(json.dumps(e) + "\n" for e in events if "frame" in e))
    assert got == GOLDEN.read_text().splitlines(), "\n".join(got)


def test_the_backend_channel_through_the_tracer_as_text(tmp_path: Path) -> None:
    """The back-end's own requests pass the tracer too: QEMU 7.2 and our vhost-user-blk
    through it, the image grown while the guest runs; the back-end's CONFIG_CHANGE_MSG
    crosses the channel the tracer interposed (SET_BACKEND_REQ_FD), QEMU reads the config
    again (the new capacity in the trace), the guest sees the new size. The trace is the
    text a person reads (no --json), device feature bits by name (--type blk)."""
    img, back, front = tmp_path / "disk.img", tmp_path / "back.sock", tmp_path / "front.sock"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    trace = tmp_path / "trace.txt"
    server = Program.python(["vhostuser.cli.blk", "--socket-path", str(back), "--blk-file",
                             str(img), "-v"], tmp_path / "blk.log", ready=[back])
    vm = GuestVM(RESIZE_SCRIPT, modules=BLK_MODULES, timeout=120,
                 qemu_args=blk_qemu_args(front))
    with tracing(tmp_path, server, back, front, "--output", str(trace)), vm:
        result = resize_while_the_guest_runs(vm, img, 24 << 20)
    assert result.status == 0, result.console[-3000:]
    assert tagged(result.lines, "AFTER") == str((24 << 20) // 512)
    lines = trace.read_text().splitlines()
    said = [ln.split(None, 1)[1] for ln in lines]  # without the time
    change = next(i for i, ln in enumerate(said)
                  if ln.startswith("back-end  >> CONFIG_CHANGE_MSG"))
    # (no NEED_REPLY asked: no reply); QEMU reads the config again, the new capacity
    assert said[change + 1].startswith("front-end > GET_CONFIG offset 0, size "), said
    reread = re.fullmatch(r"back-end  < reply to GET_CONFIG offset 0, size \d+, flags 0, "
                          r"data ([0-9a-f]+) \[[0-9.]+ ms\]", said[change + 2])
    assert reread, said[change + 2]
    assert int.from_bytes(bytes.fromhex(reread[1][:16]), "little") == (24 << 20) // 512
    offered = next(re.fullmatch(r"back-end  < reply to GET_FEATURES 0x[0-9a-f]+ (\S+) .*", ln)
                   for ln in said if ln.startswith("back-end  < reply to GET_FEATURES"))
    assert offered is not None
    names = offered[1].split("|")
    assert "BLK_FLUSH" in names and not any(n.startswith("bit") for n in names), names
