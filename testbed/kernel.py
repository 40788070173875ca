"""The guests' kernel as QEMU loads it fastest under TCG.

A distribution's bzImage decompresses itself inside the guest: under TCG, Debian 12's
xz-compressed kernel takes some 4 s of every boot there before it prints a line. The same
kernel uncompressed (the ELF ``vmlinux`` inside it) carries a PVH entry point
(CONFIG_PVH), where QEMU loads it directly and starts it with no BIOS boot loader and no
decompression: a guest is up 3.5 s sooner. It is extracted once into a cache of ours in
the temporary directory (which the sid chroot's QEMU sees too), named by the bzImage's
hash and written by an atomic rename, so concurrent and later runs share it; a kernel
that is no bzImage, whose payload is neither xz nor gzip, or that has no PVH entry point is
used as it is.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import lzma
import os
import stat
import struct
import tempfile
import time
from pathlib import Path

__all__ = ["bootable_kernel", "has_pvh_entry", "payload_of"]

log = logging.getLogger(__name__)

_XZ, _GZIP = b"\xfd7zXZ\x00", b"\x1f\x8b\x08"
_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point's note


def payload_of(image: bytes) -> bytes | None:
    """The compressed kernel inside a bzImage (boot protocol ≥ 2.08: payload_offset and
    payload_length, from the start of its protected-mode part), or None."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        return None
    version = struct.unpack_from("<H", image, 0x206)[0]
    if version < 0x208:
        return None
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if start + length > len(image):
        return None
    return image[start : start + length]


def _decompress(payload: bytes) -> bytes | None:
    try:
        if payload.startswith(_XZ):
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        if payload.startswith(_GZIP):
            return gzip.decompress(payload)
    except (lzma.LZMAError, OSError, EOFError):
        return None
    return None  # zstd, lz4, ...: not in the standard library


def has_pvh_entry(elf: bytes) -> bool:
    """Whether `elf` (an ELF64 vmlinux) has a Xen PHYS32_ENTRY note: QEMU's PVH boot."""
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        at = phoff + i * phentsize
        if at + 56 > len(elf):
            return False
        kind, _, offset, _, _, size = struct.unpack_from("<IIQQQQ", elf, at)
        pos, end = offset, min(offset + size, len(elf))
        while kind == _PT_NOTE and pos + 12 <= end:
            namesz, descsz, note = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz]
            if name == b"Xen\0" and note == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _cache_dir() -> Path:
    """Our directory in the temporary directory: made 0700, and refused unless it is a
    directory of ours that nobody else may write (another user could plant a kernel)."""
    path = Path(tempfile.gettempdir()) / f"vhostuser-kernels-{os.getuid()}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError(f"{path} is not a private directory of ours")
    return path


@functools.cache
def bootable_kernel(kernel: Path) -> Path:
    """`kernel` uncompressed, if it can be (see above); else `kernel`."""
    image = kernel.read_bytes()
    payload = payload_of(image)
    elf = _decompress(payload) if payload is not None else None
    if elf is None or not has_pvh_entry(elf):
        return kernel
    try:
        cache = _cache_dir()
    except OSError as e:
        log.warning("booting %s compressed (slower under TCG): %s", kernel, e)
        return kernel
    _sweep(cache)
    out = cache / f"vmlinux-{hashlib.sha256(image).hexdigest()[:24]}"
    try:
        if out.read_bytes() == elf:  # (a file cut short by a crash is written again)
            return out
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".vmlinux-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(elf)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return out


def _sweep(cache: Path, age: float = 600.0) -> None:
    """Half-written copies a killed process left (older than `age` seconds)."""
    now = time.time()
    for stale in cache.glob(".vmlinux-*"):
        try:
            if now - stale.lstat().st_mtime > age:
                stale.unlink()
        except OSError:
            pass
