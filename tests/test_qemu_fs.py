"""vhost-user-fs with a QEMU 7.2 guest (Linux's virtiofs): the guest mounts four shares at
once, one served by us, one by QEMU 7.2's own virtiofsd (C, Debian 12), one by the Rust
virtiofsd of Debian sid (from the scripts/sid-qemu chroot) and one by us read-only. The
same script runs on ours and on both virtiofsd's, and every line it prints must be the
same (a conformance comparison); the host then checks what the guest wrote, byte for
byte, and that nothing outside the shares was touched."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from daemon import Program
from qemu_helpers import BackendDaemon, require_guest_prerequisites, wait_until, watchdog

from testbed.guest import GuestVM

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
SID_QEMU = Path(__file__).resolve().parents[1] / "scripts" / "sid-qemu"
RUST_VIRTIOFSD = "/usr/libexec/virtiofsd"  # in the sid chroot
MODULES = ["virtio_pci", "virtiofs"]
MANY = 10_000
SCRIPT = r"""
exercise() {
    t=$1
    mount -t virtiofs $t /mnt/$t || { echo "$t MOUNT-FAILED"; return; }
    cd /mnt/$t
    echo "$t SEED $(cat seed.txt)"
    mkdir -p d/e && echo hello > d/e/f.txt && echo "$t CAT $(cat d/e/f.txt)"
    mv d/e/f.txt d/g.txt && echo "$t MV $(ls d | tr '\n' ' ')"
    ln d/g.txt d/hard && echo "$t NLINK $(stat -c %h d/g.txt)"
    ln -s g.txt d/soft && echo "$t SOFT $(readlink d/soft) $(cat d/soft)"
    chmod 640 d/g.txt && echo "$t MODE $(stat -c %a d/g.txt)"
    chown 1234:5678 d/g.txt && echo "$t OWNER $(stat -c %u:%g d/g.txt)"
    touch -d "2001-02-03 04:05:06" d/g.txt && echo "$t MTIME $(stat -c %Y d/g.txt)"
    printf abcdef > d/t.txt && truncate -s 3 d/t.txt
    echo "$t TRUNC $(cat d/t.txt) $(stat -c %s d/t.txt)"
    fallocate -l 1048576 d/alloc
    echo "$t FALLOC $(stat -c %s d/alloc) $(( $(stat -c %b d/alloc) >= 2048 ))"
    dd if=/dev/urandom of=d/sparse bs=4096 count=1 seek=1000 2>/dev/null
    echo "$t SPARSE $(stat -c %s d/sparse) $(( $(stat -c %b d/sparse) < 64 ))"
    echo "$t MANY $(ls many | wc -l) $(ls many | sort | head -1) $(cat many/f9999)"
    rm many/f0 && echo "$t RM $(ls many | wc -l)"
    mkdir x && rmdir x && echo "$t RMDIR $([ -e x ] && echo left || echo gone)"
    mknod d/fifo p && echo "$t FIFO $(stat -c %F d/fifo)"
    mkdir out && cp -a /lib/modules out/ && echo "$t COPYIN $?"
    sums() { (cd "$1" && find . -type f | sort | xargs sha256sum | sha256sum | cut -c1-16); }
    cp -a tree /tmp/$t-tree && echo "$t COPYOUT $(sums /tmp/$t-tree)"
    echo "$t TREESUM $(sums tree)"
    ln -s /etc/shadow esc
    echo "$t ESCAPE $(cat esc 2>&1 | head -c 60 | tr -d '\n' | sed 's/.*: //')"
    echo "$t DOTDOT $(ls /mnt/$t/../../mnt | tr '\n' ' ')"
    mv d/g.txt /tmp/moved 2>/dev/null
    echo "$t MVOUT $([ -e d/g.txt ] && echo kept || echo moved) $(cat /tmp/moved)"
    rm -f /tmp/moved
    echo "$t STATFS $(stat -f -c %S .)"
    seq 1 600000 > big && sync && echo "$t BIG $(sha256sum big | cut -c1-16)"
    cd /
    umount /mnt/$t && echo "$t UMOUNT $?"
}
mkdir -p /mnt/ours /mnt/ref /mnt/rust /mnt/ro
exercise ours
exercise ref
exercise rust
(find /lib/modules -type f | sort | xargs sha256sum) > /tmp/modsums
echo "MODSUMS $(sha256sum /tmp/modsums | cut -c1-16)"
mount -t virtiofs ro /mnt/ro && cd /mnt/ro && echo "RO SEED $(cat seed.txt)"
if touch newfile 2>/dev/null; then echo "RO TOUCH allowed"; else echo "RO TOUCH refused"; fi
if echo x >> seed.txt; then echo "RO APPEND allowed"; else echo "RO APPEND refused"; fi
if mkdir dir 2>/dev/null; then echo "RO MKDIR allowed"; else echo "RO MKDIR refused"; fi
cd / && umount /mnt/ro
"""


@pytest.fixture(scope="module", autouse=True)
def kver() -> str:
    return require_guest_prerequisites()


def populate(share: Path, tree: dict[str, bytes]) -> None:
    share.mkdir()
    (share / "seed.txt").write_text("planted by the host\n")
    many = share / "many"
    many.mkdir()
    for i in range(MANY):
        (many / f"f{i}").write_text(str(i))
    for rel, data in tree.items():
        p = share / "tree" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def fs_args(sock: Path, tag: str, n: int) -> list[str]:
    return ["-chardev", f"socket,id=fs{n},path={sock}",
            "-device", f"vhost-user-fs-pci,chardev=fs{n},tag={tag}"]


def rust_virtiofsd() -> list[str]:
    """The sid chroot's virtiofsd (installed there if missing), as a command."""
    root = subprocess.run([str(SID_QEMU), "path"], capture_output=True, text=True,
                          timeout=60).stdout.strip()
    if not os.access(f"{root}{RUST_VIRTIOFSD}", os.X_OK):
        out = subprocess.run([str(SID_QEMU), "install", "virtiofsd"], capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
    return [str(SID_QEMU), "exec", "--", RUST_VIRTIOFSD]


def test_guest_uses_our_share_as_it_uses_virtiofsd(tmp_path: Path) -> None:
    if not os.access(VIRTIOFSD, os.X_OK):
        pytest.fail(f"{VIRTIOFSD} is missing (Debian package qemu-system-common)")
    rust_cmd = rust_virtiofsd()
    tree = {f"a/b{i}/file{j}.bin": os.urandom(1000 * (i + 1) + j)
            for i in range(5) for j in range(8)}
    tree["top.txt"] = b"top\n"
    ours, ref, rust, ro = (tmp_path / n for n in ("ours", "ref", "rust", "ro"))
    for share in (ours, ref, rust, ro):
        populate(share, tree)
    outside = tmp_path / "outside.txt"
    outside.write_text("not shared\n")
    ref_sock, ref_log = tmp_path / "ref.sock", tmp_path / "virtiofsd.log"
    rust_sock, rust_log = tmp_path / "rust.sock", tmp_path / "rust-virtiofsd.log"
    with (BackendDaemon(tmp_path, "vhost-user-fs", ["--shared-dir", str(ours), "--tag",
                                                    "ours"], name="fs") as d,
          BackendDaemon(tmp_path, "vhost-user-fs", ["--shared-dir", str(ro), "--tag", "ro",
                                                    "--readonly"], name="fs-ro") as dro):
        virtiofsd = Program([VIRTIOFSD, f"--socket-path={ref_sock}", "-o", f"source={ref}",
                             "-o", "cache=auto"], ref_log, ready=[ref_sock])
        rust_proc = Program([*rust_cmd, f"--socket-path={rust_sock}", f"--shared-dir={rust}",
                             "--sandbox=chroot", "--cache=auto"], rust_log,
                            ready=[rust_sock], timeout=30)
        try:
            vm = GuestVM(SCRIPT, modules=MODULES, timeout=300, mem_mb=512,
                         qemu_args=[*fs_args(d.sock, "ours", 0), *fs_args(ref_sock, "ref", 1),
                                    *fs_args(rust_sock, "rust", 2),
                                    *fs_args(dro.sock, "ro", 3)])
            with vm, watchdog(d, vm):
                result = vm.run()
        finally:
            virtiofsd.stop(10)
            rust_proc.stop(10, group=True)
        assert result.status == 0, f"{result.console[-4000:]}\n{d.describe()}"
        assert d.stop() == 0, d.describe()
        assert dro.stop() == 0, dro.describe()
        for daemon in (d, dro):
            assert "Traceback" not in daemon.log, daemon.describe()
    lines = result.lines
    got = {tag: [ln.split(" ", 1)[1] for ln in lines if ln.startswith(tag + " ")]
           for tag in ("ours", "ref", "rust", "RO")}
    # the same answers, line by line, from us and from both virtiofsd's
    for peer in ("ref", "rust"):
        assert got["ours"] == got[peer], f"ours vs {peer}:\n" + "\n".join(
            f"{a!r:60} {b!r}" for a, b in zip(got["ours"], got[peer], strict=False))
    out = dict(ln.split(" ", 1) for ln in got["ours"])
    assert out["SEED"] == "planted by the host"
    assert out["CAT"] == "hello" and out["NLINK"] == "2" and out["SOFT"] == "g.txt hello"
    assert out["MODE"] == "640" and out["OWNER"] == "1234:5678"
    assert out["MTIME"] == "981173106" and out["TRUNC"] == "abc 3"
    assert out["FALLOC"] == "1048576 1" and out["SPARSE"] == f"{1001 * 4096} 1"
    assert out["MANY"] == f"{MANY} f0 9999" and out["RM"] == str(MANY - 1)
    assert out["RMDIR"] == "gone" and out["FIFO"] == "fifo"
    assert out["COPYIN"] == "0" and out["MVOUT"].startswith("moved")
    assert "root:" not in out["ESCAPE"]  # the guest's own (absent) /etc/shadow
    assert out["UMOUNT"] == "0"
    assert out["COPYOUT"] == out["TREESUM"]
    assert got["RO"] == ["SEED planted by the host", "TOUCH refused", "APPEND refused",
                         "MKDIR refused"], result.console[-3000:]
    # on the host: the guest's writes, as it made them
    st = os.stat(ours / "d" / "hard")
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_nlink) == (0o640, 1234, 5678, 1)
    assert int(st.st_mtime) == 981173106
    assert (ours / "d" / "t.txt").read_bytes() == b"abc"
    assert os.readlink(ours / "esc") == "/etc/shadow"
    assert os.readlink(ours / "d" / "soft") == "g.txt"
    assert not (ours / "many" / "f0").exists()
    for peer in (ref, rust):
        assert tree_digest(ours / "tree") == tree_digest(peer / "tree")
        assert tree_digest(ours / "out") == tree_digest(peer / "out")
    mods = "".join(f"{h}  /lib/modules/{rel}\n" for rel, h in
                   sorted(tree_digest(ours / "out" / "modules").items()))
    assert hashlib.sha256(mods.encode()).hexdigest()[:16] == dict(
        ln.split(" ", 1) for ln in lines if ln.startswith("MODSUMS "))["MODSUMS"]
    big = hashlib.sha256((ours / "big").read_bytes()).hexdigest()[:16]
    assert big == out["BIG"]
    assert outside.read_text() == "not shared\n"
    assert sorted(p.name for p in ro.iterdir()) == ["many", "seed.txt", "tree"]


