"""Tests for the guest-VM harness (testbed.guest).

The guest tests need qemu-system-x86, qemu-system-common (qemu-storage-daemon),
linux-image-amd64, busybox-static and e2fsprogs. They fail (never skip) if those are
missing, with the package to install in the message.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Program
from qemu_helpers import require_guest_prerequisites

from testbed.guest import (
    GuestError,
    GuestVM,
    build_initramfs,
    find_busybox,
    find_kernel,
    resolve_modules,
)
from testbed.kernel import bootable_kernel, has_pvh_entry, payload_of

BLK_MODULES = ["virtio_pci", "virtio_blk"]
MiB = 1 << 20


@pytest.fixture(scope="module")
def kver() -> str:
    return require_guest_prerequisites()


def _parse_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) for a newc cpio archive."""
    entries: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        pos = (pos + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[pos : pos + size])
        pos = (pos + size + 3) & ~3


@contextlib.contextmanager
def storage_daemon(tmp_path: Path, images: list[Path]) -> Iterator[list[Path]]:
    """Export ``images`` as vhost-user-blk sockets with qemu-storage-daemon."""
    binary = shutil.which("qemu-storage-daemon")
    if binary is None:
        pytest.fail("qemu-storage-daemon not found: apt-get install qemu-system-common")
    cmd = [binary, "--pidfile", str(tmp_path / "qsd.pid")]
    socks = []
    for i, img in enumerate(images):
        sock = tmp_path / f"blk{i}.sock"
        socks.append(sock)
        cmd += [
            "--blockdev", f"driver=file,node-name=file{i},filename={img}",
            "--blockdev", f"driver=raw,node-name=disk{i},file=file{i}",
            "--export", f"type=vhost-user-blk,id=exp{i},node-name=disk{i},"
            f"addr.type=unix,addr.path={sock},writable=on,num-queues=1",
        ]  # fmt: skip
    # the pid file is written once the exports are listening
    proc = Program(cmd, tmp_path / "qsd.log", ready=[tmp_path / "qsd.pid", *socks])
    try:
        yield socks
    finally:
        proc.stop(10)


def blk_args(socks: list[Path]) -> list[str]:
    args = []
    for i, sock in enumerate(socks):
        args += ["-chardev", f"socket,id=blk{i},path={sock}"]
        args += ["-device", f"vhost-user-blk-pci,chardev=blk{i},num-queues=1"]
    return args


# --------------------------------------------------------------------------- no guest


def test_module_resolution_order(kver: str) -> None:
    names = [p.name.split(".ko")[0].replace("-", "_") for p in resolve_modules(
        ["virtio_pci", "virtio_blk", "ext4"], kver)]  # fmt: skip
    for dep, mod in [("virtio_ring", "virtio"), ("virtio", "virtio_pci"),
                     ("virtio_pci_modern_dev", "virtio_pci"), ("virtio", "virtio_blk"),
                     ("jbd2", "ext4"), ("mbcache", "ext4"), ("crc16", "ext4"),
                     ("crc32c_generic", "ext4")]:  # fmt: skip
        assert names.index(dep) < names.index(mod), names
    assert len(names) == len(set(names))
    with pytest.raises(GuestError, match="no_such_module"):
        resolve_modules(["no_such_module"], kver)


def test_initramfs_contents(kver: str, tmp_path: Path) -> None:
    out = build_initramfs(
        "echo hi\n", BLK_MODULES, tmp_path / "i.cpio", kver=kver, files={"bin/x": b"X"}
    )
    entries = _parse_newc(out.read_bytes())
    assert entries["script.sh"][1] == b"echo hi\n"
    assert entries["bin/x"][1] == b"X"
    assert entries["bin/busybox"][1][:4] == b"\x7fELF"
    assert b"poweroff -f" in entries["init"][1]
    assert entries["init"][0] & 0o111
    assert entries["dev/console"][0] & 0o170000 == 0o020000  # char device
    load = entries["etc/modules.load"][1].decode().split()
    assert load[-1].endswith("virtio_blk.ko")
    for m in load:
        assert f"lib/modules/{m.lstrip('?')}" in entries
    # The cached base part makes rebuilding cheap.
    t = time.monotonic()
    build_initramfs("true\n", BLK_MODULES, tmp_path / "j.cpio", kver=kver)
    assert time.monotonic() - t < 1.0


# --------------------------------------------------------------------------- guests


def test_boot_exit_status(kver: str) -> None:
    with GuestVM("echo hello; cat /proc/cmdline; exit 3", timeout=120) as vm:
        result = vm.run()
    assert result.status == 3
    assert result.lines[0] == "hello"
    assert "console=ttyS0" in result.lines[1]
    assert len(result.lines) == 2
    print(f"guest boot+run took {result.duration:.1f}s")


def test_errexit_and_timeout(kver: str) -> None:
    with GuestVM("echo a; false; echo b", errexit=True) as vm:
        result = vm.run()
    assert result.status == 1
    assert result.lines == ["a"]
    with GuestVM("sleep 600", timeout=2) as vm, pytest.raises(GuestError, match="timed out"):
        vm.run()
    assert vm.proc is not None and vm.proc.returncode is not None


def test_vhost_user_blk_dd(kver: str, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (16 * MiB))
    pattern = (b"vhostuser-pattern\n" * (MiB // 18 + 1))[:MiB]
    script = """
        yes vhostuser-pattern | head -c 1048576 > /tmp/p
        dd if=/tmp/p of=/dev/vda bs=4096 seek=256 conv=fsync 2>/dev/null
        sync
        echo WRITTEN
        echo BEGIN
        cat /sys/block/vda/size
        dd if=/dev/vda bs=4096 skip=256 count=256 2>/dev/null | sha256sum
        echo END
    """
    with storage_daemon(tmp_path, [img]) as socks:
        vm = GuestVM(script, modules=BLK_MODULES, qemu_args=blk_args(socks), errexit=True)
        with vm:
            vm.start()
            vm.wait_for("WRITTEN\n")
            # The guest synced before saying so: the data is in the back-end's file now.
            data = img.read_bytes()
            assert data[MiB : 2 * MiB] == pattern
            result = vm.wait()
    assert result.status == 0, result.console
    size, digest = result.between("BEGIN", "END")
    assert int(size) == 16 * MiB // 512
    assert digest.split()[0] == hashlib.sha256(pattern).hexdigest()
    assert data[:MiB] == bytes(MiB) and data[2 * MiB :] == bytes(14 * MiB)


def test_vhost_user_blk_ext4(kver: str, tmp_path: Path) -> None:
    """Guest: busybox mke2fs + mount (ext4 driver) on vda, mount a host-made ext4 on vdb."""
    mkfs, debugfs, e2fsck = (shutil.which(t) for t in ("mkfs.ext4", "debugfs", "e2fsck"))
    if not (mkfs and debugfs and e2fsck):
        pytest.fail("e2fsprogs tools missing: apt-get install e2fsprogs")
    vda, vdb = tmp_path / "a.img", tmp_path / "b.img"
    vda.write_bytes(b"\0" * (32 * MiB))
    content = tmp_path / "content"
    content.mkdir()
    (content / "host.txt").write_text("made on the host\n")
    subprocess.run(
        [mkfs, "-q", "-F", "-d", str(content), str(vdb), "32M"], check=True, capture_output=True
    )
    script = """
        mke2fs /dev/vda >/dev/null
        mkdir -p /mnt/a /mnt/b
        mount -t ext4 /dev/vda /mnt/a
        echo "written in the guest" > /mnt/a/guest.txt
        umount /mnt/a
        mount -t ext4 /dev/vdb /mnt/b
        cat /mnt/b/host.txt
        grep -c crc32c /proc/crypto
        umount /mnt/b
    """
    with (
        storage_daemon(tmp_path, [vda, vdb]) as socks,
        GuestVM(
            script, modules=[*BLK_MODULES, "ext4"], qemu_args=blk_args(socks), errexit=True
        ) as vm,
    ):
        result = vm.run()
    assert result.status == 0, result.console
    assert result.lines[0] == "made on the host"
    assert int(result.lines[1]) >= 1  # crc32c (ext4's metadata_csum) available
    subprocess.run([e2fsck, "-fn", str(vda)], check=True, capture_output=True)
    cat = subprocess.run(
        [debugfs, "-R", "cat /guest.txt", str(vda)], check=True, capture_output=True, text=True
    )
    assert cat.stdout == "written in the guest\n"


def test_the_kernel_boots_uncompressed(kver: str, tmp_path: Path) -> None:
    """Guests get the kernel's ELF vmlinux, which QEMU starts at its PVH entry point (no
    decompression under TCG): the very kernel of /boot, its banner inside; a kernel that
    cannot be so is used as it is."""
    kernel, version = find_kernel()
    payload = payload_of(kernel.read_bytes())
    if payload is None or not payload.startswith((b"\xfd7zXZ\x00", b"\x1f\x8b\x08")):
        pytest.skip(f"{kernel} is not an xz or gzip bzImage: guests boot it as it is")
    elf = bootable_kernel(kernel)
    assert elf != kernel and elf.parent.stat().st_mode & 0o777 == 0o700
    data = elf.read_bytes()
    assert data[:4] == b"\x7fELF"
    assert f"Linux version {version} ".encode() in data
    assert has_pvh_entry(data)
    busybox = find_busybox()  # an ELF without the note
    assert not has_pvh_entry(busybox.read_bytes())
    cut = tmp_path / "vmlinuz-cut"  # its payload truncated: not decompressible
    cut.write_bytes(kernel.read_bytes()[: kernel.stat().st_size // 2])
    assert bootable_kernel(cut) == cut
    assert bootable_kernel(busybox) == busybox