PAUSE_SCRIPT = r"""
mount -t virtiofs ours /mnt && cd /mnt
exec 3< data.bin
echo "FIRST $(dd bs=4096 count=1 <&3 2>/dev/null | sha256sum | cut -c1-16)"
exec 4> out.txt
echo before >&4
echo PAUSE-NOW
while [ ! -e resumed ]; do sleep 0.1; done
echo "REST $(cat <&3 | sha256sum | cut -c1-16)"
echo after >&4
exec 3<&- 4>&-
echo "OUT $(cat out.txt | tr '\n' ' ')"
cd / && umount /mnt && echo UMOUNT $?
"""


def test_open_files_survive_a_vm_pause(tmp_path: Path) -> None:
    """QMP stop/cont: QEMU stops the device's queues (GET_VRING_BASE) and starts them again;
    the worker that served them hands the guest's open files to the next one."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    share = tmp_path / "share"
    share.mkdir()
    data = os.urandom(8 << 20)  # far more than the guest reads ahead before the pause
    (share / "data.bin").write_bytes(data)
    qmp_path = tmp_path / "qmp.sock"
    with BackendDaemon(tmp_path, "vhost-user-fs", ["--shared-dir", str(share), "--tag",
                                                   "ours"], name="fs") as d:
        vm = GuestVM(PAUSE_SCRIPT, modules=MODULES, timeout=120,
                     qemu_args=[*fs_args(d.sock, "ours", 0),
                                "-qmp", f"unix:{qmp_path},server=on,wait=off"])
        with vm, watchdog(d, vm):
            vm.start()
            vm.wait_for("PAUSE-NOW", 90)
            before = d.workers()
            assert before, d.describe()
            qmp = QEMUMonitorProtocol(str(qmp_path))
            qmp.connect()
            try:
                qmp.cmd("stop")
                assert wait_until(lambda: not d.workers(), 10), "the queues did not stop"
                qmp.cmd("cont")
                assert wait_until(lambda: bool(d.workers()), 10), "the queues did not start"
            finally:
                qmp.close()
            assert d.workers() != before
            (share / "resumed").touch()
            result = vm.wait()
        assert result.status == 0, f"{result.console[-3000:]}\n{d.describe()}"
        assert d.stop() == 0, d.describe()
        assert "Traceback" not in d.log, d.describe()
    out = dict(ln.split(" ", 1) for ln in result.lines if " " in ln)
    assert out["FIRST"] == hashlib.sha256(data[:4096]).hexdigest()[:16]
    assert out["REST"] == hashlib.sha256(data[4096:]).hexdigest()[:16], result.console[-2000:]
    assert out["OUT"] == "before after " and out["UMOUNT"] == "0"
    assert (share / "out.txt").read_text() == "before\nafter\n"
